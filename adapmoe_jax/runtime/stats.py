"""Counters of the offloading runtime, per layer and in total."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ExpertStats:
    """Per-layer counters, each an int64 array of shape [L] (seconds are float64).

    Attributes:
      tokens: tokens that went through the layer (prefill and decode).
      expert_uses: (token, expert) pairs computed, after adaptive gating.
      single_expert_tokens: tokens that used one expert after gating.
      hits: distinct experts a step needed that were already in the device cache.
      loads: on-demand copies, those a layer waits for before computing.
      prefetches_issued: copies issued one layer ahead by the prefetch policy.
      prefetches_used: prefetched experts that the next layer used before eviction.
      bytes_host_to_device: bytes copied host to device, on-demand and prefetched.
      wait_seconds: wall time spent blocked on on-demand copies.
    """

    tokens: np.ndarray
    expert_uses: np.ndarray
    single_expert_tokens: np.ndarray
    hits: np.ndarray
    loads: np.ndarray
    prefetches_issued: np.ndarray
    prefetches_used: np.ndarray
    bytes_host_to_device: np.ndarray
    wait_seconds: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int) -> "ExpertStats":
        fields = {f.name: np.zeros(num_layers, np.int64) for f in dataclasses.fields(cls)}
        fields["wait_seconds"] = np.zeros(num_layers, np.float64)
        return cls(**fields)

    def summary(self) -> dict:
        """Return totals and per-layer lists as a JSON-ready dict.

        `expert_loads_per_token` divides on-demand loads by the tokens that went
        through layer 0 (every token passes every layer once), so it sums over
        layers. `experts_per_token` is the mean over (token, layer) pairs of the
        experts used after gating: K without gating.
        """
        tokens = int(self.tokens[0]) if len(self.tokens) else 0
        token_layers = int(self.tokens.sum())
        hits, loads = int(self.hits.sum()), int(self.loads.sum())
        lookups = hits + loads
        issued, used = int(self.prefetches_issued.sum()), int(self.prefetches_used.sum())
        return {
            "tokens": tokens,
            "expert_loads": loads,
            "expert_loads_per_token": loads / tokens if tokens else 0.0,
            "cache_hits": hits,
            "cache_hit_rate": hits / lookups if lookups else 0.0,
            "experts_per_token": (float(self.expert_uses.sum()) / token_layers
                                  if token_layers else 0.0),
            "single_expert_ratio": _ratio(self.single_expert_tokens, self.tokens),
            "prefetches_issued": issued,
            "prefetches_used": used,
            "prefetch_precision": used / issued if issued else 0.0,
            "misses_avoided_by_prefetch": used / (used + loads) if used + loads else 0.0,
            "bytes_host_to_device": int(self.bytes_host_to_device.sum()),
            "copy_wait_seconds": float(self.wait_seconds.sum()),
            "per_layer": {
                "hits": self.hits.tolist(),
                "loads": self.loads.tolist(),
                "prefetches_issued": self.prefetches_issued.tolist(),
                "prefetches_used": self.prefetches_used.tolist(),
                "single_expert_ratio": [
                    (s / t if t else 0.0) for s, t in zip(self.single_expert_tokens.tolist(),
                                                          self.tokens.tolist())],
            },
        }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    total = float(denominator.sum())
    return float(numerator.sum()) / total if total else 0.0
