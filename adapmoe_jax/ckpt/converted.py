"""Convert an HF Mixtral checkpoint to this package's format, and read the result.

A converted checkpoint is a directory with:

* `config.json`: the transformers-style config, with the dtype the params were cast to.
* `params/`: the non-expert params, an orbax-checkpoint `StandardCheckpointer` save of
  the nested dict of WORKSPACE.md (layers stacked on axis 0).
* `experts.bin` and `experts.json`: the host expert store (see `expert_store`).
* the tokenizer files of the source checkpoint, where it has them.

Conversion streams the source one shard at a time and writes into a temporary
directory next to `out_dir`, renamed to `out_dir` only once everything is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from adapmoe_jax.ckpt import hf
from adapmoe_jax.ckpt.expert_store import (EXPERTS_JSON, ExpertFileWriter, ExpertStore,
                                           dtype_from_name)
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError

CONFIG_JSON = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")


def is_converted_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, EXPERTS_JSON))


def convert_checkpoint(hf_dir: str, out_dir: str, dtype: str | None = None,
                       overwrite: bool = False,
                       on_shard: Callable[[hf.ShardProgress], None] | None = None
                       ) -> MixtralConfig:
    """Convert the HF checkpoint in `hf_dir` into `out_dir` and return its config.

    `dtype` ("float32", "bfloat16" or "float16") sets the stored dtype; by default it
    is the config's `torch_dtype`/`dtype`. All names and shapes are checked against
    config.json before anything is written. On any error, KeyboardInterrupt
    included, the temporary directory is removed and `out_dir` is left as it was.
    Raises UserInputError for bad input, including an existing `out_dir` without
    `overwrite`.
    """
    _check_out_dir(hf_dir, out_dir, overwrite)
    checkpoint = hf.open_checkpoint(hf_dir, dtype=dtype)
    try:
        temp_dir = _make_temp_dir(out_dir)
        try:
            _write_converted(checkpoint, temp_dir, on_shard)
            _replace_dir(temp_dir, out_dir)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
    finally:
        checkpoint.tensors.close()
    return checkpoint.config


def _check_out_dir(hf_dir: str, out_dir: str, overwrite: bool) -> None:
    if os.path.realpath(hf_dir) == os.path.realpath(out_dir):
        raise UserInputError(
            f"--out_dir {out_dir} is the source checkpoint directory; choose a "
            "different output directory")
    if os.path.lexists(out_dir):
        if not overwrite:
            raise UserInputError(
                f"output directory {out_dir} already exists; pass --overwrite to "
                "replace it or choose another --out_dir")
        if not os.path.isdir(out_dir):
            raise UserInputError(
                f"--out_dir {out_dir} exists and is not a directory; remove it or "
                "choose another --out_dir")


def _make_temp_dir(out_dir: str) -> str:
    """Create an empty directory next to `out_dir`, so the final rename is atomic."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as e:
        raise UserInputError(
            f"cannot create a directory in {parent}: {e.strerror}; choose a writable "
            "--out_dir") from None


def _write_converted(checkpoint: hf.HfCheckpoint, directory: str,
                     on_shard: Callable[[hf.ShardProgress], None] | None) -> None:
    config = checkpoint.config
    writer = ExpertFileWriter(directory, config.num_hidden_layers,
                              config.num_local_experts, config.hidden_size,
                              config.intermediate_size, dtype_from_name(config.dtype))
    try:
        nonexpert = hf.read_shards(checkpoint, writer.write, on_shard)
        writer.finish()
    finally:
        writer.close()
    save_nonexpert_params(os.path.join(directory, PARAMS_DIR), nonexpert)
    config.save_hf_json(os.path.join(directory, CONFIG_JSON))
    _copy_tokenizer_files(checkpoint.directory, directory)


def _copy_tokenizer_files(source_dir: str, directory: str) -> None:
    for name in TOKENIZER_FILES:
        source = os.path.join(source_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(directory, name))


def _replace_dir(temp_dir: str, out_dir: str) -> None:
    """Rename `temp_dir` to `out_dir`, moving an existing `out_dir` aside first."""
    if not os.path.lexists(out_dir):
        os.rename(temp_dir, out_dir)
        return
    old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                               dir=os.path.dirname(os.path.abspath(out_dir)))
    os.rmdir(old_dir)
    os.rename(out_dir, old_dir)
    os.rename(temp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


# --- Non-expert params with orbax ----------------------------------------------

def save_nonexpert_params(path: str, params: dict) -> None:
    """Save a nested dict of arrays with orbax at `path`, which must not exist."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), params)


def restore_nonexpert_params(path: str) -> dict:
    """Restore params saved by `save_nonexpert_params` as jax arrays."""
    import jax
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        raise UserInputError(
            f"missing params directory {path}; convert the checkpoint again")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.abspath(path))
    return jax.tree.map(jnp.asarray, restored)


# --- Reading a converted checkpoint ----------------------------------------------

def read_converted(directory: str, dtype: str | None = None
                   ) -> tuple[MixtralConfig, dict, ExpertStore]:
    """Return (config, non-expert params, memory-mapped expert store) from `directory`.

    A `dtype` other than the stored one casts the non-expert params but raises for
    the experts, because casting them would load every expert into host memory.
    """
    config = MixtralConfig.from_json_file(os.path.join(directory, CONFIG_JSON))
    store = ExpertStore.open(directory)
    stored_dtype = dtype_from_name(config.dtype)
    if store.dtype != stored_dtype:
        raise UserInputError(
            f"{directory} stores experts as {store.dtype} but config.json specifies "
            f"{config.dtype}; convert the checkpoint again")
    if dtype is not None and dtype_from_name(dtype) != stored_dtype:
        raise UserInputError(
            f"converted checkpoint {directory} stores {config.dtype}, not {dtype}; "
            f"convert again with --dtype={dtype} or load it with its own dtype")
    _check_store_matches(config, store, directory)

    params = restore_nonexpert_params(os.path.join(directory, PARAMS_DIR))
    _check_nonexpert_shapes(config, params, directory)
    return config, params, store


def _check_store_matches(config: MixtralConfig, store: ExpertStore,
                         directory: str) -> None:
    expected = (config.num_hidden_layers, config.num_local_experts,
                config.hidden_size, config.intermediate_size)
    actual = (store.num_layers, store.num_experts, store.hidden_size,
              store.intermediate_size)
    if actual != expected:
        raise UserInputError(
            f"{EXPERTS_JSON} in {directory} gives (L, E, D, F) = {actual} but "
            f"config.json gives {expected}; convert the checkpoint again")


def _check_nonexpert_shapes(config: MixtralConfig, params: dict, directory: str) -> None:
    for key, shape in hf.nonexpert_shapes(config).items():
        node = params
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or tuple(np.shape(node)) != shape:
            found = "missing" if node is None else f"shape {list(np.shape(node))}"
            raise UserInputError(
                f"param {key} in {directory}/{PARAMS_DIR} is {found}, expected "
                f"{list(shape)}; convert the checkpoint again")
