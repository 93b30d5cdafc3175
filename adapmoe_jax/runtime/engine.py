"""Decode engines: all experts resident, or experts offloaded to a device cache.

Both engines expose the same stateful interface, `start(prompt_ids)` and
`step(token_id)`, each returning the float32 logits [V] of the last position,
so the sampler drives either one without knowing which it has.

`ResidentEngine` keeps every expert on the device and runs one fully jitted
step per token. `OffloadedEngine` keeps the experts in a host `ExpertStore` and
a fixed number of them in a `LayerCache` per layer. Per token and layer it runs:
attention and router (jitted) -> the selected expert ids reach the host ->
missing experts are copied with `jax.device_put` into their slots -> the expert
computation (jitted) gathers its weights from the slots by index.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax.ckpt.expert_store import ExpertStore
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.model import layers
from adapmoe_jax.model import transformer
from adapmoe_jax import simulate
from adapmoe_jax.policies import gating, prefetch
from adapmoe_jax.allocation import uniform_allocation
from adapmoe_jax.runtime.device_cache import LayerCache, check_allocation
from adapmoe_jax.runtime.stats import ExpertStats

Params = transformer.Params


@dataclasses.dataclass(frozen=True)
class GateSettings:
    """Adaptive gating for an engine.

    Attributes:
      thresholds: per-layer thresholds [L]; None disables gating.
      gate_prefill: also gate prompt tokens (decode tokens are always gated when
        thresholds are set).
    """

    thresholds: tuple[float, ...] | None = None
    gate_prefill: bool = False

    def for_phase(self, prefill: bool) -> tuple[float, ...] | None:
        if self.thresholds is None or (prefill and not self.gate_prefill):
            return None
        return self.thresholds


@dataclasses.dataclass
class TraceRecorder:
    """Routing of every decode-path token an engine processed, for `--trace_out`.

    Lists of per-token arrays [L, K]: `experts` (-1 where gating dropped the
    expert), `weights` (float32) and `predicted` (layer l's experts as predicted
    at layer l - 1; -1 for layer 0 and where no prediction was made).
    """

    experts: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)
    predicted: list = dataclasses.field(default_factory=list)

    def to_trace(self) -> simulate.RoutingTrace:
        """Return the recorded tokens as the simulator's [tokens, L, K] trace."""
        return simulate.RoutingTrace(experts=np.stack(self.experts).astype(np.int32),
                                     weights=np.stack(self.weights).astype(np.float32),
                                     predicted=np.stack(self.predicted).astype(np.int32))


def _count_routing(stats: ExpertStats, weights_LTK: np.ndarray) -> None:
    """Add token, expert-use and single-expert counts from gated weights [L, T, K]."""
    active_LT = np.sum(weights_LTK > 0, axis=-1)
    stats.tokens += weights_LTK.shape[1]
    stats.expert_uses += active_LT.sum(axis=1)
    stats.single_expert_tokens += (active_LT == 1).sum(axis=1)


class ResidentEngine:
    """All experts on the device; one jitted forward per prompt and per decode token."""

    def __init__(self, config: MixtralConfig, params: Params,
                 gate: GateSettings = GateSettings()):
        self.config = config
        self.params = params
        self.gate = gate
        self.stats = ExpertStats.zeros(config.num_hidden_layers)
        self.trace: TraceRecorder | None = None
        self._cache: transformer.KVCache | None = None
        self._pos = 0

    def start(self, prompt_ids: Sequence[int], max_len: int) -> np.ndarray:
        """Reset the KV cache to `max_len` positions and prefill the prompt."""
        self._cache = transformer.KVCache.init(self.config, 1, max_len)
        tokens = jnp.asarray(np.asarray(prompt_ids, np.int32)[None])
        thresholds = self.gate.for_phase(prefill=True)
        logits, self._cache, weights, experts = _resident_forward(
            self.config, "dense", thresholds is not None, self.params, tokens, self._cache,
            jnp.int32(0), _thresholds_array(self.config, thresholds))
        self._pos = len(prompt_ids)
        self._record(weights, experts)
        return np.asarray(logits[0, -1])

    def step(self, token_id: int) -> np.ndarray:
        """Decode one token at the next position."""
        tokens = jnp.asarray([[token_id]], jnp.int32)
        thresholds = self.gate.for_phase(prefill=False)
        logits, self._cache, weights, experts = _resident_forward(
            self.config, "gather", thresholds is not None, self.params, tokens, self._cache,
            jnp.int32(self._pos), _thresholds_array(self.config, thresholds))
        self._pos += 1
        self._record(weights, experts)
        return np.asarray(logits[0, -1])

    def _record(self, weights_LBTK, experts_LBTK) -> None:
        weights_LTK = np.asarray(weights_LBTK)[:, 0]
        experts_LTK = np.asarray(experts_LBTK)[:, 0]
        _count_routing(self.stats, weights_LTK)
        # Every expert is resident, so each distinct expert a step uses is a hit.
        for layer in range(self.config.num_hidden_layers):
            active = experts_LTK[layer][weights_LTK[layer] > 0]
            self.stats.hits[layer] += len(np.unique(active))


def _thresholds_array(config, thresholds):
    if thresholds is None:
        return jnp.zeros((config.num_hidden_layers,), jnp.float32)
    return jnp.asarray(thresholds, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def _resident_forward(config, moe_impl, gated, params, tokens_BT, cache, start_pos, thresholds_L):
    logits, cache, routing = transformer.forward(
        params, config, tokens_BT, cache, start_pos, moe_impl=moe_impl,
        gate_fn=gating.gate_weights if gated else None, thresholds_L=thresholds_L)
    return logits[:, -1:], cache, routing.weights, routing.experts


# --- Offloaded engine -------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5, 6))
def _attention_and_route(config, gated, layer, next_router_DE, x_BTD, k_cache, v_cache,
                         start_pos, threshold):
    """Run one layer's attention and router, and predict the next layer's experts."""
    x_BTD, moe_in_BTD, logits_BTE, k_cache, v_cache = transformer.attention_block(
        layer, config, x_BTD, k_cache, v_cache, start_pos)
    moe_in_TD = moe_in_BTD.reshape(-1, moe_in_BTD.shape[-1])
    weights_TK, experts_TK = transformer.route_layer(
        config, logits_BTE.reshape(moe_in_TD.shape[0], -1),
        gating.gate_weights if gated else None, threshold)
    predicted_TK = prefetch.predict_next_experts(moe_in_TD, next_router_DE,
                                                 config.num_experts_per_tok)
    return x_BTD, moe_in_TD, weights_TK, experts_TK, predicted_TK, k_cache, v_cache


def _select_rows(slots_CP, staged_XP, slot_of_X, staged_of_X):
    """Gather expert rows from the cache slots or, where slot is -1, from staging."""
    from_slots = slots_CP[jnp.maximum(slot_of_X, 0)]
    from_staging = staged_XP[jnp.maximum(staged_of_X, 0)]
    return jnp.where((slot_of_X >= 0)[..., None], from_slots, from_staging)


@jax.jit
def _experts_decode(x_BTD, moe_in_TD, weights_TK, slot_TK, staged_TK, slots_CP, staged_KP):
    """Expert computation at decode time: gathers each token's K experts by index."""
    rows_TKP = _select_rows(slots_CP, staged_KP, slot_TK, staged_TK)
    width = moe_in_TD.shape[-1]
    hidden = rows_TKP.shape[-1] // (3 * width)
    w1, w3, w2 = layers.unflatten_experts(rows_TKP, width, hidden)
    out_TD = layers.mix_selected(moe_in_TD, weights_TK, w1, w3, w2)
    return x_BTD + out_TD.reshape(x_BTD.shape)


@jax.jit
def _experts_prefill(x_BTD, moe_in_TD, weights_TK, experts_TK, slot_E, staged_E, slots_CP,
                     staged_EP):
    """Expert computation for a prompt: every needed expert of the layer, run densely.

    Experts no token uses get zero rows, which contribute exactly zero.
    """
    rows_EP = _select_rows(slots_CP, staged_EP, slot_E, staged_E)
    needed_E = (slot_E >= 0) | (staged_E >= 0)
    rows_EP = jnp.where(needed_E[:, None], rows_EP, 0)
    width = moe_in_TD.shape[-1]
    hidden = rows_EP.shape[-1] // (3 * width)
    w1, w3, w2 = layers.unflatten_experts(rows_EP, width, hidden)
    out_TD = layers.moe_dense(moe_in_TD, weights_TK, experts_TK, w1, w3, w2)
    return x_BTD + out_TD.reshape(x_BTD.shape)


class OffloadedEngine:
    """Experts in host memory, a per-layer LRU cache of them on the device.

    Args:
      config: the model config.
      params: non-expert params on the device.
      store: the host expert store.
      slots_per_layer: device cache slots of each layer (uniform if None).
      cache_size: total slots, used when `slots_per_layer` is None.
      gate: adaptive gating settings.
      prefetch_count: experts to prefetch for the next layer per token (0 disables).
    """

    def __init__(self, config: MixtralConfig, params: Params, store: ExpertStore,
                 slots_per_layer: Sequence[int] | None = None, cache_size: int = 0,
                 gate: GateSettings = GateSettings(), prefetch_count: int = 1,
                 device=None):
        num_layers, num_experts = config.num_hidden_layers, config.num_local_experts
        if slots_per_layer is None:
            slots_per_layer = uniform_allocation(num_layers, num_experts, cache_size)
        slots_per_layer = [int(s) for s in slots_per_layer]
        check_allocation(slots_per_layer, num_layers, num_experts)
        if prefetch_count < 0:
            raise UserInputError(f"invalid --prefetch_count={prefetch_count}; use 0 or more")
        self.config = config
        self.store = store
        self.gate = gate
        self.prefetch_count = prefetch_count
        self.slots_per_layer = slots_per_layer
        self.device = device or jax.devices()[0]
        self.stats = ExpertStats.zeros(num_layers)
        self.trace: TraceRecorder | None = None

        self._embed_params = {k: v for k, v in params.items() if k != "layers"}
        stacked = params["layers"]
        self._layer_params = [jax.tree.map(lambda a, l=l: a[l], stacked)
                              for l in range(num_layers)]
        # The last layer predicts nothing; a zero router keeps one compiled shape.
        zero_router = jnp.zeros_like(stacked["router"][0])
        self._next_router = [stacked["router"][l + 1] for l in range(num_layers - 1)]
        self._next_router.append(zero_router)
        jax_dtype = jnp.dtype(store.dtype)
        self.caches = [LayerCache(s, num_experts, store.expert_size, jax_dtype, self.device)
                       for s in slots_per_layer]
        self._zero_row = jax.device_put(jnp.zeros((store.expert_size,), jax_dtype), self.device)
        self._no_staged_KP = jax.device_put(
            jnp.zeros((config.num_experts_per_tok, store.expert_size), jax_dtype), self.device)
        self._threshold_scalars: dict[tuple | None, list[jax.Array]] = {}
        self._pending: list[list[tuple[int, jax.Array]]] = [[] for _ in range(num_layers)]
        self._kv: list[tuple[jax.Array, jax.Array]] = []
        self._pos = 0
        self._time = 0

    # --- Public interface ------------------------------------------------------

    def start(self, prompt_ids: Sequence[int], max_len: int) -> np.ndarray:
        """Reset the KV cache to `max_len` positions and prefill the prompt.

        The device expert cache keeps its contents across prompts.
        """
        c = self.config
        shape = (1, max_len, c.num_key_value_heads, c.head_dim)
        self._kv = [(jnp.zeros(shape, c.jax_dtype), jnp.zeros(shape, c.jax_dtype))
                    for _ in range(c.num_hidden_layers)]
        self._pos = 0
        return self._run(np.asarray(prompt_ids, np.int32), prefill=True)

    def step(self, token_id: int) -> np.ndarray:
        return self._run(np.asarray([token_id], np.int32), prefill=False)

    def device_expert_bytes(self) -> int:
        """Bytes of device memory held by the expert cache slot buffers."""
        return sum(cache.slots_CP.nbytes for cache in self.caches)

    # --- One forward pass ----------------------------------------------------------

    def _run(self, tokens_T: np.ndarray, prefill: bool) -> np.ndarray:
        thresholds = self.gate.for_phase(prefill)
        gated = thresholds is not None
        self._time += 1
        x_BTD = transformer.embed(self._embed_params, jnp.asarray(tokens_T[None]))
        start_pos = jnp.int32(self._pos)
        num_layers = self.config.num_hidden_layers
        # A one-token prompt takes the decode path, so it is traced and prefetches too.
        prefill = prefill and len(tokens_T) > 1

        token_trace = None
        if self.trace is not None and not prefill:
            token_trace = ([], [], [-np.ones(self.config.num_experts_per_tok, np.int32)])

        weights_per_layer = []
        for layer in range(num_layers):
            threshold = self._thresholds_on_device(thresholds)[layer]
            k_cache, v_cache = self._kv[layer]
            x_BTD, moe_in_TD, weights_TK, experts_TK, predicted_TK, k_cache, v_cache = (
                _attention_and_route(self.config, gated, self._layer_params[layer],
                                     self._next_router[layer], x_BTD, k_cache, v_cache,
                                     start_pos, threshold))
            self._kv[layer] = (k_cache, v_cache)
            # One transfer brings all three results the host needs to the host.
            weights_np, experts_np, predicted_all = jax.device_get(
                (weights_TK, experts_TK, predicted_TK))
            weights_per_layer.append(weights_np)

            self._commit_prefetches(layer)
            if prefill:
                x_BTD = self._experts_for_prompt(layer, x_BTD, moe_in_TD, weights_TK,
                                                 experts_TK, weights_np, experts_np)
            else:
                predicted_np = predicted_all[0]
                self._issue_prefetches(layer + 1, predicted_np)
                x_BTD = self._experts_for_token(layer, x_BTD, moe_in_TD, weights_TK,
                                                weights_np[0], experts_np[0])
                if token_trace is not None:
                    token_trace[0].append(np.where(weights_np[0] > 0, experts_np[0], -1))
                    token_trace[1].append(weights_np[0])
                    if layer + 1 < num_layers:
                        token_trace[2].append(predicted_np)

        self._pos += len(tokens_T)
        _count_routing(self.stats, np.stack(weights_per_layer))
        if token_trace is not None:
            self.trace.experts.append(np.stack(token_trace[0]))
            self.trace.weights.append(np.stack(token_trace[1]))
            self.trace.predicted.append(np.stack(token_trace[2]))
        logits = transformer.unembed(self._embed_params, self.config, x_BTD[:, -1:])
        return np.asarray(logits[0, -1])

    def _thresholds_on_device(self, thresholds) -> list[jax.Array]:
        """Return per-layer device scalars of `thresholds`, made once per setting.

        Making a device scalar per layer and token costs an eager dispatch each,
        a visible share of a decode step on CPU.
        """
        if thresholds not in self._threshold_scalars:
            values = thresholds or (0.0,) * self.config.num_hidden_layers
            self._threshold_scalars[thresholds] = [
                jax.device_put(np.float32(v), self.device) for v in values]
        return self._threshold_scalars[thresholds]

    # --- Loads -------------------------------------------------------------------

    def _ensure_resident(self, layer: int, needed: list[int]) -> dict[int, int]:
        """Make the `needed` experts usable; returns {expert: staging index} for staged ones.

        A cached expert is touched. A missing one goes into the slot LRU chooses,
        which never contains another expert of `needed`, or into staging when no slot
        is free. These copies are on-demand loads. The time until they are ready
        counts as waiting.
        """
        cache = self.caches[layer]
        stats = self.stats
        staged: dict[int, int] = {}
        staged_rows: list[jax.Array] = []
        loaded: list[jax.Array] = []
        protected = set(needed)
        for expert in needed:
            if cache.slot_of(expert) >= 0:
                stats.hits[layer] += 1
                cache.touch(expert, self._use_stamp())
                if expert in cache.unused_prefetches:
                    stats.prefetches_used[layer] += 1
                continue
            started = time.perf_counter()
            row = jax.device_put(self.store.expert_flat(layer, expert), self.device)
            slot = cache.reserve(expert, self._use_stamp(), protected)
            if slot >= 0:
                cache.write(slot, row)
            else:
                staged[expert] = len(staged_rows)
                staged_rows.append(row)
            loaded.append(row)
            stats.loads[layer] += 1
            stats.bytes_host_to_device[layer] += self.store.expert_nbytes
            stats.wait_seconds[layer] += time.perf_counter() - started
        # A prefetch counts as used only by the step right after it.
        cache.unused_prefetches.clear()
        if loaded:
            started = time.perf_counter()
            jax.block_until_ready(loaded)
            stats.wait_seconds[layer] += time.perf_counter() - started
        self._staged_rows = staged_rows
        return staged

    def _issue_prefetches(self, layer: int, predicted: np.ndarray) -> None:
        """Start copies of up to `prefetch_count` predicted experts of `layer`.

        Called before the current layer's expert computation is dispatched, so
        the copy can overlap it. The write into the slot is deferred to
        `_commit_prefetches` of `layer`: a jitted write queued now would sit on
        the compute stream ahead of this layer's experts and make them wait for
        the copy.
        """
        if layer >= self.config.num_hidden_layers or self.prefetch_count == 0:
            return
        cache = self.caches[layer]
        if cache.num_slots == 0:
            return
        chosen = prefetch.choose_prefetches(predicted, cache.cached_mask(), self.prefetch_count)
        protected = set(int(e) for e in predicted)
        for expert in (int(e) for e in chosen):
            slot = cache.reserve(expert, self._prefetch_stamp(), protected)
            if slot < 0:
                continue
            row = jax.device_put(self.store.expert_flat(layer, expert), self.device)
            self._pending[layer].append((slot, row))
            cache.unused_prefetches.add(expert)
            self.stats.prefetches_issued[layer] += 1
            self.stats.bytes_host_to_device[layer] += self.store.expert_nbytes

    # LRU stamps: a prefetch issued during step t ranks just below the uses of
    # step t, the order the trace simulator replays.
    def _use_stamp(self) -> int:
        return 2 * self._time + 1

    def _prefetch_stamp(self) -> int:
        return 2 * self._time

    def _commit_prefetches(self, layer: int) -> None:
        cache = self.caches[layer]
        for slot, row in self._pending[layer]:
            cache.write(slot, row)
        self._pending[layer].clear()

    # --- Expert computation --------------------------------------------------------

    def _experts_for_token(self, layer, x_BTD, moe_in_TD, weights_TK, weights_K, experts_K):
        needed = [int(e) for e, w in zip(experts_K, weights_K) if w > 0]
        staged = self._ensure_resident(layer, list(dict.fromkeys(needed)))
        cache = self.caches[layer]
        k = self.config.num_experts_per_tok
        slot_K = np.zeros(k, np.int32)
        staged_K = np.full(k, -1, np.int32)
        for i, (expert, weight) in enumerate(zip(experts_K, weights_K)):
            expert = int(expert)
            if weight <= 0:
                # A gated-off expert has weight 0: any valid row gives an exact zero.
                slot_K[i] = 0 if cache.num_slots else -1
                staged_K[i] = -1 if cache.num_slots else 0
            elif expert in staged:
                slot_K[i], staged_K[i] = -1, staged[expert]
            else:
                slot_K[i] = cache.slot_of(expert)
        if self._staged_rows:
            rows = self._staged_rows + [self._zero_row] * (k - len(self._staged_rows))
            staged_KP = jnp.stack(rows[:k])
        else:
            staged_KP = self._no_staged_KP
        return _experts_decode(x_BTD, moe_in_TD, weights_TK, slot_K[None], staged_K[None],
                               cache.slots_CP, staged_KP)

    def _experts_for_prompt(self, layer, x_BTD, moe_in_TD, weights_TK, experts_TK,
                            weights_np, experts_np):
        used = sorted(set(int(e) for e in experts_np[weights_np > 0]))
        staged = self._ensure_resident(layer, used)
        cache = self.caches[layer]
        num_experts = self.config.num_local_experts
        slot_E = np.full(num_experts, -1, np.int32)
        staged_E = np.full(num_experts, -1, np.int32)
        for expert in used:
            if expert in staged:
                staged_E[expert] = staged[expert]
            else:
                slot_E[expert] = cache.slot_of(expert)
        rows = self._staged_rows + [self._zero_row] * (num_experts - len(self._staged_rows))
        staged_EP = jnp.stack(rows)
        return _experts_prefill(x_BTD, moe_in_TD, weights_TK, experts_TK, slot_E, staged_E,
                                cache.slots_CP, staged_EP)


def build_engine(config: MixtralConfig, params: Params, store: ExpertStore, cache_size: int,
                 slots_per_layer: Sequence[int] | None = None,
                 gate: GateSettings = GateSettings(), prefetch_count: int = 1):
    """Return a ResidentEngine when every expert fits the cache, else an OffloadedEngine.

    Raises UserInputError for a negative cache size; a size above L x E is
    logged once and treated as L x E.
    """
    total = config.num_experts_total
    if cache_size < 0:
        raise UserInputError(
            f"invalid --cache_size={cache_size}; use 0 to {total} (experts on the device)")
    if slots_per_layer is None and cache_size >= total:
        if cache_size > total:
            logging.info("--cache_size=%d exceeds the model's %d experts; every expert is "
                         "resident", cache_size, total)
        w1, w3, w2 = store.all_stacked()
        full = transformer.merge_expert_params(
            params, {"w1": jnp.asarray(w1), "w3": jnp.asarray(w3), "w2": jnp.asarray(w2)})
        return ResidentEngine(config, full, gate)
    return OffloadedEngine(config, params, store, slots_per_layer, cache_size, gate,
                           prefetch_count)
