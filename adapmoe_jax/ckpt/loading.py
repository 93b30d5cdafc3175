"""Load a Mixtral checkpoint, HF or converted, and export params in HF format.

An HF directory has `config.json` and `*.safetensors` files (one file or shards with
`model.safetensors.index.json`), in either expert layout of `hf.py`. A converted
directory is what `python -m adapmoe_jax.convert` writes (see `converted.py`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax.ckpt import hf
from adapmoe_jax.ckpt.converted import CONFIG_JSON, is_converted_dir, read_converted
from adapmoe_jax.ckpt.expert_store import (EXPERT_PART_NAMES, ExpertStore,
                                           dtype_from_name, expert_size)
from adapmoe_jax.ckpt.safetensors_io import save_file
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError


def load_checkpoint(path: str, dtype: str | None = None
                    ) -> tuple[MixtralConfig, dict, ExpertStore]:
    """Return (config, non-expert params, expert store) from an HF or converted directory.

    The non-expert params are a nested dict of jax arrays (WORKSPACE.md layout, layers
    stacked on axis 0). `dtype` overrides the checkpoint's dtype. A converted
    checkpoint's experts stay memory-mapped on disk, and a converted checkpoint
    raises UserInputError for a `dtype` other than the stored one. An HF checkpoint
    is read into host memory whole, so convert large checkpoints first.
    """
    if is_converted_dir(path):
        return read_converted(path, dtype=dtype)
    if _is_hf_dir(path):
        return _read_hf(path, dtype)
    raise UserInputError(
        f"{path} is neither an HF checkpoint (config.json and *.safetensors) nor a "
        "converted checkpoint (experts.json); pass a checkpoint directory")


def load_params(path: str, dtype: str | None = None) -> tuple[MixtralConfig, dict]:
    """Return (config, full params) with `layers/w1`, `w3`, `w2` stacked in.

    For the all-resident path: every expert is copied onto the default device.
    """
    config, params, store = load_checkpoint(path, dtype=dtype)
    w1_LEDF, w3_LEDF, w2_LEFD = store.all_stacked()
    layers = dict(params["layers"])
    layers.update(w1=jnp.asarray(w1_LEDF), w3=jnp.asarray(w3_LEDF),
                  w2=jnp.asarray(w2_LEFD))
    return config, {**params, "layers": layers}


def _is_hf_dir(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, CONFIG_JSON)):
        return False
    return any(name.endswith(".safetensors") for name in os.listdir(path))


def _read_hf(path: str, dtype: str | None) -> tuple[MixtralConfig, dict, ExpertStore]:
    checkpoint = hf.open_checkpoint(path, dtype=dtype)
    config = checkpoint.config
    flat_LEP = np.empty(
        (config.num_hidden_layers, config.num_local_experts,
         expert_size(config.hidden_size, config.intermediate_size)),
        dtype_from_name(config.dtype))
    store = ExpertStore(flat_LEP, config.hidden_size, config.intermediate_size)

    def write_expert(layer: int, expert: int, part: str, array: np.ndarray) -> None:
        store.expert(layer, expert)[EXPERT_PART_NAMES.index(part)][...] = array

    try:
        nonexpert = hf.read_shards(checkpoint, write_expert)
    finally:
        checkpoint.tensors.close()
    return config, jax.tree.map(jnp.asarray, nonexpert), store


def save_hf_checkpoint(config: MixtralConfig, params: dict, out_dir: str) -> None:
    """Write full params as an HF checkpoint: `model.safetensors` and `config.json`.

    The tensors use the per-expert layout of every published Mixtral, in the params'
    own dtype, so transformers `MixtralForCausalLM.from_pretrained(out_dir)` loads
    them. `params` must have the experts stacked in, as `load_params` returns.
    `out_dir` is created if missing; existing files of the same names are replaced.
    """
    missing = [part for part in EXPERT_PART_NAMES if part not in params["layers"]]
    if missing:
        raise UserInputError(
            f"params have no layers/{missing[0]}; pass full params with the experts "
            "stacked in, as load_params returns")
    os.makedirs(out_dir, exist_ok=True)
    tensors = dict(hf.per_expert_hf_tensors(config, params))
    save_file(os.path.join(out_dir, "model.safetensors"), tensors,
              metadata={"format": "pt"})
    config.save_hf_json(os.path.join(out_dir, CONFIG_JSON))
