"""The Mixtral decoder as pure functions over a parameter pytree, and its Flax module.

The parameter layout is the table in WORKSPACE.md. A decoder layer is split into
its two phases, `attention_block` (norm, attention, residual, norm, router
logits) and the expert mixture, because the offloading runtime runs them as
separate jitted calls with host work in between. `forward` composes them with a
`lax.scan` over the stacked layers for training, prefill and the all-resident
decode step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.model import layers
from adapmoe_jax.policies import gating

Array = jax.Array
Params = dict[str, Any]

EXPERT_KEYS = ("w1", "w3", "w2")


class KVCache(NamedTuple):
    """Static-shape key/value cache for all layers: k and v are [L, B, S, G, H]."""

    k: Array
    v: Array

    @classmethod
    def init(cls, config: MixtralConfig, batch: int, max_len: int) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len,
                 config.num_key_value_heads, config.head_dim)
        # Two separate buffers, so that both can be donated to a jitted step.
        return cls(k=jnp.zeros(shape, config.jax_dtype), v=jnp.zeros(shape, config.jax_dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Routing(NamedTuple):
    """Per-layer routing of a forward pass; arrays are [L, B, T, ...]."""

    router_logits: Array  # [L, B, T, E], activation dtype
    weights: Array  # [L, B, T, K] float32, after gating (a dropped expert has 0)
    experts: Array  # [L, B, T, K] int32


# A gate maps (weights_TK, experts_TK, layer threshold) to gated weights_TK.
GateFn = Callable[[Array, Array, Array], Array]


def split_expert_params(params: Params) -> tuple[Params, Params]:
    """Return (non-expert params, expert params {w1, w3, w2} stacked [L, E, ...])."""
    layer_params = dict(params["layers"])
    experts = {key: layer_params.pop(key) for key in EXPERT_KEYS}
    nonexpert = dict(params)
    nonexpert["layers"] = layer_params
    return nonexpert, experts


def merge_expert_params(nonexpert: Params, experts: Params) -> Params:
    merged = dict(nonexpert)
    merged["layers"] = {**nonexpert["layers"], **experts}
    return merged


def embed(params: Params, tokens_BT: Array) -> Array:
    return params["embed"][tokens_BT]


def unembed(params: Params, config: MixtralConfig, x_BTD: Array) -> Array:
    """Final norm and output projection; logits are returned in float32."""
    h_BTD = layers.rms_norm(x_BTD, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", h_BTD, params["embed"])
    else:
        logits = h_BTD @ params["lm_head"]
    return logits.astype(jnp.float32)


def attention_block(layer: Params, config: MixtralConfig, x_BTD: Array,
                    k_cache_BSGH: Array | None, v_cache_BSGH: Array | None,
                    start_pos: Array | int):
    """Run a layer up to its router; returns (x_BTD, moe_input_BTD, router_logits_BTE, k, v).

    `x_BTD` comes back with the attention residual added. With a cache, the new
    keys and values are written at `start_pos`, and the queries attend over the
    whole static cache under the causal mask. Without one they attend over the
    T tokens given (training). The returned k, v are the updated caches, or this
    call's keys and values when no cache was given.
    """
    batch, num_tokens, _ = x_BTD.shape
    dtype = x_BTD.dtype
    h_BTD = layers.rms_norm(x_BTD, layer["input_norm"], config.rms_norm_eps)
    q_BTNH = (h_BTD @ layer["q_proj"]).reshape(
        batch, num_tokens, config.num_attention_heads, config.head_dim)
    k_BTGH = (h_BTD @ layer["k_proj"]).reshape(
        batch, num_tokens, config.num_key_value_heads, config.head_dim)
    v_BTGH = (h_BTD @ layer["v_proj"]).reshape(
        batch, num_tokens, config.num_key_value_heads, config.head_dim)

    positions_T = start_pos + jnp.arange(num_tokens, dtype=jnp.int32)
    cos_TH, sin_TH = layers.rope_tables(positions_T, config.head_dim, config.rope_theta, dtype)
    q_BTNH = layers.apply_rope(q_BTNH, cos_TH, sin_TH)
    k_BTGH = layers.apply_rope(k_BTGH, cos_TH, sin_TH)

    if k_cache_BSGH is None:
        keys_BSGH, values_BSGH = k_BTGH, v_BTGH
        key_pos_S = positions_T
    else:
        index = (0, start_pos, 0, 0)
        keys_BSGH = jax.lax.dynamic_update_slice(k_cache_BSGH, k_BTGH, index)
        values_BSGH = jax.lax.dynamic_update_slice(v_cache_BSGH, v_BTGH, index)
        key_pos_S = jnp.arange(keys_BSGH.shape[1], dtype=jnp.int32)
    mask_TS = layers.attention_mask(positions_T, key_pos_S, config.sliding_window)
    attn_BTNH = layers.grouped_query_attention(q_BTNH, keys_BSGH, values_BSGH, mask_TS)
    attn_BTD = attn_BTNH.reshape(batch, num_tokens, -1) @ layer["o_proj"]
    x_BTD = x_BTD + attn_BTD

    moe_input_BTD = layers.rms_norm(x_BTD, layer["post_attention_norm"], config.rms_norm_eps)
    router_logits_BTE = moe_input_BTD @ layer["router"]
    return x_BTD, moe_input_BTD, router_logits_BTE, keys_BSGH, values_BSGH


def route_layer(config: MixtralConfig, router_logits_TE: Array,
                gate_fn: GateFn | None, threshold: Array | None):
    """Route tokens to experts, then apply the adaptive gate when one is given."""
    weights_TK, experts_TK = gating.route(router_logits_TE, config.num_experts_per_tok)
    if gate_fn is not None:
        weights_TK = gate_fn(weights_TK, experts_TK, threshold)
    return weights_TK, experts_TK


def forward(params: Params, config: MixtralConfig, tokens_BT: Array,
            kv_cache: KVCache | None = None, start_pos: Array | int = 0,
            moe_impl: str = "dense", gate_fn: GateFn | None = None,
            thresholds_L: Array | None = None):
    """Run the model on tokens_BT; returns (logits_BTV float32, new KVCache or None, Routing).

    Args:
      moe_impl: "dense" runs every expert on every token (training, prefill);
        "gather" gathers the K selected experts' weights (decode, T = 1).
      gate_fn, thresholds_L: an adaptive gate and its per-layer thresholds; both
        None gives stock Mixtral routing.
    """
    batch, num_tokens = tokens_BT.shape
    x_BTD = embed(params, tokens_BT)
    if thresholds_L is None:
        thresholds_L = jnp.zeros((config.num_hidden_layers,), jnp.float32)
    use_cache = kv_cache is not None

    def layer_step(x_BTD, scanned):
        layer, threshold, k_cache, v_cache = scanned
        x_BTD, moe_in_BTD, logits_BTE, k_new, v_new = attention_block(
            layer, config, x_BTD, k_cache, v_cache, start_pos)
        moe_in_TD = moe_in_BTD.reshape(batch * num_tokens, -1)
        logits_TE = logits_BTE.reshape(batch * num_tokens, -1)
        weights_TK, experts_TK = route_layer(config, logits_TE, gate_fn, threshold)
        mix = layers.moe_dense if moe_impl == "dense" else layers.moe_gathered
        moe_out_TD = mix(moe_in_TD, weights_TK, experts_TK,
                         layer["w1"], layer["w3"], layer["w2"])
        x_BTD = x_BTD + moe_out_TD.reshape(x_BTD.shape)
        routing = Routing(logits_BTE, weights_TK.reshape(batch, num_tokens, -1),
                          experts_TK.reshape(batch, num_tokens, -1))
        if use_cache:
            return x_BTD, (routing, k_new, v_new)
        return x_BTD, (routing, None, None)

    if use_cache:
        scanned = (params["layers"], thresholds_L, kv_cache.k, kv_cache.v)
    else:
        scanned = (params["layers"], thresholds_L, None, None)
    x_BTD, (routing, k_all, v_all) = jax.lax.scan(layer_step, x_BTD, scanned)
    logits_BTV = unembed(params, config, x_BTD)
    new_cache = KVCache(k_all, v_all) if use_cache else None
    return logits_BTV, new_cache, routing


# --- Flax module ----------------------------------------------------------------

def _scaled_normal(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class _StackedLayers(nn.Module):
    """Declares the decoder layers' parameters, stacked on a leading L axis."""

    config: MixtralConfig

    def setup(self):
        c = self.config
        L, D, E, F = (c.num_hidden_layers, c.hidden_size, c.num_local_experts,
                      c.intermediate_size)
        NH, GH = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        dtype = c.jax_dtype
        std = 0.02
        # Residual-branch outputs start smaller so a deep stack begins near identity.
        out_std = std / (2 * L) ** 0.5
        ones = nn.initializers.ones
        self.input_norm = self.param("input_norm", ones, (L, D), dtype)
        self.post_attention_norm = self.param("post_attention_norm", ones, (L, D), dtype)
        self.q_proj = self.param("q_proj", _scaled_normal(std), (L, D, NH), dtype)
        self.k_proj = self.param("k_proj", _scaled_normal(std), (L, D, GH), dtype)
        self.v_proj = self.param("v_proj", _scaled_normal(std), (L, D, GH), dtype)
        self.o_proj = self.param("o_proj", _scaled_normal(out_std), (L, NH, D), dtype)
        self.router = self.param("router", _scaled_normal(std), (L, D, E), dtype)
        self.w1 = self.param("w1", _scaled_normal(std), (L, E, D, F), dtype)
        self.w3 = self.param("w3", _scaled_normal(std), (L, E, D, F), dtype)
        self.w2 = self.param("w2", _scaled_normal(out_std), (L, E, F, D), dtype)

    def __call__(self):
        return {name: getattr(self, name) for name in (
            "input_norm", "post_attention_norm", "q_proj", "k_proj", "v_proj",
            "o_proj", "router", "w1", "w3", "w2")}


class Mixtral(nn.Module):
    """Mixtral causal language model; `__call__` is `forward` on this module's params."""

    config: MixtralConfig

    @nn.compact
    def __call__(self, tokens_BT: Array, kv_cache: KVCache | None = None,
                 start_pos: Array | int = 0, moe_impl: str = "dense"):
        c = self.config
        dtype = c.jax_dtype
        params = {
            "embed": self.param("embed", _scaled_normal(0.02),
                                (c.vocab_size, c.hidden_size), dtype),
            "final_norm": self.param("final_norm", nn.initializers.ones,
                                     (c.hidden_size,), dtype),
            "layers": _StackedLayers(c, name="layers")(),
        }
        if not c.tie_word_embeddings:
            params["lm_head"] = self.param("lm_head", _scaled_normal(0.02),
                                           (c.hidden_size, c.vocab_size), dtype)
        return forward(params, c, tokens_BT, kv_cache, start_pos, moe_impl)


def init_params(config: MixtralConfig, seed: int = 0) -> Params:
    """Initialise a parameter pytree for `config` (plain nested dict)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Mixtral(config).init(jax.random.PRNGKey(seed), tokens)
    return jax.tree.map(lambda x: x, dict(variables["params"]))


def param_counts(config: MixtralConfig) -> dict[str, int]:
    """Return {"experts": ..., "other": ..., "total": ...} parameter counts."""
    c = config
    experts = c.num_hidden_layers * c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    attn = c.hidden_size * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_layer = attn + 2 * c.hidden_size + c.hidden_size * c.num_local_experts
    other = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size
    if not c.tie_word_embeddings:
        other += c.vocab_size * c.hidden_size
    return {"experts": experts, "other": other, "total": experts + other}
