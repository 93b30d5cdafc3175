"""End-to-end command tests: generate and evaluate on an HF checkpoint and its converted copy."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tiny_checkpoint import write_char_tokenizer, write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Saved by transformers' save_pretrained (see scripts/make_reference_fixtures.py).
HF_FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures", "gqa4")
# Letters only: the character tokenizer maps them below the fixture's 96 ids.
PROMPT = "onceupon"
TEXT = "thefoxrantotheriveranddrankandsleptunderanoldtreeuntilthesunwentdown" * 3


def run_module(module, *args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    hf_dir = root / "hf"
    shutil.copytree(HF_FIXTURE, hf_dir)
    os.remove(hf_dir / "reference.npz")
    write_char_tokenizer(str(hf_dir))
    converted = root / "converted"
    result = run_module("adapmoe_jax.convert", f"--hf_dir={hf_dir}", f"--out_dir={converted}")
    assert result.returncode == 0, result.stderr
    text_file = root / "text.txt"
    write_text(text_file, TEXT)
    return hf_dir, converted, text_file


def generate(checkpoint, out_json, *flags):
    result = run_module("adapmoe_jax.generate", f"--checkpoint={checkpoint}",
                        f"--prompt={PROMPT}", "--max_new_tokens=12",
                        f"--output_json={out_json}", *flags)
    assert result.returncode == 0, result.stderr
    with open(out_json, encoding="utf-8") as f:
        return result, json.load(f)


@pytest.mark.parametrize("cache_size", ["2", "64"])
def test_generate_converted_equals_hf(checkpoints, tmp_path, cache_size):
    hf_dir, converted, _ = checkpoints
    hf_run, hf_out = generate(hf_dir, tmp_path / "hf.json", f"--cache_size={cache_size}")
    conv_run, conv_out = generate(converted, tmp_path / "conv.json",
                                  f"--cache_size={cache_size}")
    assert hf_out["generated_token_ids"] == conv_out["generated_token_ids"]
    assert hf_out["text"] == conv_out["text"]
    assert len(hf_out["generated_token_ids"]) == 12
    # The text streams to stdout after the prompt; the summary goes to stderr.
    assert hf_run.stdout.startswith(PROMPT)
    assert "expert loads per token" in hf_run.stderr


def test_generate_reports_cache_statistics(checkpoints, tmp_path):
    hf_dir, _, _ = checkpoints
    _, out = generate(hf_dir, tmp_path / "out.json", "--cache_size=2")
    stats = out["stats"]
    for key in ("expert_loads_per_token", "cache_hit_rate", "bytes_host_to_device",
                "prefill_tokens_per_second", "decode_tokens_per_second"):
        assert key in stats
    assert stats["expert_loads_per_token"] > 0
    assert out["prompt_token_ids"][0] == 1


def test_generate_resident_equals_offloaded(checkpoints, tmp_path):
    hf_dir, _, _ = checkpoints
    _, offloaded = generate(hf_dir, tmp_path / "a.json", "--cache_size=0")
    _, resident = generate(hf_dir, tmp_path / "b.json", "--cache_size=8")
    assert offloaded["generated_token_ids"] == resident["generated_token_ids"]
    assert resident["stats"]["cache_hit_rate"] == 1.0


def test_evaluate_converted_equals_hf(checkpoints, tmp_path):
    hf_dir, converted, text_file = checkpoints
    outputs = []
    for checkpoint in (hf_dir, converted):
        out_json = tmp_path / f"{checkpoint.name}.json"
        result = run_module("adapmoe_jax.evaluate", f"--checkpoint={checkpoint}",
                            f"--text_file={text_file}", "--context_length=32",
                            f"--output_json={out_json}")
        assert result.returncode == 0, result.stderr
        with open(out_json, encoding="utf-8") as f:
            outputs.append(json.load(f))
    assert outputs[0]["nll"] == outputs[1]["nll"]
    assert outputs[0]["perplexity"] == outputs[1]["perplexity"]


@pytest.mark.parametrize("flags, message", [
    (["--prompt="], "prompt is empty"),
    (["--max_new_tokens=100"], "max_position_embeddings"),
    (["--cache_size=-3"], "--cache_size=-3"),
    (["--temperature=-1"], "--temperature"),
    (["--adapgate"], "calibrate"),
])
def test_generate_bad_input(checkpoints, flags, message):
    hf_dir, _, _ = checkpoints
    result = run_module("adapmoe_jax.generate", f"--checkpoint={hf_dir}",
                        f"--prompt={PROMPT}", "--max_new_tokens=8", *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("module, flags", [
    ("adapmoe_jax.generate", ["--max_new_tokens=abc"]),
    ("adapmoe_jax.evaluate", ["--context_length=1.5"]),
    ("adapmoe_jax.convert", ["--hf_dir=somewhere"]),
])
def test_bad_flag_is_one_error_line(module, flags):
    result = run_module(module, *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: flag --")


def test_generate_missing_checkpoint(tmp_path):
    result = run_module("adapmoe_jax.generate", f"--checkpoint={tmp_path / 'missing'}")
    assert result.returncode == 2
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr
