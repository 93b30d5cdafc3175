"""The Mixtral model configuration, built from a Hugging Face `config.json`.

Dimension key used across the package (as name suffixes and einsum letters):
  B batch, T query tokens, S cached positions, D model width, N query heads,
  G key/value heads, H head dim, V vocabulary, L layers, E experts per layer,
  K experts per token, F expert hidden width, C cache slots.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from adapmoe_jax.errors import UserInputError

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

# HF config fields with no effect on inference, or only on training in HF.
_IGNORED_HF_FIELDS = frozenset({
    "architectures", "transformers_version", "use_cache", "output_router_logits",
    "initializer_range", "router_jitter_noise", "pad_token_id", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention",
    "tokenizer_class", "id2label", "label2id", "problem_type", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "cross_attention_hidden_size", "tie_encoder_decoder", "is_decoder",
    "finetuning_task", "torch_dtype", "dtype", "model_type", "rope_theta",
    "rope_parameters", "rope_scaling", "hidden_act", "attention_dropout",
    "attention_bias",
})


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Hyperparameters of a Mixtral decoder; the field names follow transformers.

    Attributes:
      vocab_size: V, the number of token ids.
      hidden_size: D, the residual stream width.
      intermediate_size: F, the hidden width of each SwiGLU expert.
      num_hidden_layers: L, the number of decoder layers.
      num_attention_heads: N, query heads per layer.
      num_key_value_heads: G, key/value heads; query head n reads KV head n // (N / G).
      head_dim: H, the width of one attention head.
      num_local_experts: E, experts per layer.
      num_experts_per_tok: K, experts each token is routed to.
      max_position_embeddings: the maximum sequence length, prompt plus generated tokens.
      rms_norm_eps: epsilon added to the mean square in RMSNorm.
      rope_theta: the base of the rotary position embedding frequencies.
      sliding_window: if set, a query attends only to the last `sliding_window`
        positions, itself included (the transformers 4.48+ mask); None attends to all.
      tie_word_embeddings: whether the output projection reuses the embedding matrix.
      bos_token_id: the beginning-of-sequence token id, or None.
      eos_token_id: the end-of-sequence token ids (empty if none).
      router_aux_loss_coef: weight of the load-balancing loss, used only in training.
      dtype: the parameter and activation dtype name, "float32" or "bfloat16".
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    router_aux_loss_coef: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts",
                    "num_experts_per_tok", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserInputError(
                    f"invalid config: {name}={value!r}; it must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserInputError(
                f"invalid config: num_attention_heads={self.num_attention_heads} is not "
                f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise UserInputError(
                f"invalid config: num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"num_local_experts={self.num_local_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UserInputError(
                f"invalid config: sliding_window={self.sliding_window}; use a positive "
                "integer or null")
        if self.dtype not in _DTYPES:
            raise UserInputError(
                f"unsupported dtype {self.dtype!r}; use one of {sorted(_DTYPES)}")

    @property
    def jax_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def num_experts_total(self) -> int:
        """L x E, the number of experts in the whole model."""
        return self.num_hidden_layers * self.num_local_experts

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> "MixtralConfig":
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json ---------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], dtype: str | None = None) -> "MixtralConfig":
        """Build a config from a transformers `config.json` dict, 4.x or 5.x form.

        Raises UserInputError for another `model_type` and for any field whose
        effect this implementation does not reproduce (rope scaling, biases, ...).
        """
        model_type = hf.get("model_type")
        if model_type != "mixtral":
            raise UserInputError(
                f"unsupported model_type {model_type!r} in config.json; only 'mixtral' "
                "checkpoints are supported")
        known = _IGNORED_HF_FIELDS | {f.name for f in dataclasses.fields(cls)}
        known |= {"num_local_experts", "max_window_layers", "use_sliding_window"}
        for key in hf:
            if key not in known:
                raise UserInputError(
                    f"unsupported config field {key}={hf[key]!r} in config.json; "
                    "adapmoe_jax does not implement it")
        _check_unimplemented(hf)

        rope_theta = hf.get("rope_theta")
        rope_parameters = hf.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", 1e6)

        hidden_size = hf["hidden_size"]
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hidden_size // num_heads
        eos = hf.get("eos_token_id", 2)
        if eos is None:
            eos = ()
        elif isinstance(eos, int):
            eos = (eos,)
        source_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads", num_heads),
            head_dim=head_dim,
            num_local_experts=hf["num_local_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            sliding_window=hf.get("sliding_window"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=tuple(eos),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
            dtype=dtype or source_dtype,
        )

    @classmethod
    def from_json_file(cls, path: str, dtype: str | None = None) -> "MixtralConfig":
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise UserInputError(
                f"config file not found: {path}; pass a checkpoint directory that "
                "contains config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserInputError(f"invalid JSON in {path}: {e}") from None
        return cls.from_hf_dict(hf, dtype=dtype)

    def to_hf_dict(self) -> dict[str, Any]:
        """Return a transformers 4.x-style `config.json` dict for this config."""
        eos = list(self.eos_token_id)
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "torch_dtype": self.dtype,
        }

    def save_hf_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")


def _check_unimplemented(hf: dict[str, Any]) -> None:
    """Raise for a known field set to a value whose effect is not implemented."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UserInputError(
            f"unsupported config field hidden_act={hf['hidden_act']!r}; only 'silu' is "
            "implemented")
    if hf.get("rope_scaling"):
        raise UserInputError(
            f"unsupported config field rope_scaling={hf['rope_scaling']!r}; only plain "
            "rotary embeddings are implemented")
    rope_parameters = hf.get("rope_parameters") or {}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise UserInputError(
            f"unsupported config field rope_parameters.rope_type={rope_type!r}; only "
            "'default' is implemented")
    extra_rope = set(rope_parameters) - {"rope_type", "rope_theta"}
    if extra_rope:
        key = sorted(extra_rope)[0]
        raise UserInputError(
            f"unsupported config field rope_parameters.{key}={rope_parameters[key]!r}")
    if hf.get("attention_bias"):
        raise UserInputError(
            "unsupported config field attention_bias=True; Mixtral has no attention biases")


# --- Named presets -----------------------------------------------------------

def tiny_config(**overrides: Any) -> MixtralConfig:
    """Return a few-layer model config for tests: GQA ratio 2, 4 experts, top-2."""
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                max_position_embeddings=256)
    base.update(overrides)
    return MixtralConfig(**base)


MIXTRAL_8X7B = MixtralConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=32768, dtype="bfloat16")

MIXTRAL_8X22B = MixtralConfig(
    vocab_size=32000, hidden_size=6144, intermediate_size=16384,
    num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
    head_dim=128, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=65536, dtype="bfloat16")

# Mixtral-8x7B's layout in miniature (32 layers of 8 experts, top-2, 4 query heads
# per KV head, rope_theta 1e6), narrow enough to train on a 2-core CPU and ship
# as the package's default model.
MINI_MIXTRAL = MixtralConfig(
    vocab_size=4096, hidden_size=64, intermediate_size=96,
    num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=1,
    head_dim=16, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=1e6,
    bos_token_id=1, eos_token_id=(2,), router_aux_loss_coef=0.02)
