"""Test helpers: a naive per-expert MoE oracle, tolerances by dtype, tiny models."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from adapmoe_jax.config import tiny_config
from adapmoe_jax.model import layers, transformer

# Tolerances for comparing against transformers or against another code path.
# float32 matches to rounding; bfloat16 carries 8 bits of mantissa, so logits
# of magnitude ~0.5 differ by up to a few units of 2^-8 after a few layers.
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2}


def tolerance(dtype_name: str) -> float:
    return TOLERANCES[dtype_name]


def naive_moe(x_TD, weights_TK, experts_TK, w1_EDF, w3_EDF, w2_EFD) -> np.ndarray:
    """Loop over tokens and their selected experts, one expert at a time, in float64."""
    x = np.asarray(x_TD, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            weight = float(weights_TK[t, k])
            if weight == 0:
                continue
            w1, w3, w2 = (np.asarray(w[e], np.float64) for w in (w1_EDF, w3_EDF, w2_EFD))
            gate = x[t] @ w1
            hidden = gate / (1 + np.exp(-gate)) * (x[t] @ w3)
            out[t] += weight * (hidden @ w2)
    return out


def routed_model(num_layers: int = 32, num_experts: int = 8, seed: int = 0,
                 router_scale: float = 30.0, **overrides):
    """A tiny model whose routers are scaled up so tokens spread over distinct experts."""
    config = tiny_config(num_hidden_layers=num_layers, num_local_experts=num_experts,
                         hidden_size=16, intermediate_size=24, head_dim=4,
                         num_attention_heads=4, num_key_value_heads=1, **overrides)
    params = transformer.init_params(config, seed)
    params["layers"]["router"] = params["layers"]["router"] * router_scale
    return config, params


def greedy_decode(engine, prompt, num_tokens, max_len=64):
    """Greedy tokens and the logits that chose them, [num_tokens + 1, V]."""
    logits = [engine.start(prompt, max_len)]
    tokens = []
    for _ in range(num_tokens):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(engine.step(tokens[-1]))
    return tokens, np.stack(logits)
