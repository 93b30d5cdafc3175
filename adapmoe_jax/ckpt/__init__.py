"""Checkpoints: HF safetensors reading, conversion, and the host expert store."""

from adapmoe_jax.ckpt.converted import convert_checkpoint
from adapmoe_jax.ckpt.expert_store import ExpertStore, unflatten_expert
from adapmoe_jax.ckpt.loading import load_checkpoint, load_params, save_hf_checkpoint

__all__ = [
    "ExpertStore",
    "convert_checkpoint",
    "load_checkpoint",
    "load_params",
    "save_hf_checkpoint",
    "unflatten_expert",
]
