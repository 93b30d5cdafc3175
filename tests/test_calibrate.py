import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapmoe_jax import calibrate
from adapmoe_jax import profiles
from adapmoe_jax import scoring
from adapmoe_jax.config import tiny_config
from adapmoe_jax.text.tokenizer import Tokenizer
from tiny_checkpoint import TEXT, write_text, write_tiny_checkpoint

CONFIG = tiny_config(num_hidden_layers=4)
CONTEXT_LENGTH = 32


def tiny_windows(directory, config, text=TEXT):
    tokenizer = Tokenizer.from_dir(str(directory))
    text_file = write_text(directory / "calibration.txt", text)
    return scoring.text_file_windows(tokenizer, text_file, config, CONTEXT_LENGTH, 4096)


def sensitivity_of(tmp_path, name, edit_params=None, config=CONFIG):
    directory = tmp_path / name
    _, params = write_tiny_checkpoint(directory, config, seed=3, edit_params=edit_params)
    windows = tiny_windows(directory, config)
    sensitivity_L, _, _ = calibrate.estimate_sensitivity(params, config, windows)
    return sensitivity_L


def edit_experts(params, edit):
    layers = dict(params["layers"])
    layers.update(edit(layers["w1"], layers["w3"], layers["w2"]))
    return {**params, "layers": layers}


def make_experts_alike_except(layer):
    """Pull every layer's experts towards expert 0, except in `layer`."""

    def edit(params):
        def pull(w1, w3, w2):
            keep = jnp.arange(CONFIG.num_hidden_layers) == layer
            factor = jnp.where(keep, 1.0, 0.05)[:, None, None, None]
            return {name: w[:, :1] + factor * (w - w[:, :1])
                    for name, w in (("w1", w1), ("w3", w3), ("w2", w2))}
        return edit_experts(params, pull)

    return edit


def damp_layers_from(first):
    def edit(params):
        def damp(w1, w3, w2):
            scale = jnp.where(jnp.arange(CONFIG.num_hidden_layers) >= first, 0.01, 1.0)
            return {"w2": w2 * scale[:, None, None, None]}
        return edit_experts(params, damp)

    return edit


def test_sensitivity_peaks_at_distinct_layer(tmp_path):
    sensitivity_L = sensitivity_of(tmp_path, "distinct", make_experts_alike_except(2))
    assert np.argmax(sensitivity_L) == 2
    others = np.delete(sensitivity_L, 2)
    assert sensitivity_L[2] > 10 * others.max()


def test_damped_layers_lose_sensitivity(tmp_path):
    plain_L = sensitivity_of(tmp_path, "plain")
    damped_L = sensitivity_of(tmp_path, "damped", damp_layers_from(2))
    assert (damped_L[2:] < 0.01 * plain_L[2:]).all()
    np.testing.assert_allclose(damped_L[:2], plain_L[:2], rtol=0.5)
    assert damped_L[2:].max() < damped_L[:2].min()


def test_sensitivity_matches_finite_differences(tmp_path):
    config = tiny_config()
    directory = tmp_path / "small"
    _, params = write_tiny_checkpoint(directory, config, seed=5)
    windows = tiny_windows(directory, config, text=TEXT[:11])
    assert windows.num_windows == 1
    sensitivity_L, _, _ = calibrate.estimate_sensitivity(params, config, windows)

    inputs, targets = jnp.asarray(windows.inputs_WT), jnp.asarray(windows.targets_WT)
    thresholds = jnp.zeros(config.num_hidden_layers, jnp.float32)

    def window_loss(delta_LBTD):
        outputs = scoring.probe_forward(params, config, inputs, thresholds, delta_LBTD)
        return jnp.sum(scoring.token_nll(outputs.logits_BTV, targets))

    gap_LBTD = scoring.probe_forward(params, config, inputs, thresholds,
                                     with_expert_gap=True).expert_gap_LBTD
    num_layers, _, num_tokens, _ = gap_LBTD.shape
    zero = jnp.zeros(gap_LBTD.shape, jnp.float32)

    @jax.jit
    def slope(layer, position):
        """Forward-mode derivative of the loss along the gap at one (layer, position)."""
        direction = zero.at[layer, 0, position].set(gap_LBTD[layer, 0, position])
        return jax.jvp(window_loss, (zero,), (direction,))[1]

    expected_L = np.zeros(num_layers)
    for layer in range(num_layers):
        for position in range(num_tokens):
            expected_L[layer] += float(slope(layer, position)) ** 2 / num_tokens
    np.testing.assert_allclose(sensitivity_L, expected_L, rtol=1e-4)


def test_calibrate_reports_prefetch_and_single_ratio(tmp_path):
    directory = tmp_path / "ratios"
    _, params = write_tiny_checkpoint(directory, CONFIG, seed=3)
    windows = tiny_windows(directory, CONFIG)
    result = calibrate.calibrate(params, CONFIG, windows, gate_budget=0.0)
    assert result.num_tokens == len(TEXT)
    assert result.single_expert_ratio == [0.0] * CONFIG.num_hidden_layers
    assert result.prefetch_accuracy[0] == 0.0
    assert all(0.0 <= value <= 1.0 for value in result.prefetch_accuracy)

    large_budget = float(np.max(result.layer_sensitivity))
    gated = calibrate.calibrate(params, CONFIG, windows, gate_budget=large_budget)
    assert min(gated.single_expert_ratio) > 0.0
    assert gated.layer_sensitivity == result.layer_sensitivity


# --- Command line -------------------------------------------------------------------------

def run_calibrate(*args):
    return subprocess.run([sys.executable, "-m", "adapmoe_jax.calibrate", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibrate_cli")
    write_tiny_checkpoint(directory, CONFIG, seed=3)
    write_text(directory / "text.txt", TEXT)
    return directory


def test_cli_writes_loadable_profile(checkpoint_dir, tmp_path):
    output = tmp_path / "profile.json"
    result = run_calibrate(f"--checkpoint={checkpoint_dir}",
                           f"--text_file={checkpoint_dir / 'text.txt'}",
                           f"--output={output}", f"--context_length={CONTEXT_LENGTH}",
                           "--gate_budget=0.01")
    assert result.returncode == 0, result.stderr
    assert "window 5 of 5" in result.stderr
    profile = profiles.load_profile(str(output))
    assert profile.num_layers == CONFIG.num_hidden_layers
    assert profile.num_experts == CONFIG.num_local_experts
    assert profile.top_k == CONFIG.num_experts_per_tok
    assert profile.gate_budget == 0.01
    assert len(profile.layer_sensitivity) == CONFIG.num_hidden_layers
    assert min(profile.layer_sensitivity) > 0.0
    assert len(profile.single_expert_ratio) == CONFIG.num_hidden_layers
    assert profile.prefetch_accuracy[0] == 0.0
    assert set(json.loads(output.read_text())) >= {"source", "notes"}


def test_cli_profile_drives_evaluation(checkpoint_dir, tmp_path):
    output = tmp_path / "profile.json"
    result = run_calibrate(f"--checkpoint={checkpoint_dir}",
                           f"--text_file={checkpoint_dir / 'text.txt'}",
                           f"--output={output}", f"--context_length={CONTEXT_LENGTH}")
    assert result.returncode == 0, result.stderr
    evaluation = subprocess.run(
        [sys.executable, "-m", "adapmoe_jax.evaluate", f"--checkpoint={checkpoint_dir}",
         f"--text_file={checkpoint_dir / 'text.txt'}", f"--context_length={CONTEXT_LENGTH}",
         "--adapgate", f"--profile={output}", "--gate_budget=0.005"],
        capture_output=True, text=True, timeout=120)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "gating sensitivity, budget 0.005" in evaluation.stdout


@pytest.mark.parametrize("case", [
    "text shorter than context", "missing output", "negative budget", "not UTF-8",
    "one expert per token"])
def test_cli_bad_input_exits_2(checkpoint_dir, tmp_path, case):
    text = f"--text_file={checkpoint_dir / 'text.txt'}"
    output = f"--output={tmp_path / 'profile.json'}"
    checkpoint = f"--checkpoint={checkpoint_dir}"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    if case == "one expert per token":
        single = tmp_path / "single"
        write_tiny_checkpoint(single, tiny_config(num_experts_per_tok=1))
        write_text(single / "text.txt", TEXT)
        checkpoint, text = f"--checkpoint={single}", f"--text_file={single / 'text.txt'}"
    cases = {
        "text shorter than context": ([text, output, "--context_length=200"],
                                      "--context_length=200"),
        "missing output": ([text], "--output"),
        "negative budget": ([text, output, "--gate_budget=-1"], "--gate_budget"),
        "not UTF-8": ([f"--text_file={latin1}", output], "not UTF-8"),
        "one expert per token": ([text, output, f"--context_length={CONTEXT_LENGTH}"],
                                 "num_experts_per_tok=1"),
    }
    args, expected = cases[case]
    result = run_calibrate(checkpoint, *args)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0]
    assert "Traceback" not in result.stderr
