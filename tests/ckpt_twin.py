"""A tiny twin of the published Mixtral-8x7B checkpoint, for conversion tests.

The twin keeps what a loader can get wrong about the real checkpoint: the same 32
layers and 8 experts, the same 995 tensor names, and the same assignment of tensors
to 19 shards as the real `model.safetensors.index.json`. Only the dimensions shrink
(D=16, F=24, V=64, 4 query heads and 2 KV heads of width 4), so the whole twin is
about 1 MB and converts in seconds. Values are seeded random bfloat16, the real
checkpoint's dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from adapmoe_jax.ckpt import hf
from adapmoe_jax.ckpt.safetensors_io import INDEX_FILENAME, save_file, write_index
from adapmoe_jax.config import MixtralConfig

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "data", "mixtral-8x7b")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")

TWIN_DIMS = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "vocab_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
}


def reference_weight_map() -> dict[str, str]:
    """The real {tensor name: shard file name} of Mixtral-8x7B."""
    with open(os.path.join(REFERENCE_DIR, INDEX_FILENAME), encoding="utf-8") as f:
        return json.load(f)["weight_map"]


def twin_hf_config(**overrides) -> dict:
    """The real config.json with the twin's dimensions and then `overrides` applied."""
    with open(os.path.join(REFERENCE_DIR, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    hf_config.update(TWIN_DIMS)
    hf_config.update(overrides)
    return hf_config


def write_twin(directory: str, seed: int = 0, dtype=ml_dtypes.bfloat16,
               config_overrides: Mapping | None = None,
               shape_overrides: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """Write the twin checkpoint into `directory` (created); return its config dict.

    `config_overrides` changes config.json after the tensors' shapes are computed,
    so it can make config and tensors disagree. `shape_overrides` gives chosen
    tensors a different shape.
    """
    hf_config = twin_hf_config()
    config = MixtralConfig.from_hf_dict(hf_config)
    targets = hf.tensor_targets(config, hf.PER_EXPERT)
    weight_map = reference_weight_map()
    assert set(targets) == set(weight_map), "the twin config does not match the index"

    shapes = {name: hf.hf_shape(config, target.spec) for name, target in targets.items()}
    shapes.update(shape_overrides or {})
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    total_size = 0
    for shard_name in sorted(set(weight_map.values())):
        names = sorted(n for n, shard in weight_map.items() if shard == shard_name)
        tensors = {name: _random_tensor(rng, shapes[name], dtype) for name in names}
        total_size += sum(t.nbytes for t in tensors.values())
        save_file(os.path.join(directory, shard_name), tensors, metadata={"format": "pt"})
    write_index(directory, weight_map, total_size)

    hf_config.update(config_overrides or {})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(REFERENCE_DIR, name), os.path.join(directory, name))
    return hf_config


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def read_twin_tensor(directory: str, name: str) -> np.ndarray:
    """Read one tensor of a twin with the safetensors library's own reader."""
    from safetensors import safe_open

    shard_name = reference_weight_map()[name]
    with safe_open(os.path.join(directory, shard_name), framework="pt") as f:
        tensor = f.get_tensor(name)
    return tensor.float().numpy()
