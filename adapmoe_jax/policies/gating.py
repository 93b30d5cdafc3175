"""Expert routing and AdapMoE's sensitivity-based adaptive gate, as pure jnp functions.

Routing follows transformers' `MixtralSparseMoeBlock`: softmax over all E
experts in float32, top-k, then renormalise the k weights to sum to 1. The
adaptive gate (Zhong et al., "AdapMoE", ICCAD 2024) then drops a token's
lower-ranked experts whose weight is below a per-layer threshold
sqrt(T / S_l), where S_l is the layer's sensitivity and T a loss budget.

Every function here except `thresholds_from_sensitivity` works under `jit`
with k static, and thresholds may be traced.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax.errors import UserInputError

Array = jax.Array


def route(router_logits_TE: Array, k: int) -> tuple[Array, Array]:
    """Select each token's top-k experts as Mixtral does.

    Args:
      router_logits_TE: [T, E] router logits, any float dtype.
      k: experts per token, a static Python int.

    Returns:
      (weights_TK float32, experts_TK int32). Experts are in descending weight
      order, ties go to the lower expert index (the order `jax.lax.top_k`
      returns), and each row of weights sums to 1.
    """
    probs_TE = jax.nn.softmax(router_logits_TE.astype(jnp.float32), axis=-1)
    top_probs_TK, experts_TK = jax.lax.top_k(probs_TE, k)
    weights_TK = top_probs_TK / jnp.sum(top_probs_TK, axis=-1, keepdims=True)
    return weights_TK, experts_TK.astype(jnp.int32)


def adaptive_gate(weights_TK: Array, threshold: Array | float) -> tuple[Array, Array]:
    """Drop each token's lower-ranked experts whose weight is below the threshold.

    The first expert of every token is always kept. Any later expert whose
    weight is strictly below `threshold` is dropped, so a weight equal to the
    threshold is kept, and the kept weights are renormalised to sum to 1. Rows
    with nothing dropped are returned bit for bit, so a threshold of 0 gives
    stock routing exactly. With k = 2, a threshold above 0.5 always leaves one
    expert. A threshold of exactly 0.5 keeps both only when both weights are 0.5.

    Args:
      weights_TK: [T, K] renormalised weights in descending order, as `route`
        returns them.
      threshold: the layer's threshold, a scalar (may be traced).

    Returns:
      (gated_weights_TK float32, active_TK bool). A dropped expert has weight 0
      and active False, so shapes stay [T, K].
    """
    weights_TK = weights_TK.astype(jnp.float32)
    rank_TK = jax.lax.broadcasted_iota(jnp.int32, weights_TK.shape, weights_TK.ndim - 1)
    is_first_TK = rank_TK == 0
    active_TK = is_first_TK | (weights_TK >= threshold)
    kept_TK = jnp.where(active_TK, weights_TK, 0.0)
    renormalised_TK = kept_TK / jnp.sum(kept_TK, axis=-1, keepdims=True)
    # XLA on CPU may divide through a reciprocal, so w / w can come out one ulp
    # below 1. A lone remaining expert gets exactly 1, as in the original rule.
    single_T1 = jnp.sum(active_TK, axis=-1, keepdims=True) == 1
    renormalised_TK = jnp.where(single_T1, is_first_TK.astype(jnp.float32), renormalised_TK)

    # Renormalising an untouched row could change its last bit, so only rows
    # that lost an expert take the renormalised weights.
    any_dropped_T1 = jnp.any(~active_TK, axis=-1, keepdims=True)
    gated_TK = jnp.where(any_dropped_T1, renormalised_TK, weights_TK)
    return gated_TK, active_TK


def gate_weights(weights_TK: Array, experts_TK: Array, threshold: Array | float) -> Array:
    """Return the gated weights only, in the `GateFn` form the model's forward pass takes.

    `experts_TK` is unused: the rule depends on the weights alone.
    """
    del experts_TK
    gated_TK, _ = adaptive_gate(weights_TK, threshold)
    return gated_TK


def drop_inactive(experts_TK: Array, active_TK: Array) -> Array:
    """Replace the ids of dropped experts by -1, the marker routing traces use."""
    return jnp.where(active_TK, experts_TK, -1).astype(jnp.int32)


def thresholds_from_sensitivity(layer_sensitivity_L: Sequence[float],
                                budget: float) -> np.ndarray:
    """Compute each layer's gate threshold sqrt(budget / S_l).

    AdapMoE bounds the loss change of dropping the second expert, about
    S_l * w2^2 by a second-order expansion, by the budget, which gives
    w2 < sqrt(budget / S_l). A budget of 0 gives all-zero thresholds (stock
    routing).

    Args:
      layer_sensitivity_L: one positive, finite sensitivity per layer.
      budget: the loss budget T, finite and >= 0 (AdapMoE's default is 0.005).

    Returns:
      [L] float32 thresholds, on the host.

    Raises:
      UserInputError: for a negative or non-finite budget, or a sensitivity
        that is not positive and finite.
    """
    if not math.isfinite(budget) or budget < 0:
        raise UserInputError(
            f"invalid gate budget {budget!r}; use a finite number >= 0, such as 0.005")
    sensitivity_L = np.asarray(layer_sensitivity_L, dtype=np.float64)
    for layer, value in enumerate(sensitivity_L):
        if not math.isfinite(value) or value <= 0:
            raise UserInputError(
                f"invalid layer sensitivity {value!r} at layer {layer}; every layer "
                "needs a positive finite sensitivity")
    return np.sqrt(budget / sensitivity_L).astype(np.float32)
