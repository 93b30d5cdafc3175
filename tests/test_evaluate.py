import importlib.util
import json
import os
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models, processors

from adapmoe_jax import profiles
from adapmoe_jax import scoring
from adapmoe_jax import simulate
from adapmoe_jax.ckpt import loading
from adapmoe_jax.config import tiny_config
from adapmoe_jax.model import transformer
from adapmoe_jax.policies import gating
from adapmoe_jax.text.tokenizer import Tokenizer

from tiny_checkpoint import TEXT, write_text, write_tiny_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(directory)
    config, params = loading.load_params(str(directory))
    tokenizer = Tokenizer.from_dir(str(directory))
    text_file = write_text(directory / "text.txt", TEXT)
    return {"dir": str(directory), "config": config, "params": params,
            "tokenizer": tokenizer, "text_file": text_file}


def tiny_windows(tiny, context_length=32, max_tokens=4096):
    return scoring.text_file_windows(tiny["tokenizer"], tiny["text_file"], tiny["config"],
                                      context_length, max_tokens)


def reference_nll(tiny, context_length, gate_fn=None, thresholds_L=None):
    """Score TEXT with transformer.forward, windowing it by hand."""
    ids = tiny["tokenizer"].encode(TEXT)
    bos, body = ids[0], ids[1:]
    nlls = []
    for start in range(0, len(body), context_length - 1):
        window = np.array([bos, *body[start:start + context_length - 1]], np.int32)
        logits, _, _ = transformer.forward(tiny["params"], tiny["config"],
                                           jnp.asarray(window[None, :-1]),
                                           gate_fn=gate_fn, thresholds_L=thresholds_L)
        log_probs = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        nlls.append(-np.asarray(log_probs)[np.arange(len(window) - 1), window[1:]])
    return np.concatenate(nlls)


def flat_profile(config, sensitivity=1.0):
    return profiles.ModelProfile(
        num_layers=config.num_hidden_layers, num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        layer_sensitivity=(sensitivity,) * config.num_hidden_layers)


def test_split_windows_with_bos():
    windows = scoring.split_windows(list(range(10, 20)), 1, context_length=4, max_tokens=100)
    assert windows.inputs_WT.tolist() == [[1, 10, 11], [1, 13, 14], [1, 16, 17], [1, 0, 0]]
    assert windows.targets_WT[0].tolist() == [10, 11, 12]
    assert windows.targets_WT[-1].tolist() == [19, 0, 0]
    assert windows.scored_WT[-1].tolist() == [True, False, False]
    assert windows.num_scored == 10


def test_split_windows_without_bos_caps_tokens():
    windows = scoring.split_windows(list(range(10, 20)), None, context_length=4, max_tokens=5)
    assert windows.inputs_WT.tolist() == [[10, 11, 12], [14, 15, 0]]
    assert windows.targets_WT.tolist() == [[11, 12, 13], [15, 16, 0]]
    assert windows.num_scored == 5


def test_perplexity_matches_forward(tiny):
    windows = tiny_windows(tiny, context_length=32)
    summary, scores = scoring.evaluate_windows(tiny["params"], tiny["config"], windows,
                                                scoring.GateSetting.off())
    expected_nll = reference_nll(tiny, context_length=32)
    assert summary["num_tokens"] == len(TEXT)
    np.testing.assert_allclose(scores.nll_N, expected_nll, rtol=1e-5, atol=1e-5)
    assert summary["perplexity"] == pytest.approx(np.exp(expected_nll.mean()), rel=1e-5)
    assert summary["experts_per_token"] == 2.0
    assert summary["single_expert_ratio"] == 0.0


def test_max_tokens_limits_scored_tokens(tiny):
    windows = tiny_windows(tiny, context_length=32, max_tokens=40)
    summary, _ = scoring.evaluate_windows(tiny["params"], tiny["config"], windows,
                                           scoring.GateSetting.off())
    assert summary["num_tokens"] == 40


def test_budget_zero_equals_ungated(tiny):
    windows = tiny_windows(tiny)
    gate = scoring.GateSetting.sensitivity(flat_profile(tiny["config"]), 0.0)
    _, gated = scoring.evaluate_windows(tiny["params"], tiny["config"], windows, gate)
    _, stock = scoring.evaluate_windows(tiny["params"], tiny["config"], windows,
                                         scoring.GateSetting.off())
    np.testing.assert_array_equal(gated.nll_N, stock.nll_N)
    np.testing.assert_array_equal(gated.experts_NLK, stock.experts_NLK)
    np.testing.assert_array_equal(gated.weights_NLK, stock.weights_NLK)


def test_gating_lowers_experts_per_token(tiny):
    windows = tiny_windows(tiny)
    off, _ = scoring.evaluate_windows(tiny["params"], tiny["config"], windows,
                                       scoring.GateSetting.off())
    naive = scoring.GateSetting.naive(0.3, tiny["config"].num_hidden_layers)
    gated, _ = scoring.evaluate_windows(tiny["params"], tiny["config"], windows, naive)
    assert gated["experts_per_token"] < off["experts_per_token"]
    assert gated["single_expert_ratio"] > 0.0
    assert gated["experts_per_token"] == pytest.approx(2.0 - gated["single_expert_ratio"])


def test_gated_nll_matches_forward(tiny):
    windows = tiny_windows(tiny)
    gate = scoring.GateSetting.sensitivity(flat_profile(tiny["config"], 2.0), 0.2)
    summary, scores = scoring.evaluate_windows(tiny["params"], tiny["config"], windows, gate)
    expected_nll = reference_nll(tiny, 32, gate_fn=gating.gate_weights,
                                 thresholds_L=jnp.asarray(gate.thresholds_array()))
    assert summary["single_expert_ratio"] > 0.0
    np.testing.assert_allclose(scores.nll_N, expected_nll, rtol=1e-5, atol=1e-5)


def test_prediction_uses_previous_layer(tiny):
    config = tiny_config(num_hidden_layers=3)
    params = transformer.init_params(config, seed=1)
    tokens = jnp.asarray([[1, 40, 50, 60, 70]], jnp.int32)
    outputs = scoring.probe_forward(params, config, tokens,
                                    jnp.zeros(config.num_hidden_layers, jnp.float32))
    np.testing.assert_array_equal(outputs.predicted_LBTK[0], -1)
    # Layer 1's router applied to the MoE input of layer 0 must predict layer 1.
    x = transformer.embed(params, tokens)
    layer0 = jax.tree.map(lambda a: a[0], params["layers"])
    _, moe_in, _, _, _ = transformer.attention_block(layer0, config, x, None, None, 0)
    logits = moe_in[0].astype(jnp.float32) @ params["layers"]["router"][1]
    _, expected = gating.route(logits, config.num_experts_per_tok)
    np.testing.assert_array_equal(outputs.predicted_LBTK[1, 0], expected)


# --- Command line -------------------------------------------------------------------------

def run_evaluate(*args):
    return subprocess.run([sys.executable, "-m", "adapmoe_jax.evaluate", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_json_and_trace(tiny, tmp_path):
    output, trace_path = tmp_path / "eval.json", tmp_path / "trace.npz"
    result = run_evaluate(f"--checkpoint={tiny['dir']}", f"--text_file={tiny['text_file']}",
                          "--context_length=32", "--naive_threshold=0.3",
                          f"--output_json={output}", f"--trace_out={trace_path}")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout
    report = json.loads(output.read_text())
    num_tokens, config = len(TEXT), tiny["config"]
    assert report["num_tokens"] == num_tokens
    assert len(report["nll"]) == num_tokens
    assert report["gating"]["mode"] == "naive"
    assert len(report["single_expert_ratio_per_layer"]) == config.num_hidden_layers

    trace = np.load(trace_path)
    shape = (num_tokens, config.num_hidden_layers, config.num_experts_per_tok)
    for name, dtype in (("experts", np.int32), ("weights", np.float32),
                        ("predicted", np.int32)):
        assert trace[name].shape == shape
        assert trace[name].dtype == dtype
    dropped = trace["experts"] == -1
    assert dropped.any()
    assert not dropped[:, :, 0].any()
    np.testing.assert_array_equal(trace["weights"][dropped], 0.0)
    np.testing.assert_array_equal(trace["predicted"][:, 0], -1)
    assert (trace["predicted"][:, 1:] >= 0).all()
    single_ratio = dropped.any(axis=-1).mean()
    assert report["single_expert_ratio"] == pytest.approx(single_ratio)
    assert simulate.load_trace(str(trace_path)).num_tokens == num_tokens


def write_mismatched_profile(path):
    profile = flat_profile(tiny_config(num_hidden_layers=3))
    profiles.save_profile(profile, str(path))
    return str(path)


def bad_input_cases(tiny, tmp_path):
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9".encode("latin-1"))
    empty = write_text(tmp_path / "empty.txt", "")
    mismatched = write_mismatched_profile(tmp_path / "three_layers.json")
    text = f"--text_file={tiny['text_file']}"
    return {
        "not UTF-8": ([f"--text_file={bad_utf8}"], "not UTF-8"),
        "under 2 tokens": ([f"--text_file={empty}"], "at least 2 tokens"),
        "context too long": ([text, "--context_length=257"], "max_position_embeddings"),
        "negative budget": ([text, "--adapgate", "--gate_budget=-0.1"], "--gate_budget"),
        "negative threshold": ([text, "--naive_threshold=-1"], "--naive_threshold"),
        "profile mismatch": ([text, "--adapgate", f"--profile={mismatched}"], "3 layers"),
        "adapgate without profile": ([text, "--adapgate"], "adapmoe_jax.calibrate"),
    }


@pytest.mark.parametrize("case", [
    "not UTF-8", "under 2 tokens", "context too long", "negative budget",
    "negative threshold", "profile mismatch", "adapgate without profile"])
def test_cli_bad_input_exits_2(tiny, tmp_path, case):
    args, expected = bad_input_cases(tiny, tmp_path)[case]
    result = run_evaluate(f"--checkpoint={tiny['dir']}", *args)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0]
    assert "Traceback" not in result.stderr


def test_gating_study_smoke(tiny, tmp_path):
    profile_path = tmp_path / "profile.json"
    profiles.save_profile(flat_profile(tiny["config"]), str(profile_path))
    second_text = write_text(tmp_path / "reversed.txt", TEXT[::-1])
    out_dir = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "gating_accuracy_study.py"),
         f"--checkpoint={tiny['dir']}", f"--profile={profile_path}",
         f"--text_files={tiny['text_file']},{second_text}", "--budgets=0,0.04",
         "--naive_thresholds=0.3", "--context_length=32", f"--out_dir={out_dir}"],
        capture_output=True, text=True, timeout=120, env=env)
    report = json.loads((out_dir / "gating_study.json").read_text())
    runs = [(run["source"], run["mode"], run["setting"]) for run in report["results"]]
    assert runs == [(source, mode, setting) for source in ("text", "reversed")
                    for mode, setting in (("off", None), ("sensitivity", 0.0),
                                          ("sensitivity", 0.04), ("naive", 0.3))]
    stock, budget_zero = report["results"][0], report["results"][1]
    assert budget_zero["perplexity"] == stock["perplexity"]
    assert "| naive | 0.3 |" in (out_dir / "gating_study.md").read_text()
    if importlib.util.find_spec("matplotlib") is None:
        assert result.returncode == 2
        assert "matplotlib" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert (out_dir / "gating_study.png").stat().st_size > 0
