"""Cross-layer expert prediction and the choice of experts to prefetch.

AdapMoE predicts layer l+1's experts by applying layer l+1's router to layer
l's MoE input, the hidden state after attention and its RMSNorm. Consecutive
hidden states are similar, so the prediction is often right, and the copy can
start before layer l's experts run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import gating

Array = jax.Array


def predict_next_experts(hidden_TD: Array, next_router_DE: Array, k: int) -> Array:
    """Predict the next layer's top-k experts from this layer's MoE input.

    Args:
      hidden_TD: [T, D] this layer's MoE input.
      next_router_DE: [D, E] the next layer's router weights.
      k: experts per token, a static Python int.

    Returns:
      [T, k] int32 expert ids in the order `gating.route` would give them,
      computed in float32.
    """
    logits_TE = hidden_TD.astype(jnp.float32) @ next_router_DE.astype(jnp.float32)
    _, experts_TK = gating.route(logits_TE, k)
    return experts_TK


def choose_prefetches(predicted_ids, cached_mask_E, count: int) -> np.ndarray:
    """Choose up to `count` predicted experts that are not cached yet.

    Predictions are read token by token in rank order, skipping ids below 0
    and repeats. With count = 1 this is AdapMoE's rule: prefetch the first
    predicted expert that is missing from the cache.

    Args:
      predicted_ids: [T, k] or [k] predicted expert ids (host array or list).
      cached_mask_E: [E] bool, True where the expert is in the layer's cache.
      count: the maximum number of experts to prefetch, >= 0.

    Returns:
      [n] int32 expert ids, n <= count, in prediction order.
    """
    if count < 0:
        raise UserInputError(
            f"invalid prefetch count {count}; use 0 (no prefetch) or a positive integer")
    cached_mask_E = np.asarray(cached_mask_E, dtype=bool)
    chosen: list[int] = []
    for expert in np.asarray(predicted_ids).reshape(-1).tolist():
        if len(chosen) == count:
            break
        if expert < 0 or cached_mask_E[expert] or expert in chosen:
            continue
        chosen.append(expert)
    return np.asarray(chosen, dtype=np.int32)
