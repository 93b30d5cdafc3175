"""Tests for safetensors reading, the HF name map, the expert store and HF export."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from adapmoe_jax.ckpt import hf, safetensors_io
from adapmoe_jax.ckpt.expert_store import ExpertStore, unflatten_expert
from adapmoe_jax.ckpt.loading import load_checkpoint, load_params, save_hf_checkpoint
from adapmoe_jax.ckpt.safetensors_io import SafetensorsCheckpoint, SafetensorsFile
from adapmoe_jax.config import MixtralConfig, tiny_config
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.model import transformer

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "data", "mixtral-8x7b")

TINY_HF = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=4,
               num_local_experts=4, num_experts_per_tok=2)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bf16": rng.standard_normal((4, 2, 3)).astype(ml_dtypes.bfloat16),
        "c.i64": np.arange(7, dtype=np.int64),
        "d.scalar": np.array(2.5, np.float16),
    }


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for path, a in jax.tree_util.tree_leaves_with_path(actual):
        e = expected
        for key in path:
            e = e[key.key]
        assert np.asarray(a).dtype == np.asarray(e).dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=str(path))


# --- safetensors ---------------------------------------------------------------

def test_safetensors_round_trip(tmp_path):
    path = str(tmp_path / "t.safetensors")
    tensors = _tensors()
    safetensors_io.save_file(path, tensors, metadata={"format": "pt"})

    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"format": "pt"}
        for name, expected in tensors.items():
            actual = f.get(name)
            assert actual.dtype == expected.dtype
            np.testing.assert_array_equal(actual, expected)


def test_safetensors_reads_library_files(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file as np_save_file
    from safetensors.torch import save_file as torch_save_file

    np_path = str(tmp_path / "np.safetensors")
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    np_save_file({"x": f32}, np_path)
    np.testing.assert_array_equal(SafetensorsFile(np_path).get("x"), f32)

    torch_path = str(tmp_path / "pt.safetensors")
    bf16 = torch.randn(5, 6).to(torch.bfloat16)
    torch_save_file({"y": bf16, "z": torch.ones(2, dtype=torch.bfloat16)}, torch_path)
    actual = SafetensorsFile(torch_path).get("y")
    assert actual.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(actual.astype(np.float32), bf16.float().numpy())


def test_safetensors_written_files_load_in_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    path = str(tmp_path / "t.safetensors")
    tensors = _tensors()
    safetensors_io.save_file(path, tensors)
    with safe_open(path, framework="pt") as f:
        bf16 = f.get_tensor("b.bf16")
        f32 = f.get_tensor("a.f32")
    assert bf16.dtype == torch.bfloat16
    np.testing.assert_array_equal(bf16.float().numpy(),
                                  tensors["b.bf16"].astype(np.float32))
    np.testing.assert_array_equal(f32.numpy(), tensors["a.f32"])


def _write_raw(path, header_length, header: bytes, data: bytes):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_length) + header + data)


def test_safetensors_truncated_files_raise(tmp_path):
    path = str(tmp_path / "t.safetensors")
    safetensors_io.save_file(path, _tensors())
    size = os.path.getsize(path)

    os.truncate(path, size - 1)
    with pytest.raises(UserInputError, match=r"truncated .*t\.safetensors.*d.scalar"):
        SafetensorsFile(path)

    header = json.dumps({"x": {"dtype": "F32", "shape": [2],
                               "data_offsets": [0, 8]}}).encode()
    _write_raw(path, len(header) + 100, header, b"\0" * 8)
    with pytest.raises(UserInputError, match="header length .* exceeds the file size"):
        SafetensorsFile(path)

    _write_raw(path, len(header), header, b"\0" * 4)
    with pytest.raises(UserInputError, match="tensor x ends at data byte 8"):
        SafetensorsFile(path)

    with open(path, "wb") as f:
        f.write(b"\x01\x02")
    with pytest.raises(UserInputError, match="only 2 bytes"):
        SafetensorsFile(path)


def test_safetensors_inconsistent_offsets_raise(tmp_path):
    path = str(tmp_path / "t.safetensors")
    header = json.dumps({"x": {"dtype": "F32", "shape": [3],
                               "data_offsets": [0, 8]}}).encode()
    _write_raw(path, len(header), header, b"\0" * 12)
    with pytest.raises(UserInputError, match=r"invalid data_offsets \[0, 8\] for x"):
        SafetensorsFile(path)


def _write_sharded(directory, weight_map):
    os.makedirs(directory, exist_ok=True)
    for shard in sorted(set(weight_map.values())):
        names = [n for n, s in weight_map.items() if s == shard]
        safetensors_io.save_file(os.path.join(directory, shard),
                                 {n: np.full((2,), i, np.float32) for i, n in enumerate(names)})
    safetensors_io.write_index(directory, weight_map, 0)


def test_sharded_checkpoint_reads_lazily(tmp_path):
    weight_map = {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}
    _write_sharded(str(tmp_path), weight_map)

    checkpoint = SafetensorsCheckpoint(str(tmp_path))
    assert checkpoint.shard_names == ["s1.safetensors", "s2.safetensors"]
    assert checkpoint.names_in_shard("s2.safetensors") == ["b", "c"]
    assert checkpoint.shapes() == {"a": (2,), "b": (2,), "c": (2,)}
    np.testing.assert_array_equal(checkpoint.get("c"), [1.0, 1.0])
    checkpoint.close()


def test_sharded_checkpoint_missing_shard_raises(tmp_path):
    _write_sharded(str(tmp_path), {"a": "s1.safetensors", "b": "s2.safetensors"})
    os.remove(tmp_path / "s2.safetensors")
    with pytest.raises(UserInputError, match=r"missing shard .*s2\.safetensors"):
        SafetensorsCheckpoint(str(tmp_path))


def test_sharded_checkpoint_missing_tensor_raises(tmp_path):
    _write_sharded(str(tmp_path), {"a": "s1.safetensors", "b": "s2.safetensors"})
    safetensors_io.write_index(str(tmp_path), {"a": "s1.safetensors",
                                               "b": "s2.safetensors",
                                               "extra": "s2.safetensors"}, 0)
    with pytest.raises(UserInputError, match=r"tensor extra not found in .*s2\.safetensors"):
        SafetensorsCheckpoint(str(tmp_path))


def test_checkpoint_unreadable_directory_raises(tmp_path):
    with pytest.raises(UserInputError, match="cannot read checkpoint directory .*nope"):
        SafetensorsCheckpoint(str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match="no .safetensors file"):
        SafetensorsCheckpoint(str(tmp_path))


# --- HF name map ---------------------------------------------------------------

def test_name_map_matches_real_index():
    config = MixtralConfig.from_json_file(os.path.join(REFERENCE_DIR, "config.json"))
    with open(os.path.join(REFERENCE_DIR, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]

    targets = hf.tensor_targets(config, hf.PER_EXPERT)

    assert len(weight_map) == 995
    assert set(targets) == set(weight_map)
    assert hf.detect_layout(list(weight_map), "index") == hf.PER_EXPERT
    w1 = targets["model.layers.3.block_sparse_moe.experts.5.w1.weight"]
    assert hf.hf_shape(config, w1.spec) == (14336, 4096)


def test_check_tensors_wrong_shape_raises():
    config = MixtralConfig.from_hf_dict(dict(TINY_HF, model_type="mixtral"))
    shapes = {name: hf.hf_shape(config, t.spec)
              for name, t in hf.tensor_targets(config, hf.FUSED).items()}
    shapes["model.layers.1.mlp.experts.down_proj"] = (4, 24, 16)

    with pytest.raises(UserInputError, match=r"down_proj in src has shape \[4, 24, 16\], "
                                             r"expected \[4, 16, 24\]"):
        hf.check_tensors(config, hf.FUSED, shapes, "src")


def test_check_tensors_unexpected_and_missing_raise():
    config = MixtralConfig.from_hf_dict(dict(TINY_HF, model_type="mixtral"))
    shapes = {name: hf.hf_shape(config, t.spec)
              for name, t in hf.tensor_targets(config, hf.PER_EXPERT).items()}

    with pytest.raises(UserInputError, match="unexpected tensor model.layers.0.mlp.bias"):
        hf.check_tensors(config, hf.PER_EXPERT, {**shapes, "model.layers.0.mlp.bias": (4,)},
                         "src")
    del shapes["model.norm.weight"]
    with pytest.raises(UserInputError, match="tensor model.norm.weight missing"):
        hf.check_tensors(config, hf.PER_EXPERT, shapes, "src")


# --- Expert store --------------------------------------------------------------

def _random_experts(num_layers=2, num_experts=3, num_d=4, num_f=5, dtype=np.float32):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((num_layers, num_experts, num_d, num_f)).astype(dtype)
    w3 = rng.standard_normal((num_layers, num_experts, num_d, num_f)).astype(dtype)
    w2 = rng.standard_normal((num_layers, num_experts, num_f, num_d)).astype(dtype)
    return w1, w3, w2


def test_expert_store_accessors():
    w1, w3, w2 = _random_experts()
    store = ExpertStore.from_arrays(w1, w3, w2)

    assert store.expert_size == 3 * 4 * 5
    assert store.expert_nbytes == 60 * 4
    flat = store.expert_flat(1, 2)
    assert flat.shape == (60,)
    assert flat.flags.c_contiguous
    np.testing.assert_array_equal(flat[:20], w1[1, 2].ravel())
    for actual, expected in zip(store.expert(1, 2), (w1[1, 2], w3[1, 2], w2[1, 2])):
        np.testing.assert_array_equal(actual, expected)
    for actual, expected in zip(store.layer_stacked(0), (w1[0], w3[0], w2[0])):
        np.testing.assert_array_equal(actual, expected)
    for actual, expected in zip(store.all_stacked(), (w1, w3, w2)):
        np.testing.assert_array_equal(actual, expected)


def test_unflatten_expert_under_jit():
    w1, w3, w2 = _random_experts()
    store = ExpertStore.from_arrays(w1, w3, w2)
    flat_P = jnp.asarray(store.expert_flat(0, 1))

    unflatten = jax.jit(lambda flat: unflatten_expert(flat, 4, 5))
    for actual, expected in zip(unflatten(flat_P), store.expert(0, 1)):
        np.testing.assert_array_equal(np.asarray(actual), expected)


def test_expert_store_save_open_round_trip(tmp_path):
    w1, w3, w2 = _random_experts(dtype=ml_dtypes.bfloat16)
    store = ExpertStore.from_arrays(w1, w3, w2)
    store.save(str(tmp_path))

    opened = ExpertStore.open(str(tmp_path))

    assert isinstance(opened.flat_LEP, np.memmap)
    assert opened.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(opened.flat_LEP, store.flat_LEP)
    assert os.path.getsize(tmp_path / "experts.bin") == store.nbytes


def test_expert_store_truncated_bin_raises(tmp_path):
    ExpertStore.from_arrays(*_random_experts()).save(str(tmp_path))
    os.truncate(tmp_path / "experts.bin", 100)
    with pytest.raises(UserInputError, match=r"experts\.bin has 100 bytes, expected 1440"):
        ExpertStore.open(str(tmp_path))


# --- HF checkpoints from transformers ------------------------------------------

def _tiny_transformers_model(tie_word_embeddings=False):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**TINY_HF, tie_word_embeddings=tie_word_embeddings)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # The default init leaves the norms at 1; randomize them too.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _numpy(tensor):
    return tensor.detach().float().numpy()


def _assert_matches_transformers(params, model, config):
    """Compare full params with the fused parameters of a transformers 5 model."""
    state = {name: _numpy(p) for name, p in model.state_dict().items()}
    layers = params["layers"]
    num_f = config.intermediate_size
    as_f32 = lambda x: np.asarray(x).astype(np.float32)
    np.testing.assert_array_equal(as_f32(params["embed"]), state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        gate_up = state[prefix + "mlp.experts.gate_up_proj"]
        np.testing.assert_array_equal(as_f32(layers["w1"][layer]),
                                      gate_up[:, :num_f].transpose(0, 2, 1))
        np.testing.assert_array_equal(as_f32(layers["w3"][layer]),
                                      gate_up[:, num_f:].transpose(0, 2, 1))
        np.testing.assert_array_equal(as_f32(layers["w2"][layer]),
                                      state[prefix + "mlp.experts.down_proj"].transpose(0, 2, 1))
        np.testing.assert_array_equal(as_f32(layers["router"][layer]),
                                      state[prefix + "mlp.gate.weight"].T)
        np.testing.assert_array_equal(as_f32(layers["q_proj"][layer]),
                                      state[prefix + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(as_f32(layers["post_attention_norm"][layer]),
                                      state[prefix + "post_attention_layernorm.weight"])


def test_load_transformers_save_pretrained(tmp_path):
    model = _tiny_transformers_model()
    model.save_pretrained(str(tmp_path))

    config, params = load_params(str(tmp_path))

    # transformers 5.25 writes the per-expert layout, not its fused one.
    names = SafetensorsCheckpoint(str(tmp_path)).names()
    assert hf.detect_layout(names, str(tmp_path)) == hf.PER_EXPERT
    assert config.dtype == "float32"
    _assert_matches_transformers(params, model, config)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]),
                                  _numpy(model.lm_head.weight).T)


def test_load_fused_state_dict(tmp_path):
    model = _tiny_transformers_model()
    from safetensors.torch import save_file as torch_save_file

    model.config.save_pretrained(str(tmp_path))
    torch_save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                    str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    config, params = load_params(str(tmp_path))

    names = SafetensorsCheckpoint(str(tmp_path)).names()
    assert hf.detect_layout(names, str(tmp_path)) == hf.FUSED
    _assert_matches_transformers(params, model, config)


def _fuse_expert_tensors(tensors, config):
    """Rewrite per-expert HF tensors into transformers 5's fused in-memory layout."""
    fused = {}
    for name, value in tensors.items():
        if ".block_sparse_moe." not in name:
            fused[name] = value
    for layer in range(config.num_hidden_layers):
        old = f"model.layers.{layer}.block_sparse_moe."
        new = f"model.layers.{layer}.mlp."
        experts = range(config.num_local_experts)
        # Gate half first: rows [:F] are w1, rows [F:] are w3.
        fused[new + "experts.gate_up_proj"] = np.stack([
            np.concatenate([tensors[f"{old}experts.{e}.w1.weight"],
                            tensors[f"{old}experts.{e}.w3.weight"]], axis=0) for e in experts])
        fused[new + "experts.down_proj"] = np.stack(
            [tensors[f"{old}experts.{e}.w2.weight"] for e in experts])
        fused[new + "gate.weight"] = tensors[old + "gate.weight"]
    return fused


def test_load_fused_layout_without_torch(tmp_path):
    config = tiny_config()
    params = jax.device_get(transformer.init_params(config, seed=7))
    per_expert_dir = tmp_path / "per_expert"
    save_hf_checkpoint(config, params, str(per_expert_dir))
    source = SafetensorsFile(str(per_expert_dir / "model.safetensors"))
    tensors = {name: np.array(source.get(name)) for name in source.keys()}
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    config.save_hf_json(str(fused_dir / "config.json"))
    safetensors_io.save_file(str(fused_dir / "model.safetensors"),
                             _fuse_expert_tensors(tensors, config))

    names = SafetensorsCheckpoint(str(fused_dir)).names()
    assert hf.detect_layout(names, str(fused_dir)) == hf.FUSED
    _, loaded = load_params(str(fused_dir))
    for path, expected in jax.tree_util.tree_leaves_with_path(params):
        got = loaded
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=str(path))


def test_load_tied_embeddings_has_no_lm_head(tmp_path):
    model = _tiny_transformers_model(tie_word_embeddings=True)
    model.save_pretrained(str(tmp_path))

    config, params, _ = load_checkpoint(str(tmp_path))

    assert config.tie_word_embeddings
    assert "lm_head" not in params


def test_load_checkpoint_rejects_other_directory(tmp_path):
    with pytest.raises(UserInputError, match="neither an HF checkpoint"):
        load_checkpoint(str(tmp_path))


# --- HF export -----------------------------------------------------------------

def _random_full_params(config, dtype):
    rng = np.random.default_rng(2)
    shapes = dict(hf.nonexpert_shapes(config))
    num_layers, num_experts = config.num_hidden_layers, config.num_local_experts
    num_d, num_f = config.hidden_size, config.intermediate_size
    shapes.update({"layers/w1": (num_layers, num_experts, num_d, num_f),
                   "layers/w3": (num_layers, num_experts, num_d, num_f),
                   "layers/w2": (num_layers, num_experts, num_f, num_d)})
    flat = {key: jnp.asarray(rng.standard_normal(shape).astype(dtype))
            for key, shape in shapes.items()}
    return hf.nest_params(flat)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_save_hf_checkpoint_round_trip(tmp_path, dtype_name):
    config = tiny_config(dtype=dtype_name)
    params = _random_full_params(config, config.jax_dtype)

    save_hf_checkpoint(config, params, str(tmp_path))
    loaded_config, loaded = load_params(str(tmp_path))

    assert loaded_config == config
    _assert_trees_equal(loaded, params)


def test_save_hf_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = MixtralConfig.from_hf_dict(dict(TINY_HF, model_type="mixtral"))
    params = _random_full_params(config, np.float32)

    save_hf_checkpoint(config, params, str(tmp_path))
    model = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path))

    _assert_matches_transformers(params, model, config)


def test_loaded_fixture_reproduces_reference_logits():
    """Loading a transformers-saved checkpoint gives the logits transformers computed."""
    transformer = pytest.importorskip("adapmoe_jax.model.transformer")
    fixture_dir = os.path.join(os.path.dirname(__file__), "fixtures", "gqa4")
    reference = np.load(os.path.join(fixture_dir, "reference.npz"))

    config, params = load_params(fixture_dir)
    logits_BTV, _, _ = transformer.forward(params, config,
                                           jnp.asarray(reference["prompt_ids"])[None])

    np.testing.assert_allclose(np.asarray(logits_BTV)[0], reference["prefill_logits"],
                               atol=1e-5, rtol=1e-5)
