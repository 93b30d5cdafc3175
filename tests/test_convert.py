"""Tests for checkpoint conversion, on a tiny twin of the real Mixtral-8x7B checkpoint."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import ckpt_twin
from adapmoe_jax.ckpt.converted import convert_checkpoint
from adapmoe_jax.ckpt.expert_store import ExpertStore
from adapmoe_jax.ckpt.loading import load_checkpoint
from adapmoe_jax.errors import UserInputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_SHARD = "model-00001-of-00019.safetensors"
LAST_SHARD = "model-00019-of-00019.safetensors"


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("twin") / "hf")
    ckpt_twin.write_twin(directory)
    return directory


@pytest.fixture(scope="module")
def converted_dir(twin_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("converted") / "out")
    convert_checkpoint(twin_dir, out_dir)
    return out_dir


def _assert_same_checkpoint(actual, expected):
    config_a, params_a, store_a = actual
    config_e, params_e, store_e = expected
    assert config_a == config_e
    assert jax.tree.structure(params_a) == jax.tree.structure(params_e)
    for a, e in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_e)):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert store_a.dtype == store_e.dtype
    np.testing.assert_array_equal(store_a.flat_LEP, store_e.flat_LEP)


def _assert_no_output(out_dir):
    """Check that neither out_dir nor a temporary directory next to it is left."""
    parent = os.path.dirname(out_dir)
    assert not os.path.exists(out_dir)
    assert [name for name in os.listdir(parent) if ".tmp-" in name] == []


# --- Successful conversion ----------------------------------------------------------

def test_convert_twin_writes_files(converted_dir):
    names = set(os.listdir(converted_dir))

    assert {"config.json", "params", "experts.bin", "experts.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"} <= names
    with open(os.path.join(converted_dir, "experts.json")) as f:
        meta = json.load(f)
    assert (meta["dtype"], meta["num_layers"], meta["num_experts"]) == ("bfloat16", 32, 8)
    assert os.path.getsize(os.path.join(converted_dir, "experts.bin")) == (
        32 * 8 * 3 * 16 * 24 * 2)


def test_converted_equals_hf_load(twin_dir, converted_dir):
    from_hf = load_checkpoint(twin_dir)
    from_converted = load_checkpoint(converted_dir)

    _assert_same_checkpoint(from_converted, from_hf)
    assert from_converted[0].dtype == "bfloat16"
    assert isinstance(from_converted[2].flat_LEP, np.memmap)


def test_converted_matches_safetensors_library(twin_dir, converted_dir):
    pytest.importorskip("torch")
    _, params, store = load_checkpoint(converted_dir)
    w1_name = "model.layers.31.block_sparse_moe.experts.7.w1.weight"
    w2_name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    k_name = "model.layers.12.self_attn.k_proj.weight"

    w1, _, _ = store.expert(31, 7)
    _, _, w2 = store.expert(0, 3)
    k_proj = params["layers"]["k_proj"][12]

    for ours, name in ((w1, w1_name), (w2, w2_name), (k_proj, k_name)):
        expected = ckpt_twin.read_twin_tensor(twin_dir, name).T
        np.testing.assert_array_equal(np.asarray(ours).astype(np.float32), expected)


def test_convert_to_float32(twin_dir, converted_dir, tmp_path):
    out_dir = str(tmp_path / "f32")

    convert_checkpoint(twin_dir, out_dir, dtype="float32")
    config, params, store = load_checkpoint(out_dir)
    _, params_bf16, store_bf16 = load_checkpoint(converted_dir)

    assert config.dtype == "float32"
    assert store.dtype == np.float32
    np.testing.assert_array_equal(store.flat_LEP,
                                  store_bf16.flat_LEP.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(params["embed"]),
                                  np.asarray(params_bf16["embed"]).astype(np.float32))


def test_converted_rejects_other_dtype(converted_dir):
    with pytest.raises(UserInputError, match="stores bfloat16, not float32"):
        load_checkpoint(converted_dir, dtype="float32")


# --- Output directory handling ---------------------------------------------------

def test_convert_existing_out_dir_raises(twin_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("old")

    with pytest.raises(UserInputError, match="already exists; pass --overwrite"):
        convert_checkpoint(twin_dir, str(out_dir))
    assert os.listdir(out_dir) == ["keep.txt"]


def test_convert_overwrite_replaces_out_dir(twin_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("old")

    convert_checkpoint(twin_dir, str(out_dir), overwrite=True)

    assert not (out_dir / "keep.txt").exists()
    assert ExpertStore.open(str(out_dir)).num_layers == 32
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_convert_interrupted_removes_temp_dir(twin_dir, tmp_path):
    out_dir = str(tmp_path / "out")

    def interrupt(progress):
        if progress.index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(twin_dir, out_dir, on_shard=interrupt)
    _assert_no_output(out_dir)
    assert os.listdir(tmp_path) == []


# --- Bad input -------------------------------------------------------------------

def test_convert_missing_shard_raises(tmp_path):
    twin = str(tmp_path / "hf")
    ckpt_twin.write_twin(twin)
    os.remove(os.path.join(twin, "model-00007-of-00019.safetensors"))
    out_dir = str(tmp_path / "out")

    with pytest.raises(UserInputError, match=r"missing shard .*model-00007-of-00019"):
        convert_checkpoint(twin, out_dir)
    _assert_no_output(out_dir)


def test_convert_truncated_shard_raises(tmp_path):
    twin = str(tmp_path / "hf")
    ckpt_twin.write_twin(twin)
    shard = os.path.join(twin, LAST_SHARD)
    os.truncate(shard, os.path.getsize(shard) - 100)
    out_dir = str(tmp_path / "out")

    with pytest.raises(UserInputError, match=r"truncated safetensors file .*00019"):
        convert_checkpoint(twin, out_dir)
    _assert_no_output(out_dir)


def test_convert_wrong_shape_raises(tmp_path):
    twin = str(tmp_path / "hf")
    name = "model.layers.9.block_sparse_moe.experts.2.w3.weight"
    ckpt_twin.write_twin(twin, shape_overrides={name: (16, 24)})
    out_dir = str(tmp_path / "out")

    with pytest.raises(UserInputError,
                       match=rf"{name} in .* has shape \[16, 24\], expected \[24, 16\]"):
        convert_checkpoint(twin, out_dir)
    _assert_no_output(out_dir)


def test_convert_config_mismatch_raises(tmp_path):
    twin = str(tmp_path / "hf")
    ckpt_twin.write_twin(twin, config_overrides={"intermediate_size": 32})
    out_dir = str(tmp_path / "out")

    with pytest.raises(UserInputError, match=r"expected \[32, 16\] from config.json"):
        convert_checkpoint(twin, out_dir)
    _assert_no_output(out_dir)


def test_convert_non_mixtral_config_raises(tmp_path):
    twin = str(tmp_path / "hf")
    ckpt_twin.write_twin(twin, config_overrides={"model_type": "llama"})
    out_dir = str(tmp_path / "out")

    with pytest.raises(UserInputError, match="unsupported model_type 'llama'"):
        convert_checkpoint(twin, out_dir)
    _assert_no_output(out_dir)


# --- Command line ----------------------------------------------------------------

def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "adapmoe_jax.convert", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_converts_and_logs_shards(twin_dir, tmp_path):
    out_dir = str(tmp_path / "out")

    result = _run_cli(f"--hf_dir={twin_dir}", f"--out_dir={out_dir}", "--dtype=float32")

    assert result.returncode == 0, result.stderr
    assert f"shard 19/19 {LAST_SHARD}: 33 expert tensors, 11 other tensors" in result.stderr
    assert f"shard 1/19 {FIRST_SHARD}" in result.stderr
    assert ExpertStore.open(out_dir).dtype == np.float32


def test_cli_bad_input_prints_one_line(tmp_path):
    missing = str(tmp_path / "missing")

    result = _run_cli(f"--hf_dir={missing}", f"--out_dir={tmp_path / 'out'}")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: config file not found: {missing}/config.json; pass a "
                           "checkpoint directory that contains config.json"]
    assert not os.path.exists(tmp_path / "out")


def test_twin_matches_real_index(twin_dir):
    with open(os.path.join(twin_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]

    assert weight_map == ckpt_twin.reference_weight_map()
    assert len(weight_map) == 995
    assert len(set(weight_map.values())) == 19
    assert ml_dtypes.bfloat16 == load_checkpoint(twin_dir)[2].dtype
