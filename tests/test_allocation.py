"""Tests for the AdapMoE cost, the DP allocator and the allocate command."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adapmoe_jax import allocation
from adapmoe_jax import profiles
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import replacement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTRAL_8X7B = os.path.join(REPO, "configs", "mixtral-8x7b.json")

# Published AdapMoE results for Mixtral-8x7B at a cache of 64 experts.
EXPECTED_ADAPGATE = [8, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                     1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
EXPECTED_STOCK = [8, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 2, 1, 1, 2,
                  2, 2, 2, 2, 2, 2, 2, 1, 1, 2, 2, 2, 2]


@pytest.fixture(scope="module")
def mixtral_profile():
    return profiles.load_profile(MIXTRAL_8X7B)


def test_expected_loads_hand_worked():
    # P(both) = 12/56 and P(one) = 32/56, so f = 0.2 * 0.5 * 0.5 + 0.8 * 34/56.
    assert allocation.expected_loads(4, 8, 0.5, 0.2) == pytest.approx(0.05 + 0.8 * 34 / 56)


def test_expected_loads_limits():
    assert allocation.expected_loads(8, 8, 0.3, 0.4) == 0.0
    assert allocation.expected_loads(0, 8, 0.0, 0.0) == pytest.approx(2.0)
    assert allocation.expected_loads(0, 8, 0.0, 1.0) == pytest.approx(1.0)
    assert allocation.expected_loads(0, 8, 1.0, 0.0) == pytest.approx(1.0)


def test_expected_loads_matches_miss_count_average():
    # Average misses over all ordered pairs of distinct experts, s cached.
    num_experts, slots, accuracy = 6, 2, 0.4
    cached = set(range(slots))
    total = 0.0
    pairs = list(itertools.permutations(range(num_experts), 2))
    for pair in pairs:
        misses = sum(e not in cached for e in pair)
        total += max(misses - accuracy, 0.0) if misses else 0.0
    assert allocation.expected_loads(slots, num_experts, accuracy, 0.0) == pytest.approx(
        total / len(pairs))


@pytest.mark.parametrize("args", [(9, 8, 0.5, 0.5), (-1, 8, 0.5, 0.5), (1, 1, 0.5, 0.5),
                                  (2, 8, 1.5, 0.5), (2, 8, 0.5, -0.1)])
def test_expected_loads_rejects_bad_input(args):
    with pytest.raises(UserInputError):
        allocation.expected_loads(*args)


def test_dp_allocation_mixtral_adapgate(mixtral_profile):
    slots = allocation.dp_allocation(mixtral_profile, 64, adapgate=True)
    assert list(slots) == EXPECTED_ADAPGATE


def test_dp_allocation_mixtral_stock(mixtral_profile):
    slots = allocation.dp_allocation(mixtral_profile, 64, adapgate=False)
    assert list(slots) == EXPECTED_STOCK


def test_dp_allocation_stock_then_adapgate(mixtral_profile):
    allocation.dp_allocation(mixtral_profile, 64, adapgate=False)
    slots = allocation.dp_allocation(mixtral_profile, 64, adapgate=True)
    assert list(slots) == EXPECTED_ADAPGATE
    assert list(allocation.dp_allocation(mixtral_profile, 64, adapgate=False)) == EXPECTED_STOCK


def test_analytic_table_rejects_top3(mixtral_profile):
    profile = profiles.ModelProfile(num_layers=2, num_experts=8, top_k=3,
                                    layer_sensitivity=(1.0, 1.0))
    with pytest.raises(UserInputError, match="top_k=3"):
        allocation.analytic_cost_table(profile, adapgate=False)


def test_analytic_table_adapgate_needs_ratio():
    profile = profiles.ModelProfile(num_layers=2, num_experts=8, top_k=2,
                                    layer_sensitivity=(1.0, 1.0))
    with pytest.raises(UserInputError, match="single_expert_ratio"):
        allocation.analytic_cost_table(profile, adapgate=True)
    table = allocation.analytic_cost_table(profile, adapgate=False)
    assert table.shape == (2, 9)


def brute_force_allocation(cost, cache_size):
    num_layers, num_experts = cost.shape[0], cost.shape[1] - 1
    best = None
    for slots in itertools.product(range(1, num_experts + 1), repeat=num_layers):
        if sum(slots) == cache_size:
            total = sum(cost[layer, s] for layer, s in enumerate(slots))
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocate_slots_is_optimal(seed):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(size=(4, 5))
    for cache_size in range(4, 17):
        slots = allocation.allocate_slots(cost, cache_size)
        assert sum(slots) == cache_size
        assert all(1 <= s <= 4 for s in slots)
        total = sum(cost[layer, s] for layer, s in enumerate(slots))
        assert total == pytest.approx(brute_force_allocation(cost, cache_size))


def test_allocate_slots_ties_favour_early_layers():
    cost = np.zeros((3, 5))
    assert allocation.allocate_slots(cost, 5) == (3, 1, 1)


def test_allocate_slots_large_cache_fills_every_layer():
    cost = np.ones((3, 5))
    assert allocation.allocate_slots(cost, 12) == (4, 4, 4)
    assert allocation.allocate_slots(cost, 100) == (4, 4, 4)


def test_allocate_slots_minimum_cache():
    assert allocation.allocate_slots(np.ones((3, 5)), 3) == (1, 1, 1)


@pytest.mark.parametrize("cache_size", [2, -1, 0])
def test_allocate_slots_rejects_small_cache(cache_size):
    with pytest.raises(UserInputError, match=f"cache size {cache_size}.*>= 3"):
        allocation.allocate_slots(np.ones((3, 5)), cache_size)


def test_allocate_slots_rejects_nan_cost():
    cost = np.ones((2, 3))
    cost[1, 2] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        allocation.allocate_slots(cost, 3)


def test_uniform_allocation():
    assert allocation.uniform_allocation(32, 8, 64) == (2,) * 32
    assert allocation.uniform_allocation(3, 8, 7) == (3, 2, 2)
    assert allocation.uniform_allocation(3, 2, 50) == (2, 2, 2)
    assert allocation.uniform_allocation(3, 8, 2) == (1, 1, 0)
    assert allocation.uniform_allocation(3, 8, 0) == (0, 0, 0)
    with pytest.raises(UserInputError, match="-1"):
        allocation.uniform_allocation(3, 8, -1)


def test_empirical_cost_table():
    layer0 = [[0, 1], [2, 3], [0, 1]]
    layer1 = [[0, -1], [0, -1], [0, -1]]
    table = allocation.empirical_cost_table([layer0, layer1], 4)
    assert table.shape == (2, 5)
    for slots in range(5):
        assert table[0, slots] == replacement.lru_loads(layer0, slots) / 3
    # With 3 slots, step 1 evicts expert 0 and step 2 reloads it.
    np.testing.assert_allclose(table[0], [2, 2, 2, 5 / 3, 4 / 3])
    np.testing.assert_allclose(table[1], [1, 1 / 3, 1 / 3, 1 / 3, 1 / 3])


def test_allocation_file_round_trip(tmp_path):
    path = str(tmp_path / "allocation.json")
    allocation.write_allocation(5, (3, 1, 1), path)
    assert json.load(open(path)) == {"cache_size": 5, "slots_per_layer": [3, 1, 1]}
    assert allocation.read_allocation(path, 3, 4) == (3, 1, 1)
    assert os.listdir(tmp_path) == ["allocation.json"]


def test_allocation_file_large_cache_round_trip(tmp_path):
    path = str(tmp_path / "allocation.json")
    allocation.write_allocation(100, (4, 4), path)
    assert allocation.read_allocation(path, 2, 4) == (4, 4)


@pytest.mark.parametrize("content, match", [
    ('{"cache_size": 3, "slots_per_layer": [1, 1]}', "3 slot counts"),
    ('{"cache_size": 9, "slots_per_layer": [1, 1, 1]}', "sum to 3"),
    ('{"slots_per_layer": [1, 0, 1]}', r"slots_per_layer\[1\]=0"),
    ('{"slots_per_layer": [1, 9, 1]}', r"slots_per_layer\[1\]=9"),
    ("[1, 1, 1", "invalid JSON"),
])
def test_allocation_file_rejects_bad_content(tmp_path, content, match):
    path = tmp_path / "allocation.json"
    path.write_text(content)
    with pytest.raises(UserInputError, match=match):
        allocation.read_allocation(str(path), 3, 4)


def run_allocate(*args):
    return subprocess.run([sys.executable, "-m", "adapmoe_jax.allocate", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_allocate_cli_writes_allocation(tmp_path):
    output = tmp_path / "allocation.json"
    result = run_allocate(f"--profile={MIXTRAL_8X7B}", "--cache_size=64", "--adapgate",
                          f"--output={output}")
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text()) == {"cache_size": 64,
                                              "slots_per_layer": EXPECTED_ADAPGATE}
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "slots", "loads/token"]
    assert lines[1].split()[:2] == ["0", "8"]
    assert lines[-1].split()[:2] == ["total", "64"]


def test_allocate_cli_bad_cache_size_exits_2(tmp_path):
    result = run_allocate(f"--profile={MIXTRAL_8X7B}", "--cache_size=10")
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid cache size 10")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empirical_cost_with_prefetch_matches_simulator():
    from adapmoe_jax import simulate

    rng = np.random.default_rng(3)
    num_tokens, num_layers, num_experts = 60, 4, 8
    experts = np.stack([np.stack([rng.choice(num_experts, 2, replace=False)
                                  for _ in range(num_layers)]) for _ in range(num_tokens)])
    experts[rng.random((num_tokens, num_layers)) < 0.3, 1] = -1
    predicted = np.stack([np.stack([rng.choice(num_experts, 2, replace=False)
                                    for _ in range(num_layers)]) for _ in range(num_tokens)])
    predicted[:, 0] = -1
    trace = simulate.RoutingTrace(experts=experts.astype(np.int32),
                                  weights=np.full(experts.shape, 0.5, np.float32),
                                  predicted=predicted.astype(np.int32))
    table = allocation.empirical_cost_table(
        [trace.layer_steps(layer) for layer in range(num_layers)], num_experts,
        predicted_per_layer=[predicted[:, layer] for layer in range(num_layers)],
        prefetch_count=1)
    slots = (1, 3, 2, 5)
    replayed = simulate.simulate_lru(trace, slots, num_experts, prefetch_count=1)
    expected = sum(table[layer, s] for layer, s in enumerate(slots)) * num_tokens
    assert round(expected) == replayed.on_demand_loads


def test_empirical_cost_perfect_prefetch_loads_less():
    rng = np.random.default_rng(4)
    steps = [rng.choice(8, 2, replace=False).tolist() for _ in range(50)]
    # Predictions equal to the experts used: prefetching can only help.
    perfect = np.asarray(steps)
    with_prefetch = allocation.empirical_cost_table([steps], 8, [perfect], prefetch_count=1)
    without = allocation.empirical_cost_table([steps], 8)
    for slots in range(1, 8):
        assert with_prefetch[0, slots] < without[0, slots]
