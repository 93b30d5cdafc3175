"""The device expert cache: per-layer slot buffers, updated in place, and their slot tables.

Each layer l owns one device array of shape [C_l, P] (P = 3 * D * F, one
expert per row in the host store's flat layout) and an LRU slot table from
`policies.replacement`. A load copies one expert's contiguous host buffer with
`jax.device_put` and writes it into its slot with a jitted update whose input
buffer is donated, so the cache array is updated in place, never reallocated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import replacement


@functools.partial(jax.jit, donate_argnums=(0,))
def write_slot(slots_CP: jax.Array, slot: jax.Array, expert_P: jax.Array) -> jax.Array:
    """Return `slots_CP` with row `slot` replaced by `expert_P`; the input is donated."""
    return slots_CP.at[slot].set(expert_P)


def check_allocation(slots_per_layer: list[int], num_layers: int, num_experts: int) -> None:
    if len(slots_per_layer) != num_layers:
        raise UserInputError(
            f"the allocation has {len(slots_per_layer)} layers but the model has "
            f"{num_layers}; make the allocation for this model")
    for layer, slots in enumerate(slots_per_layer):
        if not 0 <= slots <= num_experts:
            raise UserInputError(
                f"the allocation gives layer {layer} {slots} slots; each layer takes 0 to "
                f"{num_experts}")


class LayerCache:
    """One layer's slot buffer on the device and its LRU slot table.

    A layer with zero slots still keeps a one-row buffer so gathers have a
    valid operand; that row is never marked as holding an expert.
    """

    def __init__(self, num_slots: int, num_experts: int, expert_size: int, dtype, device):
        self.num_slots = num_slots
        rows = max(num_slots, 1)
        self.slots_CP = jax.device_put(jnp.zeros((rows, expert_size), dtype), device)
        self.table = replacement.LruState.init(num_slots, num_experts)
        # Experts loaded by prefetch and not yet used by a step of this layer.
        self.unused_prefetches: set[int] = set()

    def slot_of(self, expert: int) -> int:
        return replacement.lookup(self.table, expert)

    def cached_mask(self) -> np.ndarray:
        return self.table.cached_mask()

    def touch(self, expert: int, time: int) -> None:
        self.table = replacement.touch(self.table, expert, time)

    def reserve(self, expert: int, time: int, protected) -> int:
        """Assign `expert` a slot, evicting by LRU; returns the slot or -1 for staging."""
        self.table, slot, evicted = replacement.insert(self.table, expert, time, protected)
        self.unused_prefetches.discard(evicted)
        return slot

    def write(self, slot: int, expert_P: jax.Array) -> None:
        self.slots_CP = write_slot(self.slots_CP, np.int32(slot), expert_P)
