"""Tests for the per-layer LRU cache and the LRU and Belady trace replays."""

import itertools
import math

import numpy as np
import pytest

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import replacement
from adapmoe_jax.policies.replacement import LruState

# Step i uses these experts, replayed with two slots in the hand-worked tests.
HAND_TRACE = [[0, 1], [2], [0], [1, 2]]


def test_lru_init_is_empty():
    state = LruState.init(num_slots=2, num_experts=4)
    assert state.num_slots == 2
    assert state.num_experts == 4
    assert state.expert_in_slot == (-1, -1)
    assert state.cached_mask().tolist() == [False] * 4


def test_lru_insert_fills_empty_slots_first():
    state = LruState.init(2, 4)
    state, slot0, evicted0 = replacement.insert(state, 3, time=0)
    state, slot1, evicted1 = replacement.insert(state, 1, time=1)
    assert (slot0, evicted0) == (0, -1)
    assert (slot1, evicted1) == (1, -1)
    assert replacement.lookup(state, 3) == 0
    assert replacement.lookup(state, 1) == 1
    assert replacement.lookup(state, 0) == -1


def test_lru_evicts_least_recently_used():
    state = LruState.init(2, 4)
    state, _, _ = replacement.insert(state, 0, time=0)
    state, _, _ = replacement.insert(state, 1, time=1)
    state = replacement.touch(state, 0, time=2)
    state, slot, evicted = replacement.insert(state, 2, time=3)
    assert (slot, evicted) == (1, 1)
    assert replacement.lookup(state, 1) == -1
    assert state.expert_in_slot == (0, 2)
    assert state.last_used == (2, 3)


def test_lru_protected_expert_is_not_evicted():
    state = LruState.init(2, 4)
    state, _, _ = replacement.insert(state, 0, time=0)
    state, _, _ = replacement.insert(state, 1, time=1)
    state, slot, evicted = replacement.insert(state, 2, time=2, protected=(0, 2))
    assert (slot, evicted) == (1, 1)


def test_lru_all_protected_goes_to_staging():
    state = LruState.init(1, 4)
    state, _, _ = replacement.insert(state, 0, time=0)
    new_state, slot, evicted = replacement.insert(state, 1, time=1, protected=(0, 1))
    assert (slot, evicted) == (-1, -1)
    assert new_state == state


def test_lru_equal_stamps_evict_lower_slot():
    state = LruState.init(2, 4)
    state, _, _ = replacement.insert(state, 2, time=5)
    state, _, _ = replacement.insert(state, 3, time=5)
    assert replacement.choose_victim(state) == 0


def test_lru_insert_cached_expert_only_touches():
    state = LruState.init(2, 4)
    state, _, _ = replacement.insert(state, 2, time=0)
    state, slot, evicted = replacement.insert(state, 2, time=7)
    assert (slot, evicted) == (0, -1)
    assert state.last_used == (7, -1)


def test_lru_operations_leave_old_state_unchanged():
    empty = LruState.init(2, 4)
    filled, _, _ = replacement.insert(empty, 1, time=0)
    replacement.touch(filled, 1, time=9)
    assert empty == LruState.init(2, 4)
    assert filled.last_used == (0, -1)


def test_lru_touch_uncached_raises():
    with pytest.raises(KeyError):
        replacement.touch(LruState.init(2, 4), 3, time=0)


def test_lru_init_rejects_negative_slots():
    with pytest.raises(UserInputError, match="num_slots=-1"):
        LruState.init(-1, 4)


def test_lru_loads_hand_worked_trace():
    # Step 0 loads 0 and 1. Step 1 evicts 0 (equal stamps, lower slot) for 2.
    # Step 2 evicts 1 for 0. Step 3 evicts 0 for 1 and hits 2.
    np.testing.assert_array_equal(replacement.lru_step_loads(HAND_TRACE, 2), [2, 1, 1, 1])
    assert replacement.lru_loads(HAND_TRACE, 2) == 5


def test_belady_loads_hand_worked_trace():
    # Step 1 evicts 1, next used at step 3 after 0 at step 2. Step 3 evicts 0.
    np.testing.assert_array_equal(replacement.belady_step_loads(HAND_TRACE, 2),
                                  [2, 1, 0, 1])
    assert replacement.belady_loads(HAND_TRACE, 2) == 4


def test_replays_with_all_experts_cached_load_each_once():
    trace = [[0, 1], [2, 3], [1, 0], [3, 2]]
    assert replacement.lru_loads(trace, 4) == 4
    assert replacement.belady_loads(trace, 4) == 4


def test_step_larger_than_cache_uses_staging():
    trace = [[0, 1, 2]] * 3
    # LRU keeps 0 and 1, and expert 2 is staged at every step.
    np.testing.assert_array_equal(replacement.lru_step_loads(trace, 2), [3, 1, 1])
    np.testing.assert_array_equal(replacement.belady_step_loads(trace, 2), [3, 1, 1])


def test_zero_slots_load_every_use():
    trace = [[0, 1], [0], [1, 2]]
    assert replacement.lru_loads(trace, 0) == 5
    assert replacement.belady_loads(trace, 0) == 5


def test_dropped_and_repeated_ids_are_skipped():
    assert replacement.normalize_trace([[3, -1], [2, 2], [-1, -1]]) == [(3,), (2,), ()]
    assert replacement.lru_loads([[3, -1], [3, 3], [-1, -1]], 1) == 1


def test_replays_reject_negative_slots():
    with pytest.raises(UserInputError, match="slot count -2"):
        replacement.lru_loads(HAND_TRACE, -2)
    with pytest.raises(UserInputError, match="slot count -2"):
        replacement.belady_loads(HAND_TRACE, -2)


def random_trace(rng, num_steps, num_experts, k):
    return [rng.choice(num_experts, size=k, replace=False).tolist() for _ in range(num_steps)]


@pytest.mark.parametrize("seed", range(40))
def test_belady_never_loads_more_than_lru(seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(2, 10))
    k = int(rng.integers(1, min(4, num_experts) + 1))
    trace = random_trace(rng, 60, num_experts, k)
    for slots in range(num_experts + 1):
        assert replacement.belady_loads(trace, slots) <= replacement.lru_loads(trace, slots)


def exhaustive_min_loads(trace, num_slots):
    """Return the minimum loads over every choice of residents after each step."""
    frontier = {frozenset(): 0}
    for step in replacement.normalize_trace(trace):
        needed = frozenset(step)
        next_frontier = {}
        for resident, loads in frontier.items():
            loads += len(needed - resident)
            pool = sorted(resident | needed)
            for size in range(min(num_slots, len(pool)) + 1):
                for kept in itertools.combinations(pool, size):
                    kept = frozenset(kept)
                    if len(needed) <= num_slots and not needed <= kept:
                        continue
                    if loads < next_frontier.get(kept, math.inf):
                        next_frontier[kept] = loads
        frontier = next_frontier
    return min(frontier.values())


@pytest.mark.parametrize("seed", range(12))
def test_belady_matches_exhaustive_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    trace = random_trace(rng, 9, num_experts=5, k=int(rng.integers(1, 4)))
    for slots in range(4):
        assert replacement.belady_loads(trace, slots) == exhaustive_min_loads(trace, slots)
