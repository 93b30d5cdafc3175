"""Pure functions for the Mixtral decoder: norm, rotary embedding, attention, experts.

Every function takes its weights as arguments, so the same code serves the Flax
module (training, full forward), the fully jitted decode step and the offloading
runtime, which feeds expert weights from a device cache of slots.

Numerics follow transformers' `modeling_mixtral.py` (v5.25): RMSNorm and the
attention softmax in float32, rotary tables in float32 cast to the activation
dtype, router softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Routing lives with the gating policy; the model uses it from there.
from adapmoe_jax.policies.gating import route  # noqa: F401

Array = jax.Array


def rms_norm(x_XD: Array, scale_D: Array, eps: float) -> Array:
    """Normalise the last axis by its root mean square, computed in float32."""
    x32 = x_XD.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(mean_square + eps)).astype(x_XD.dtype)
    return scale_D * normed


def rope_tables(positions_T: Array, head_dim: int, theta: float, dtype) -> tuple[Array, Array]:
    """Return (cos_TH, sin_TH) of the rotary embedding in the rotate-half layout."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs_TH2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles_TH = jnp.concatenate([freqs_TH2, freqs_TH2], axis=-1)
    return jnp.cos(angles_TH).astype(dtype), jnp.sin(angles_TH).astype(dtype)


def apply_rope(x_BTXH: Array, cos_TH: Array, sin_TH: Array) -> Array:
    """Rotate query or key heads; x is [B, T, heads, H]."""
    half = x_BTXH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTXH[..., half:], x_BTXH[..., :half]], axis=-1)
    cos = cos_TH[None, :, None, :]
    sin = sin_TH[None, :, None, :]
    return x_BTXH * cos + rotated * sin


def attention_mask(query_pos_T: Array, key_pos_S: Array, sliding_window: int | None) -> Array:
    """Boolean [T, S]: causal, and within the sliding window when one is set.

    The window keeps `sliding_window` keys including the query itself, as the
    transformers 4.48+ mask does (key > query - window).
    """
    allowed = key_pos_S[None, :] <= query_pos_T[:, None]
    if sliding_window is not None:
        allowed &= key_pos_S[None, :] > query_pos_T[:, None] - sliding_window
    return allowed


def grouped_query_attention(q_BTNH: Array, k_BSGH: Array, v_BSGH: Array,
                            mask_TS: Array) -> Array:
    """Attend with N query heads over G key/value heads; returns [B, T, N, H].

    Query head n reads key/value head n // (N / G), the grouping transformers
    gets from `repeat_kv`.
    """
    batch, num_tokens, num_heads, head_dim = q_BTNH.shape
    num_kv_heads = k_BSGH.shape[2]
    group = num_heads // num_kv_heads
    q_BTGQH = q_BTNH.reshape(batch, num_tokens, num_kv_heads, group, head_dim)
    scores_BGQTS = jnp.einsum("btgqh,bsgh->bgqts", q_BTGQH, k_BSGH) * (head_dim ** -0.5)
    scores_BGQTS = jnp.where(mask_TS, scores_BGQTS.astype(jnp.float32), -jnp.inf)
    probs_BGQTS = jax.nn.softmax(scores_BGQTS, axis=-1).astype(q_BTNH.dtype)
    out_BTGQH = jnp.einsum("bgqts,bsgh->btgqh", probs_BGQTS, v_BSGH)
    return out_BTGQH.reshape(batch, num_tokens, num_heads, head_dim)


def swiglu_expert(x_XD: Array, w1_DF: Array, w3_DF: Array, w2_FD: Array) -> Array:
    """Apply one SwiGLU expert: w2(silu(x w1) * (x w3))."""
    hidden_XF = jax.nn.silu(x_XD @ w1_DF) * (x_XD @ w3_DF)
    return hidden_XF @ w2_FD


def moe_dense(x_TD: Array, weights_TK: Array, experts_TK: Array,
              w1_EDF: Array, w3_EDF: Array, w2_EFD: Array) -> Array:
    """Mixture of experts by running every expert on every token (training, prefill).

    Costs E / K times the routed FLOPs but has static shapes. The routing weight
    scales each expert's hidden activations before the down projection. That is
    the same linear map as scaling its output, and it lets all E experts run as
    two wide matmuls ([T, D] x [D, E*F] and [T, E*F] x [E*F, D]). On CPU those
    differentiate several times faster than per-expert batched einsums.
    Unselected and gated-off (weight 0) experts contribute exactly zero.
    """
    num_tokens, width = x_TD.shape
    num_experts, _, hidden = w1_EDF.shape
    one_hot_TKE = jax.nn.one_hot(experts_TK, num_experts, dtype=x_TD.dtype)
    combine_TE = jnp.einsum("tk,tke->te", weights_TK.astype(x_TD.dtype), one_hot_TKE)
    w1_DX = w1_EDF.transpose(1, 0, 2).reshape(width, num_experts * hidden)
    w3_DX = w3_EDF.transpose(1, 0, 2).reshape(width, num_experts * hidden)
    gate_TEF = jax.nn.silu(x_TD @ w1_DX).reshape(num_tokens, num_experts, hidden)
    up_TEF = (x_TD @ w3_DX).reshape(num_tokens, num_experts, hidden)
    hidden_TEF = gate_TEF * up_TEF * combine_TE[:, :, None]
    return hidden_TEF.reshape(num_tokens, -1) @ w2_EFD.reshape(num_experts * hidden, width)


def moe_gathered(x_TD: Array, weights_TK: Array, indices_TK: Array,
                 w1_XDF: Array, w3_XDF: Array, w2_XFD: Array) -> Array:
    """Mixture of experts by gathering each token's K experts' weights by index.

    `indices_TK` index the leading axis of the weight arrays: expert ids when the
    arrays hold all E experts of a layer. The natural form at decode time, when
    T is 1.
    """
    return mix_selected(x_TD, weights_TK, w1_XDF[indices_TK], w3_XDF[indices_TK],
                        w2_XFD[indices_TK])


def moe_from_flat(x_TD: Array, weights_TK: Array, indices_TK: Array,
                  experts_XP: Array) -> Array:
    """Mixture of experts whose weights are flat rows [X, P], P = 3 * D * F.

    Each row is one expert laid out as w1 [D, F], w3 [D, F], w2 [F, D], the
    layout of the host expert store and of the device cache slots. Rows are
    gathered first and split afterwards, so the whole array is never copied.
    """
    width = x_TD.shape[-1]
    hidden = experts_XP.shape[-1] // (3 * width)
    rows_TKP = experts_XP[indices_TK]
    w1_TKDF, w3_TKDF, w2_TKFD = unflatten_experts(rows_TKP, width, hidden)
    return mix_selected(x_TD, weights_TK, w1_TKDF, w3_TKDF, w2_TKFD)


def unflatten_experts(rows_XP: Array, width: int, hidden: int):
    """Split flat expert rows [..., P] into (w1 [..., D, F], w3 [..., D, F], w2 [..., F, D])."""
    size = width * hidden
    lead = rows_XP.shape[:-1]
    w1 = rows_XP[..., :size].reshape(*lead, width, hidden)
    w3 = rows_XP[..., size:2 * size].reshape(*lead, width, hidden)
    w2 = rows_XP[..., 2 * size:].reshape(*lead, hidden, width)
    return w1, w3, w2


def flatten_experts(w1_XDF: Array, w3_XDF: Array, w2_XFD: Array) -> Array:
    """Inverse of `unflatten_experts`: [..., P] rows in the order w1, w3, w2."""
    lead = w1_XDF.shape[:-2]
    return jnp.concatenate([w1_XDF.reshape(*lead, -1), w3_XDF.reshape(*lead, -1),
                            w2_XFD.reshape(*lead, -1)], axis=-1)


def mix_selected(x_TD: Array, weights_TK: Array, w1_TKDF: Array, w3_TKDF: Array,
                 w2_TKFD: Array) -> Array:
    """Weighted sum of each token's K experts, given those experts' weights."""
    hidden_TKF = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x_TD, w1_TKDF))
    hidden_TKF = hidden_TKF * jnp.einsum("td,tkdf->tkf", x_TD, w3_TKDF)
    out_TKD = jnp.einsum("tkf,tkfd->tkd", hidden_TKF, w2_TKFD)
    return jnp.einsum("tk,tkd->td", weights_TK.astype(x_TD.dtype), out_TKD)


def load_balancing_loss(router_logits_XE: Array, experts_XK: Array) -> Array:
    """Switch Transformer load-balancing loss, in the form transformers' Mixtral uses.

    E * sum over k and e of (share of tokens whose k-th choice is e) * (mean
    router probability of e); it equals K when routing is uniform.
    """
    num_experts = router_logits_XE.shape[-1]
    probs_XE = jax.nn.softmax(router_logits_XE.astype(jnp.float32), axis=-1)
    chosen_XKE = jax.nn.one_hot(experts_XK, num_experts, dtype=jnp.float32)
    share_KE = jnp.mean(chosen_XKE, axis=0)
    mean_prob_E = jnp.mean(probs_XE, axis=0)
    return num_experts * jnp.sum(share_KE * mean_prob_E[None, :])
