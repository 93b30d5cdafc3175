"""Tests of scripts/policy_study.py: its per-layer replay, its metrics and one end-to-end run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adapmoe_jax import profiles
from adapmoe_jax import simulate
from adapmoe_jax.policies import replacement
from adapmoe_jax.config import tiny_config
from tiny_checkpoint import TEXT, write_text, write_tiny_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "policy_study.py")


def load_script():
    spec = importlib.util.spec_from_file_location("policy_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


policy_study = load_script()


def random_trace(num_tokens=200, num_layers=4, num_experts=8, seed=0):
    """Return a top-2 trace with skewed routing, some dropped experts and noisy predictions."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.ones(num_experts) * 0.5)
    experts = np.stack([rng.choice(num_experts, 2, replace=False, p=popularity)
                        for _ in range(num_tokens * num_layers)])
    experts = experts.reshape(num_tokens, num_layers, 2).astype(np.int32)
    dropped = rng.random((num_tokens, num_layers)) < 0.3
    experts[:, :, 1] = np.where(dropped, -1, experts[:, :, 1])
    noise = rng.integers(0, num_experts, experts.shape, dtype=np.int32)
    predicted = np.where(rng.random(experts.shape) < 0.7, np.abs(experts), noise)
    predicted[:, 0] = -1
    weights = np.where(experts >= 0, 0.5, 0.0).astype(np.float32)
    return simulate.RoutingTrace(experts, weights, predicted.astype(np.int32))


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_layer_replay_matches_full_replay(slots):
    trace = random_trace()
    full = simulate.simulate_lru(trace, (slots,) * trace.num_layers, 8, prefetch_count=1)
    per_layer = [policy_study.layer_loads_with_prefetch(trace, layer, slots, 8, 1)
                 for layer in range(trace.num_layers)]
    assert sum(per_layer) == pytest.approx(full.loads_per_token)


def test_layer_zero_replay_is_plain_lru():
    # Layer 0 has no earlier layer to prefetch for it.
    trace = random_trace()
    loads = policy_study.layer_loads_with_prefetch(trace, 0, 2, 8, 1)
    plain = replacement.lru_loads(trace.layer_steps(0), 2)
    assert loads == pytest.approx(plain / trace.num_tokens)


def test_prefetch_accuracy_hand_worked():
    # Two tokens and three layers. The second token uses only expert 4 at layer 2, so
    # the prediction 5 misses there.
    experts = np.array([[[0, 1], [2, 3], [4, 5]],
                        [[0, 1], [2, 3], [4, -1]]], np.int32)
    predicted = np.array([[[-1, -1], [3, 0], [4, 1]],
                          [[-1, -1], [1, 2], [5, 4]]], np.int32)
    trace = simulate.RoutingTrace(experts, np.ones(experts.shape, np.float32), predicted)
    accuracy = policy_study.prefetch_accuracy(trace)
    np.testing.assert_allclose(accuracy, [0.0, 0.5, 0.5])


def test_goals_compare_full_policy_rows():
    def row(key, loads, copies):
        return {"key": key, "loads_per_token": loads, "copies_per_token": copies}

    comparison = {"cache_size": 64, "rows": [row("a", 4.0, 4.0), row("d", 2.0, 2.7),
                                             row("e", 2.0, 2.0)]}
    goals = policy_study.check_goals(comparison)
    assert goals["halves_loads"]
    assert goals["loads_ratio"] == pytest.approx(0.5)
    assert not goals["copies_within_bound"]
    assert goals["copies_ratio"] == pytest.approx(1.35)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_study")
    config = tiny_config(num_hidden_layers=4, num_local_experts=8)
    write_tiny_checkpoint(root / "ckpt", config, seed=1)
    # Sensitivities that give thresholds near 0.3 at budget 0.005, so some tokens drop
    # their second expert. The ratios and accuracies only feed the analytic cost.
    profile = profiles.ModelProfile(
        num_layers=4, num_experts=8, top_k=2, layer_sensitivity=(0.05, 0.06, 0.04, 0.05),
        single_expert_ratio=(0.2, 0.3, 0.1, 0.2), prefetch_accuracy=(0.0, 0.6, 0.7, 0.8))
    profiles.save_profile(profile, str(root / "profile.json"))
    text_file = write_text(root / "text.txt", TEXT * 3)
    out_dir = root / "out"
    command = [sys.executable, SCRIPT, f"--checkpoint={root / 'ckpt'}",
               f"--profile={root / 'profile.json'}", f"--text_file={text_file},{text_file}",
               "--context_length=32", "--max_tokens=150", "--cache_sizes=8,12",
               "--goal_cache_size=16", "--cost_slots=1,3", f"--out_dir={out_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=120)
    assert result.returncode == 0, result.stderr
    with open(out_dir / "policy_study.json", encoding="utf-8") as f:
        return out_dir, json.load(f), result.stdout


def test_study_writes_every_output(study_run):
    out_dir, _, stdout = study_run
    for name in ("policy_study.json", "policy_study.md", "trace_stock.npz", "trace_gated.npz"):
        assert (out_dir / name).is_file(), name
    assert "cache size 16" in stdout
    markdown = (out_dir / "policy_study.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Expert cache policies")
    assert "- Command: `python" in markdown
    assert "## Goals at cache size 16" in markdown


def test_study_joins_texts_into_traces(study_run):
    out_dir, report, _ = study_run
    stock = simulate.load_trace(str(out_dir / "trace_stock.npz"))
    gated = simulate.load_trace(str(out_dir / "trace_gated.npz"))
    assert stock.num_tokens == 300
    assert gated.num_tokens == 300
    assert report["traces"]["stock"]["experts_per_token"] == 2.0
    assert report["traces"]["gated"]["experts_per_token"] < 2.0


def test_study_rows_per_cache_size(study_run):
    _, report, _ = study_run
    assert [c["cache_size"] for c in report["policies"]] == [8, 12, 16]
    for comparison in report["policies"]:
        rows = {row["key"]: row for row in comparison["rows"]}
        assert list(rows) == ["a", "b", "c", "d", "e", "f"]
        assert sum(comparison["dp_slots"]) == comparison["cache_size"]
        assert rows["d"]["slots_per_layer"] == rows["e"]["slots_per_layer"]
        assert rows["f"]["slots_per_layer"] == comparison["dp_slots_empirical"]
        # Belady's copies bound every policy on the same trace and allocation.
        assert rows["e"]["copies_per_token"] <= rows["d"]["copies_per_token"]
        for row in rows.values():
            assert set(row["ms_per_token"]) == {"embedded", "mixtral-8x7b"}


def test_study_goals_match_rows(study_run):
    _, report, _ = study_run
    goals = report["goals"]
    goal_rows = {row["key"]: row for row in report["policies"][-1]["rows"]}
    assert goals["cache_size"] == 16
    assert goals["full_loads_per_token"] == goal_rows["d"]["loads_per_token"]
    assert goals["halves_loads"] == (
        goal_rows["d"]["loads_per_token"] <= 0.5 * goal_rows["a"]["loads_per_token"])
    assert goals["copies_within_bound"] == (
        goal_rows["d"]["copies_per_token"] <= 1.3 * goal_rows["e"]["copies_per_token"])


def test_study_cost_comparison_shapes(study_run):
    _, report, _ = study_run
    for trace_name in ("stock", "gated"):
        comparison = report["cost_comparison"][trace_name]
        assert comparison["slot_counts"] == [1, 3]
        assert np.shape(comparison["per_layer"]["measured"]) == (4, 2)
        assert set(comparison["errors"]) == {"analytic_profile", "analytic_trace",
                                             "empirical"}
    accuracy = report["per_layer"]["prefetch_accuracy_stock"]
    assert len(accuracy) == 4
    assert accuracy[0] == 0.0
