"""Per-layer split of the expert cache: AdapMoE's dynamic-programming allocator.

Layers differ in how often a prefetch hides a load and in how often adaptive
gating leaves one expert, so equal slots per layer waste cache. The allocator
takes a cost table, cost[l, s] = expected on-demand loads per token at layer l
with s slots, and chooses the slots per layer that minimise the summed cost
for a fixed total. The allocator functions are pure and change no module-level
state. `read_allocation` and `write_allocation` handle the allocation file,
JSON of the form {"cache_size": C, "slots_per_layer": [L ints]}.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import prefetch, replacement
from adapmoe_jax import profiles
from adapmoe_jax.profiles import ModelProfile


def expected_loads(s: int, E: int, p: float, r: float) -> float:
    """Return AdapMoE's expected on-demand loads per token for one top-2 layer.

    The layer caches s of its E experts, each expert is equally likely to be
    selected, a prefetch of the right expert (probability p) hides one load,
    and a share r of tokens uses only one expert (r = 0 without adaptive
    gating). Then P(both missing) = (E-s)(E-s-1) / (E(E-1)),
    P(exactly one missing) = 2(E-s)s / (E(E-1)), and

      f(s) = r (1 - s/E)(1 - p) + (1 - r) [P(both)(2 - p) + P(one)(1 - p)].

    This is the cost of the AdapMoE reference implementation
    (PKU-SEC-Lab/AdapMoE, ICCAD 2024).
    """
    if E < 2 or not 0 <= s <= E:
        raise UserInputError(
            f"invalid cache shape s={s}, E={E}; the top-2 cost needs E >= 2 and 0 <= s <= E")
    for name, value in (("prefetch accuracy p", p), ("single-expert ratio r", r)):
        if not 0.0 <= value <= 1.0:
            raise UserInputError(f"invalid {name}={value!r}; use a value in [0, 1]")
    pairs = E * (E - 1)
    missing = E - s
    p_both_missing = missing * (missing - 1) / pairs
    p_one_missing = 2 * missing * s / pairs
    single = r * (1 - s / E) * (1 - p)
    double = (1 - r) * (p_both_missing * (2 - p) + p_one_missing * (1 - p))
    return single + double


def analytic_cost_table(profile: ModelProfile, adapgate: bool) -> np.ndarray:
    """Return the [L, E+1] table of `expected_loads`, where column s has s slots.

    Uses the profile's prefetch accuracy (0 for every layer when it has none)
    and, with `adapgate`, its single-expert ratio.
    """
    if profile.top_k != 2:
        raise UserInputError(
            f"the analytic cost assumes top-2 routing but the profile has top_k="
            f"{profile.top_k}; use the empirical cost from a routing trace")
    if adapgate and profile.single_expert_ratio is None:
        raise UserInputError(
            "the profile has no single_expert_ratio, which the adaptive-gating cost "
            "needs; measure it with python -m adapmoe_jax.calibrate or allocate without "
            "adaptive gating")
    num_layers, num_experts = profile.num_layers, profile.num_experts
    accuracy = profile.prefetch_accuracy or (0.0,) * num_layers
    ratio = profile.single_expert_ratio if adapgate else (0.0,) * num_layers
    table = np.empty((num_layers, num_experts + 1), dtype=np.float64)
    for layer in range(num_layers):
        for slots in range(num_experts + 1):
            table[layer, slots] = expected_loads(slots, num_experts, accuracy[layer],
                                                 ratio[layer])
    return table


def empirical_cost_table(trace_per_layer: Sequence[replacement.Trace], E: int,
                         predicted_per_layer: Sequence[np.ndarray] | None = None,
                         prefetch_count: int = 0) -> np.ndarray:
    """Return the [L, E+1] table of measured on-demand loads per token; column s has s slots.

    Each layer's trace (one step per token, as `replacement.lru_loads` takes it)
    is replayed through the LRU policy with every slot count from 0 to E. With
    `predicted_per_layer` ([tokens, K] predicted ids per layer, -1 for none) and
    `prefetch_count` > 0, each step first prefetches up to that many predicted
    experts, as the runtime and `simulate.simulate_lru` do, and only the loads
    the layer waits for are counted.
    """
    num_layers = len(trace_per_layer)
    if num_layers == 0:
        raise UserInputError("the routing trace has no layers")
    table = np.empty((num_layers, E + 1), dtype=np.float64)
    for layer, trace in enumerate(trace_per_layer):
        num_tokens = len(trace)
        if num_tokens == 0:
            raise UserInputError(f"the routing trace has no tokens at layer {layer}")
        for slots in range(E + 1):
            if predicted_per_layer is None or prefetch_count == 0:
                loads = replacement.lru_loads(trace, slots)
            else:
                loads = _lru_loads_with_prefetch(trace, predicted_per_layer[layer], slots, E,
                                                 prefetch_count)
            table[layer, slots] = loads / num_tokens
    return table


def _lru_loads_with_prefetch(trace: replacement.Trace, predicted_TK: np.ndarray,
                             num_slots: int, E: int, prefetch_count: int) -> int:
    """Replay one layer through LRU with prefetching; returns its on-demand loads.

    Stamps follow the runtime: the prefetch for step t gets 2t, the step's uses
    2t + 1, and a prefetch protects the step's other predicted experts.
    """
    state = replacement.LruState.init(num_slots, E)
    loads = 0
    for step, needed in enumerate(trace):
        predicted = [int(e) for e in predicted_TK[step] if e >= 0]
        if num_slots and predicted:
            chosen = prefetch.choose_prefetches(np.asarray(predicted), state.cached_mask(),
                                                prefetch_count)
            for expert in chosen.tolist():
                state, _, _ = replacement.insert(state, expert, 2 * step, protected=predicted)
        active = [int(e) for e in needed if e >= 0]
        for expert in active:
            if replacement.lookup(state, expert) != replacement.EMPTY:
                state = replacement.touch(state, expert, 2 * step + 1)
            else:
                loads += 1
                state, _, _ = replacement.insert(state, expert, 2 * step + 1, protected=active)
    return loads


def _check_cache_size(cache_size: int, num_layers: int) -> None:
    if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)):
        raise UserInputError(f"invalid cache size {cache_size!r}; use an integer")
    if cache_size < num_layers:
        raise UserInputError(
            f"invalid cache size {cache_size}; every one of the {num_layers} layers needs "
            f"a slot, so use a cache size >= {num_layers}")


def allocate_slots(cost_table_LxS: np.ndarray, cache_size: int) -> tuple[int, ...]:
    """Choose slots per layer that minimise the summed cost for `cache_size` slots.

    Args:
      cost_table_LxS: [L, E+1] costs, where column s is the cost of a layer
        with s slots (column 0 is ignored).
      cache_size: C, the total slots, at least L.

    Returns:
      L slot counts, each in [1, E], summing to C, or E each when C >= L x E.

    The dynamic program goes through the layers in order and, for each running
    total, tries slot counts in ascending order, keeping the first strictly
    cheaper one. Among allocations of equal cost, the backtrack therefore gives
    the last layer the fewest slots, then the layer before it, and so on.
    """
    cost = np.asarray(cost_table_LxS, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[1] < 2:
        raise UserInputError(
            f"invalid cost table of shape {cost.shape}; expected [layers, experts + 1]")
    if not np.all(np.isfinite(cost[:, 1:])):
        raise UserInputError("invalid cost table: it contains a NaN or infinite cost")
    num_layers, num_experts = cost.shape[0], cost.shape[1] - 1
    _check_cache_size(cache_size, num_layers)
    if cache_size >= num_layers * num_experts:
        return (num_experts,) * num_layers

    _, choice = _fill_dp_table(cost, cache_size)
    return _backtrack(choice, cache_size)


def _fill_dp_table(cost: np.ndarray, cache_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return best[l, c], the least cost of layers < l with c slots, and the choices."""
    num_layers, num_experts = cost.shape[0], cost.shape[1] - 1
    best = np.full((num_layers + 1, cache_size + 1), math.inf)
    choice = np.zeros((num_layers + 1, cache_size + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for layer in range(1, num_layers + 1):
        for total in range(cache_size + 1):
            for slots in range(1, min(num_experts, total) + 1):
                candidate = best[layer - 1, total - slots] + cost[layer - 1, slots]
                if candidate < best[layer, total]:
                    best[layer, total] = candidate
                    choice[layer, total] = slots
    return best, choice


def _backtrack(choice: np.ndarray, cache_size: int) -> tuple[int, ...]:
    slots_per_layer = []
    total = cache_size
    for layer in range(choice.shape[0] - 1, 0, -1):
        slots = int(choice[layer, total])
        slots_per_layer.append(slots)
        total -= slots
    return tuple(reversed(slots_per_layer))


def dp_allocation(profile: ModelProfile, cache_size: int, adapgate: bool) -> tuple[int, ...]:
    """Allocate `cache_size` slots over the profile's layers with the analytic cost."""
    return allocate_slots(analytic_cost_table(profile, adapgate), cache_size)


def uniform_allocation(L: int, E: int, cache_size: int) -> tuple[int, ...]:
    """Split `cache_size` slots evenly; the first C mod L layers get one slot more.

    Each layer gets at most E slots, so C >= L x E gives E each. Unlike the DP
    allocation, a cache smaller than L is allowed: some layers then get no slot
    and load every expert on demand.
    """
    if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)):
        raise UserInputError(f"invalid cache size {cache_size!r}; use an integer")
    if cache_size < 0:
        raise UserInputError(f"invalid cache size {cache_size}; use 0 or more")
    if cache_size >= L * E:
        return (E,) * L
    base, remainder = divmod(cache_size, L)
    return tuple(base + 1 if layer < remainder else base for layer in range(L))


def write_allocation(cache_size: int, slots_per_layer: Sequence[int], path: str) -> None:
    """Write the allocation file atomically (a temporary file renamed over `path`)."""
    slots = [int(s) for s in slots_per_layer]
    profiles.write_json_atomic({"cache_size": int(cache_size), "slots_per_layer": slots},
                               path)


def read_allocation(path: str, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """Read and validate an allocation file for a model of L layers and E experts."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserInputError(
            f"allocation file not found: {path}; make one with "
            "python -m adapmoe_jax.allocate") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"invalid JSON in allocation file {path}: {error}") from None
    slots = data.get("slots_per_layer") if isinstance(data, dict) else None
    if not isinstance(slots, list) or len(slots) != num_layers:
        raise UserInputError(
            f"invalid allocation file {path}: slots_per_layer must list {num_layers} "
            "slot counts, one per layer")
    for layer, value in enumerate(slots):
        valid = isinstance(value, int) and not isinstance(value, bool)
        if not valid or not 1 <= value <= num_experts:
            raise UserInputError(
                f"invalid allocation file {path}: slots_per_layer[{layer}]={value!r}; "
                f"use an integer in [1, {num_experts}]")
    # A cache larger than L x E leaves every layer at E slots, so the sum is smaller.
    cache_size = data.get("cache_size", sum(slots))
    all_full = all(value == num_experts for value in slots)
    if cache_size != sum(slots) and not (all_full and cache_size > sum(slots)):
        raise UserInputError(
            f"invalid allocation file {path}: cache_size={cache_size!r} but the slots "
            f"sum to {sum(slots)}")
    return tuple(slots)
