"""Tests for the trace simulator: hand-worked counts, bounds, prefetching and the CLI."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from adapmoe_jax import profiles
from adapmoe_jax import simulate
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import gating
from adapmoe_jax.policies import prefetch
from adapmoe_jax.policies import replacement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_trace(experts, predicted=None, weights=None):
    experts = np.asarray(experts, dtype=np.int32)
    if predicted is None:
        predicted = np.full_like(experts, -1)
    if weights is None:
        weights = np.where(experts >= 0, 1.0 / experts.shape[-1], 0.0)
    return simulate.RoutingTrace(experts, np.asarray(weights, np.float32),
                                 np.asarray(predicted, np.int32))


# Three tokens, two layers, top-2 and four experts, worked by hand in the tests below.
HAND_EXPERTS = [[[0, 1], [2, 3]],
                [[0, 2], [2, -1]],
                [[1, 0], [3, 2]]]
HAND_PREDICTED = [[[-1, -1], [2, 3]],
                  [[-1, -1], [2, 0]],
                  [[-1, -1], [3, 2]]]
HAND_SLOTS = (1, 2)


def random_trace(seed, num_tokens=40, num_layers=3, num_experts=6, k=2, drop=0.0):
    rng = np.random.default_rng(seed)
    experts = np.stack([
        np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(num_layers)])
        for _ in range(num_tokens)])
    dropped = rng.uniform(size=experts.shape) < drop
    dropped[..., 0] = False
    experts = np.where(dropped, -1, experts)
    predicted = np.stack([
        np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(num_layers)])
        for _ in range(num_tokens)])
    predicted[:, 0] = -1
    return make_trace(experts, predicted)


def test_predict_next_experts_uses_next_router():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(5, 16)), jnp.bfloat16)
    router = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    predicted = prefetch.predict_next_experts(hidden, router, 2)
    logits = hidden.astype(jnp.float32) @ router.astype(jnp.float32)
    _, expected = gating.route(logits, 2)
    assert predicted.dtype == jnp.int32
    np.testing.assert_array_equal(predicted, expected)


def test_choose_prefetches_skips_cached_and_repeats():
    predicted = np.array([[1, 3], [3, -1], [0, 2]])
    cached = np.array([False, True, False, False])
    assert prefetch.choose_prefetches(predicted, cached, 1).tolist() == [3]
    assert prefetch.choose_prefetches(predicted, cached, 2).tolist() == [3, 0]
    assert prefetch.choose_prefetches(predicted, cached, 9).tolist() == [3, 0, 2]
    assert prefetch.choose_prefetches(predicted, cached, 0).tolist() == []


def test_choose_prefetches_rejects_negative_count():
    with pytest.raises(UserInputError, match="prefetch count -1"):
        prefetch.choose_prefetches([0, 1], [False, False], -1)


def test_lru_hand_worked_counts():
    # Layer 0 (one slot) keeps expert 0 and stages 1 and 2: loads 2, 1, 1.
    # Layer 1 (two slots) loads 2 and 3 once, then hits.
    result = simulate.simulate_lru(make_trace(HAND_EXPERTS), HAND_SLOTS, num_experts=4)
    assert result.num_tokens == 3
    assert result.accesses == 11
    assert result.on_demand_loads == 6
    assert result.prefetch_copies == 0
    assert result.hit_rate == pytest.approx(5 / 11)
    assert result.loads_per_token == pytest.approx(2.0)


def test_lru_prefetch_hand_worked_counts():
    # Token 0 prefetches 2 (used). Token 1 prefetches 0 over 3 (unused). Token 2
    # prefetches 3 over 0 (used). Layer 1 then waits only for 3 at token 0.
    trace = make_trace(HAND_EXPERTS, HAND_PREDICTED)
    result = simulate.simulate_lru(trace, HAND_SLOTS, num_experts=4, prefetch_count=1)
    assert result.on_demand_loads == 5
    assert result.prefetch_copies == 3
    assert result.prefetch_hits == 2
    assert result.copies_per_token == pytest.approx(8 / 3)


def test_lru_modelled_time_hand_worked():
    cost_model = simulate.CostModel(expert_bytes=10**6, bandwidth_gbps=1.0,
                                    expert_compute_ms=0.5)
    assert cost_model.load_ms == pytest.approx(1.0)
    result = simulate.simulate_lru(make_trace(HAND_EXPERTS), HAND_SLOTS, 4,
                                   cost_model=cost_model)
    # Per (token, layer): loads x 1 ms + active experts x 0.5 ms.
    assert result.modelled_ms == pytest.approx(3 + 3 + 2 + 0.5 + 2 + 1)


def test_belady_hand_worked_counts():
    result = simulate.simulate_belady(make_trace(HAND_EXPERTS), HAND_SLOTS, num_experts=4)
    # Layer 0 keeps 0 after token 0 (used next), so it loads 2, 1, 1 as LRU does.
    assert result.on_demand_loads == 6
    assert result.copies_per_token == pytest.approx(2.0)


def test_lru_without_prefetch_equals_replay():
    trace = random_trace(seed=3, drop=0.3)
    slots = (1, 2, 3)
    result = simulate.simulate_lru(trace, slots, num_experts=6)
    expected = sum(replacement.lru_loads(trace.layer_steps(layer), s)
                   for layer, s in enumerate(slots))
    assert result.on_demand_loads == expected


@pytest.mark.parametrize("seed", range(10))
def test_belady_never_loads_more_than_lru(seed):
    trace = random_trace(seed, drop=0.2 * (seed % 3))
    for slots in [(1, 1, 1), (2, 3, 1), (4, 4, 4), (6, 6, 6)]:
        lru = simulate.simulate_lru(trace, slots, num_experts=6)
        belady = simulate.simulate_belady(trace, slots, num_experts=6)
        assert belady.on_demand_loads <= lru.on_demand_loads


def test_perfect_prediction_prefetch_reduces_loads():
    trace = random_trace(seed=7, num_layers=4)
    perfect = make_trace(trace.experts, np.where(np.arange(4)[None, :, None] == 0, -1,
                                                 trace.experts))
    slots = (2, 2, 2, 2)
    without = simulate.simulate_lru(perfect, slots, num_experts=6)
    one = simulate.simulate_lru(perfect, slots, num_experts=6, prefetch_count=1)
    both = simulate.simulate_lru(perfect, slots, num_experts=6, prefetch_count=2)
    layer0 = replacement.lru_loads(perfect.layer_steps(0), 2)
    assert one.on_demand_loads < without.on_demand_loads
    assert both.on_demand_loads == layer0
    assert both.prefetch_hits == both.prefetch_copies


def test_gate_trace_zero_threshold_keeps_trace():
    trace = random_trace(seed=1)
    gated = simulate.gate_trace(trace, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(gated.experts, trace.experts)


def test_gate_trace_drops_low_weights():
    experts = [[[0, 1], [2, 3]]]
    weights = [[[0.8, 0.2], [0.6, 0.4]]]
    trace = make_trace(experts, weights=weights)
    gated = simulate.gate_trace(trace, [0.3, 0.3])
    np.testing.assert_array_equal(gated.experts, [[[0, -1], [2, 3]]])
    np.testing.assert_array_equal(gated.weights[0, 0], [1.0, 0.0])


def test_gate_trace_rejects_wrong_threshold_count():
    with pytest.raises(UserInputError, match="2 gate thresholds for a trace of 3 layers"):
        simulate.gate_trace(random_trace(seed=1), [0.1, 0.1])


def test_trace_round_trip(tmp_path):
    trace = random_trace(seed=2)
    path = str(tmp_path / "trace.npz")
    simulate.save_trace(trace, path)
    loaded = simulate.load_trace(path)
    for name in ("experts", "weights", "predicted"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    assert os.listdir(tmp_path) == ["trace.npz"]


def test_trace_missing_array_raises(tmp_path):
    path = str(tmp_path / "trace.npz")
    np.savez(path, experts=np.zeros((2, 1, 2), np.int32))
    with pytest.raises(UserInputError, match="missing array 'weights'"):
        simulate.load_trace(path)


def test_trace_shape_mismatch_raises():
    trace = random_trace(seed=2)
    bad = simulate.RoutingTrace(trace.experts, trace.weights[:, :1], trace.predicted)
    with pytest.raises(UserInputError, match="weights has shape"):
        simulate.validate_trace(bad)


def test_trace_not_found_raises(tmp_path):
    with pytest.raises(UserInputError, match="routing trace not found"):
        simulate.load_trace(str(tmp_path / "absent.npz"))


def test_allocation_layer_mismatch_raises():
    with pytest.raises(UserInputError, match="allocation has 2 layers but the trace has 3"):
        simulate.simulate_lru(random_trace(seed=0), (2, 2), num_experts=6)


def test_mixtral_preset_load_time():
    cost_model = simulate.CostModel(**simulate.PRESETS["mixtral-8x7b"])
    assert cost_model.expert_bytes == 352_321_536
    assert cost_model.load_ms == pytest.approx(14.09, abs=0.01)


def test_standard_policies_rows():
    rows = simulate.standard_policies((2, 2), (3, 1), prefetch_count=1, with_gating=True)
    assert [row.name for row in rows] == [
        "lru", "lru+prefetch", "lru+prefetch+adapgate", "lru+prefetch+adapgate+dp",
        "belady+adapgate+dp"]
    assert rows[-1].slots_per_layer == (3, 1)


def test_simulate_cli_reports_every_policy(tmp_path):
    trace_path = str(tmp_path / "trace.npz")
    trace = random_trace(seed=5, num_tokens=30, num_layers=4, num_experts=4)
    rng = np.random.default_rng(0)
    weights = np.sort(rng.dirichlet([1.0] * 2, size=(30, 4)), axis=-1)[..., ::-1]
    simulate.save_trace(simulate.RoutingTrace(trace.experts, weights.astype(np.float32),
                                              trace.predicted), trace_path)
    profile = profiles.ModelProfile(
        num_layers=4, num_experts=4, top_k=2, layer_sensitivity=(4.0, 2.0, 1.0, 0.5),
        gate_budget=0.02, single_expert_ratio=(0.1, 0.2, 0.3, 0.4),
        prefetch_accuracy=(0.0, 0.5, 0.5, 0.5))
    profile_path = str(tmp_path / "profile.json")
    profiles.save_profile(profile, profile_path)
    output = tmp_path / "results.json"

    result = subprocess.run(
        [sys.executable, "-m", "adapmoe_jax.simulate", f"--trace={trace_path}",
         f"--profile={profile_path}", "--cache_size=8", "--preset=embedded",
         "--expert_bytes=1000000", f"--output_json={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    names = [row["name"] for row in report["policies"]]
    assert names[0] == "lru"
    assert names[-1] == "belady+adapgate+dp"
    assert "belady+adapgate+dp" in result.stdout
    assert report["policies"][0]["slots_per_layer"] == [2, 2, 2, 2]


def test_simulate_cli_bad_trace_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adapmoe_jax.simulate", f"--trace={tmp_path}/absent.npz",
         "--cache_size=8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: routing trace not found")
    assert "Traceback" not in result.stderr


def test_standard_policies_without_prefetch_or_dp():
    rows = simulate.standard_policies((2, 2), None, prefetch_count=0, with_gating=False)
    assert [row.name for row in rows] == ["lru", "belady"]
    assert rows[-1].slots_per_layer == (2, 2)
