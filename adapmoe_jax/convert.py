"""Convert an HF Mixtral checkpoint for offloaded inference.

Usage:
  python -m adapmoe_jax.convert --hf_dir=DIR --out_dir=DIR [--overwrite] [--dtype=bfloat16]

Writes config.json, the tokenizer files, the non-expert params (orbax, `params/`) and
the host expert store (`experts.bin`, `experts.json`). See `adapmoe_jax/ckpt/converted.py`.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from adapmoe_jax import cli
from adapmoe_jax.ckpt import hf
from adapmoe_jax.ckpt.converted import convert_checkpoint
from adapmoe_jax.errors import UserInputError

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "HF checkpoint directory: config.json plus *.safetensors shards.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Directory to create for the converted checkpoint.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace --out_dir if it already exists.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"],
    "Stored dtype of all params; default: the dtype in config.json.")


def _log_shard(progress: hf.ShardProgress) -> None:
    logging.info("shard %d/%d %s: %d expert tensors, %d other tensors",
                 progress.index, progress.count, progress.shard_name,
                 progress.expert_tensors, progress.other_tensors)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.monotonic()
    logging.info("converting %s into %s", _HF_DIR.value, _OUT_DIR.value)
    try:
        config = convert_checkpoint(_HF_DIR.value, _OUT_DIR.value, dtype=_DTYPE.value,
                                    overwrite=_OVERWRITE.value, on_shard=_log_shard)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.info("wrote %s: %d layers x %d experts, %s, in %.1f s", _OUT_DIR.value,
                 config.num_hidden_layers, config.num_local_experts, config.dtype,
                 time.monotonic() - start)


def run() -> None:
    flags.mark_flags_as_required(["hf_dir", "out_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
