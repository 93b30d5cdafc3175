"""Cache replacement for one layer's expert slots: LRU for the runtime, Belady for bounds.

The LRU policy is a set of pure functions over an immutable `LruState`, so the
runtime and the simulator replay the same decisions. Like mixtral-offloading's
per-layer expert cache, each layer has its own slots and a load evicts the
least recently used expert of that layer.

The trace replays count loads under one model of a step: the experts one token
uses at one layer must all be resident together, so none of them is evicted to
make room for another. When a step needs more experts than the layer has
slots, the experts that do not fit are copied into a staging buffer, used and
not kept, and each such copy counts as a load every time.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Collection, Iterable, Sequence

import numpy as np

from adapmoe_jax.errors import UserInputError

EMPTY = -1  # marks an empty slot, an uncached expert or "no eviction"

# A replay trace: one entry per step, each listing the expert ids used together.
Trace = Sequence[Iterable[int]]


@dataclasses.dataclass(frozen=True)
class LruState:
    """The slot table of one layer's expert cache.

    Attributes:
      slot_of_expert: [E] the slot holding each expert, or -1 if it is not cached.
      expert_in_slot: [C] the expert each slot holds, or -1 for an empty slot.
      last_used: [C] the time stamp of each slot's last use, -1 for an empty slot.
    """

    slot_of_expert: tuple[int, ...]
    expert_in_slot: tuple[int, ...]
    last_used: tuple[int, ...]

    @classmethod
    def init(cls, num_slots: int, num_experts: int) -> "LruState":
        """Return an empty cache of `num_slots` slots for `num_experts` experts.

        Zero slots is allowed: every load then goes through staging.
        """
        if num_slots < 0 or num_experts < 1:
            raise UserInputError(
                f"invalid cache shape: num_slots={num_slots}, num_experts={num_experts}; "
                "use num_slots >= 0 and num_experts >= 1")
        return cls(slot_of_expert=(EMPTY,) * num_experts,
                   expert_in_slot=(EMPTY,) * num_slots,
                   last_used=(EMPTY,) * num_slots)

    @property
    def num_slots(self) -> int:
        return len(self.expert_in_slot)

    @property
    def num_experts(self) -> int:
        return len(self.slot_of_expert)

    def cached_mask(self) -> np.ndarray:
        """Return [E] bool, True where the expert is cached."""
        return np.asarray(self.slot_of_expert) != EMPTY


def lookup(state: LruState, expert: int) -> int:
    """Return the slot holding `expert`, or -1 if it is not cached."""
    return state.slot_of_expert[expert]


def touch(state: LruState, expert: int, time: int) -> LruState:
    """Record a use of a cached expert at `time`, or raise KeyError if it is not cached."""
    slot = lookup(state, expert)
    if slot == EMPTY:
        raise KeyError(f"expert {expert} is not cached")
    last_used = list(state.last_used)
    last_used[slot] = time
    return dataclasses.replace(state, last_used=tuple(last_used))


def choose_victim(state: LruState, protected_experts: Collection[int] = ()) -> int:
    """Choose the slot a load should use, or -1 when every slot is protected.

    An empty slot wins (the lowest index first). Otherwise the least recently
    used slot whose expert is not in `protected_experts` is chosen, the lower
    slot index on equal stamps.
    """
    best_slot, best_stamp = EMPTY, None
    for slot, (expert, stamp) in enumerate(zip(state.expert_in_slot, state.last_used)):
        if expert == EMPTY:
            return slot
        if expert in protected_experts:
            continue
        if best_stamp is None or stamp < best_stamp:
            best_slot, best_stamp = slot, stamp
    return best_slot


def insert(state: LruState, expert: int, time: int,
           protected: Collection[int] = ()) -> tuple[LruState, int, int]:
    """Load `expert` into the victim slot and stamp it with `time`.

    Returns (new_state, slot, evicted_expert). The evicted expert is -1 when
    the slot was empty. When every slot is protected, the expert goes to
    staging: the state is unchanged and slot is -1. Inserting a cached expert
    only touches it.
    """
    if lookup(state, expert) != EMPTY:
        return touch(state, expert, time), lookup(state, expert), EMPTY
    slot = choose_victim(state, protected)
    if slot == EMPTY:
        return state, EMPTY, EMPTY

    evicted = state.expert_in_slot[slot]
    slot_of_expert = list(state.slot_of_expert)
    expert_in_slot = list(state.expert_in_slot)
    last_used = list(state.last_used)
    if evicted != EMPTY:
        slot_of_expert[evicted] = EMPTY
    slot_of_expert[expert] = slot
    expert_in_slot[slot] = expert
    last_used[slot] = time
    new_state = LruState(tuple(slot_of_expert), tuple(expert_in_slot), tuple(last_used))
    return new_state, slot, evicted


# --- Whole-trace replays ---------------------------------------------------------

def normalize_trace(trace: Trace) -> list[tuple[int, ...]]:
    """Return each step's distinct expert ids >= 0, in first-use order.

    Negative ids mark experts that adaptive gating dropped, so they need no load.
    """
    steps = []
    for step in trace:
        ids: list[int] = []
        for expert in step:
            expert = int(expert)
            if expert >= 0 and expert not in ids:
                ids.append(expert)
        steps.append(tuple(ids))
    return steps


def _check_slots(num_slots: int) -> None:
    if num_slots < 0:
        raise UserInputError(f"invalid slot count {num_slots}; use an integer >= 0")


def lru_step_loads(trace: Trace, num_slots: int) -> np.ndarray:
    """Replay the trace through one layer's LRU cache, returning [steps] int64 loads.

    Step i uses time stamp i. Within a step, experts are looked up in the
    listed order and the step's experts are protected from eviction.
    """
    _check_slots(num_slots)
    steps = normalize_trace(trace)
    num_experts = 1 + max((max(step) for step in steps if step), default=0)
    state = LruState.init(num_slots, num_experts)
    loads = np.zeros(len(steps), dtype=np.int64)
    for time, step in enumerate(steps):
        for expert in step:
            if lookup(state, expert) != EMPTY:
                state = touch(state, expert, time)
            else:
                loads[time] += 1
                state, _, _ = insert(state, expert, time, protected=step)
    return loads


def lru_loads(trace: Trace, num_slots: int) -> int:
    """Return the total loads of an LRU cache with `num_slots` slots on the trace."""
    return int(lru_step_loads(trace, num_slots).sum())


def _next_use_finder(steps: list[tuple[int, ...]]):
    """Return next_use(expert, step): the first later step using it, or len(steps)."""
    occurrences: dict[int, list[int]] = {}
    for index, step in enumerate(steps):
        for expert in step:
            occurrences.setdefault(expert, []).append(index)

    def next_use(expert: int, step: int) -> int:
        uses = occurrences.get(expert, [])
        position = bisect.bisect_right(uses, step)
        return uses[position] if position < len(uses) else len(steps)

    return next_use


def belady_step_loads(trace: Trace, num_slots: int) -> np.ndarray:
    """Replay the trace under Belady's optimal replacement, returning [steps] int64 loads.

    Each step loads its experts that are not resident. Afterwards the cache
    keeps the step's experts and fills the remaining slots with the other
    resident experts whose next use is soonest, which evicts those used
    farthest in the future. When the step's experts alone overflow the slots,
    the cache keeps the `num_slots` experts with the soonest next use among the
    step's experts and the old residents, and the step's other experts go
    through staging. Equal next uses keep the lower expert id. The tests check
    against an exhaustive search on small traces that no policy under the same
    step model loads less.
    """
    _check_slots(num_slots)
    steps = normalize_trace(trace)
    next_use = _next_use_finder(steps)
    resident: set[int] = set()
    loads = np.zeros(len(steps), dtype=np.int64)
    for index, step in enumerate(steps):
        needed = set(step)
        loads[index] = len(needed - resident)
        resident = _belady_keep(resident, needed, num_slots,
                                key=lambda expert: (next_use(expert, index), expert))
    return loads


def _belady_keep(resident: set[int], needed: set[int], num_slots: int, key) -> set[int]:
    """Return the experts a Belady cache keeps after a step that used `needed`."""
    pool = resident | needed
    if len(pool) <= num_slots:
        return pool
    if len(needed) <= num_slots:
        others = sorted(resident - needed, key=key)
        return needed | set(others[:num_slots - len(needed)])
    return set(sorted(pool, key=key)[:num_slots])


def belady_loads(trace: Trace, num_slots: int) -> int:
    """Return the total loads of Belady's optimal replacement on the trace."""
    return int(belady_step_loads(trace, num_slots).sum())
