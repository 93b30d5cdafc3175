"""Replay a routing trace under cache policies and count the expert copies each needs.

A routing trace is an npz file with three [tokens, L, K] arrays:
  experts    int32, each token's selected experts per layer. The id -1 marks
             an expert that adaptive gating dropped, which needs no load.
  weights    float32, the routing weights of those experts.
  predicted  int32, the experts predicted for layer l at layer l-1 (-1 for layer 0).

The baseline is LRU with equal slots per layer, mixtral-offloading's policy.
The other rows add cross-layer prefetching, then adaptive gating, then the DP
allocation of slots. The last row is Belady's optimal replacement with the DP
allocation, which gives the minimum loads of any replacement policy on that trace.

Example:
  python -m adapmoe_jax.simulate --trace=trace.npz --profile=configs/mixtral-8x7b.json \
      --cache_size=64 --preset=mixtral-8x7b
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import zipfile
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from adapmoe_jax import allocation
from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import gating
from adapmoe_jax.policies import prefetch
from adapmoe_jax.policies import replacement

_TRACE_ARRAYS = ("experts", "weights", "predicted")


# --- Routing traces -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RoutingTrace:
    """Per-token routing of every layer, as three [tokens, L, K] arrays."""

    experts: np.ndarray
    weights: np.ndarray
    predicted: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    def max_expert_id(self) -> int:
        return int(max(self.experts.max(initial=-1), self.predicted.max(initial=-1)))

    def layer_steps(self, layer: int) -> list[tuple[int, ...]]:
        """Return the layer's trace as `replacement` takes it: one step per token."""
        return replacement.normalize_trace(self.experts[:, layer, :].tolist())


def validate_trace(trace: RoutingTrace, origin: str = "trace") -> RoutingTrace:
    """Return the trace with canonical dtypes, or raise UserInputError naming `origin`."""
    shape = trace.experts.shape
    if len(shape) != 3 or shape[0] == 0:
        raise UserInputError(
            f"invalid routing trace {origin}: experts has shape {shape}; expected "
            "[tokens, layers, K] with at least one token")
    for name in _TRACE_ARRAYS:
        array = getattr(trace, name)
        if array.shape != shape:
            raise UserInputError(
                f"invalid routing trace {origin}: {name} has shape {array.shape}, "
                f"experts has {shape}; all three must match")
    for name in ("experts", "predicted"):
        array = getattr(trace, name)
        if not np.issubdtype(array.dtype, np.integer) or array.min() < -1:
            raise UserInputError(
                f"invalid routing trace {origin}: {name} must hold integer expert ids "
                "or -1")
    if np.any(trace.experts[:, :, 0] < 0):
        raise UserInputError(
            f"invalid routing trace {origin}: a token has no first expert (-1 in "
            "experts[:, :, 0])")
    return RoutingTrace(trace.experts.astype(np.int32), trace.weights.astype(np.float32),
                        trace.predicted.astype(np.int32))


def load_trace(path: str) -> RoutingTrace:
    """Read and validate a routing trace npz file."""
    try:
        data = np.load(path)
    except FileNotFoundError:
        raise UserInputError(
            f"routing trace not found: {path}; record one with the --trace_out option "
            "of generate or evaluate") from None
    except (OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise UserInputError(f"invalid routing trace {path}: {error}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserInputError(
            f"invalid routing trace {path}: expected an npz archive of arrays "
            f"{list(_TRACE_ARRAYS)}")
    with data:
        missing = [name for name in _TRACE_ARRAYS if name not in data]
        if missing:
            raise UserInputError(
                f"invalid routing trace {path}: missing array {missing[0]!r}; a "
                f"trace needs {list(_TRACE_ARRAYS)}")
        trace = RoutingTrace(*(np.asarray(data[name]) for name in _TRACE_ARRAYS))
    return validate_trace(trace, origin=path)


def save_trace(trace: RoutingTrace, path: str) -> None:
    """Write the trace as an npz file; a reader sees the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as f:
        tmp_path = f.name
        try:
            np.savez(f, **{name: getattr(trace, name) for name in _TRACE_ARRAYS})
        except BaseException:
            f.close()
            os.remove(tmp_path)
            raise
    os.replace(tmp_path, path)


def gate_trace(trace: RoutingTrace, thresholds_L: Sequence[float]) -> RoutingTrace:
    """Apply the adaptive gate to a recorded trace, with one threshold per layer.

    NOTE: a real gated run also changes the hidden states, so later layers may
    route differently from this re-gated trace. A trace recorded with gating on
    is the exact input, and this is the approximation when only a stock trace
    exists.
    """
    thresholds_L = np.asarray(thresholds_L, dtype=np.float32)
    if thresholds_L.shape != (trace.num_layers,):
        raise UserInputError(
            f"got {thresholds_L.shape[0]} gate thresholds for a trace of "
            f"{trace.num_layers} layers; give one per layer")
    gate_layers = jax.vmap(gating.adaptive_gate, in_axes=(1, 0), out_axes=1)
    weights, active = gate_layers(trace.weights, thresholds_L)
    experts = gating.drop_inactive(trace.experts, active)
    return RoutingTrace(np.asarray(experts), np.asarray(weights), trace.predicted)


# --- Cost model -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CostModel:
    """A modelled time per token, an estimate and not a measurement.

    Copies share one host-to-device link and run one at a time. A prefetch
    overlaps the expert compute of the layer that issues it, and an on-demand
    load overlaps nothing. Attention and other non-expert work are left out.

    Attributes:
      expert_bytes: bytes of one expert's weights.
      bandwidth_gbps: link bandwidth in GB/s (1e9 bytes per second).
      expert_compute_ms: time to run one expert for one token.
    """

    expert_bytes: int
    bandwidth_gbps: float
    expert_compute_ms: float

    def __post_init__(self):
        if self.expert_bytes <= 0 or self.bandwidth_gbps <= 0 or self.expert_compute_ms < 0:
            raise UserInputError(
                f"invalid cost model: expert_bytes={self.expert_bytes}, "
                f"bandwidth_gbps={self.bandwidth_gbps}, expert_compute_ms="
                f"{self.expert_compute_ms}; bytes and bandwidth must be positive, compute >= 0")

    @property
    def load_ms(self) -> float:
        return self.expert_bytes / (self.bandwidth_gbps * 1e9) * 1e3

    def layer_ms(self, on_demand: int, prefetched: int, active: int) -> float:
        """Return the modelled milliseconds of one layer for one token."""
        compute = active * self.expert_compute_ms
        return on_demand * self.load_ms + max(compute, prefetched * self.load_ms)


def expert_bytes_of(config: MixtralConfig) -> int:
    """Return the bytes of one SwiGLU expert (w1, w3 and w2, each D x F) in the config's dtype."""
    itemsize = np.dtype(config.jax_dtype).itemsize
    return 3 * config.hidden_size * config.intermediate_size * itemsize


# Mixtral-8x7B in bfloat16: 3 x 4096 x 14336 x 2 bytes, about 352 MB per expert.
# Both presets assume PCIe 4.0 x16 at 25 GB/s effective (32 GB/s raw).
# NOTE: expert_compute_ms values are estimates, not measurements. Decoding at
# batch 1 is bound by memory bandwidth, so for 8x7B 0.2 ms is the time to read
# one expert's weights at about 1.8 TB/s. For the embedded model, 0.01 ms is a
# typical kernel launch overhead.
PRESETS = {
    "mixtral-8x7b": dict(expert_bytes=3 * 4096 * 14336 * 2, bandwidth_gbps=25.0,
                         expert_compute_ms=0.2),
    # The expert size comes from the embedded model's config.json at run time.
    "embedded": dict(expert_bytes=None, bandwidth_gbps=25.0, expert_compute_ms=0.01),
}


# --- Simulation -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Counts from replaying one trace under one policy.

    Attributes:
      num_tokens: tokens replayed.
      accesses: expert uses, one per (token, layer, active expert).
      on_demand_loads: copies a layer had to wait for.
      prefetch_copies: copies issued ahead by prefetching.
      prefetch_hits: prefetched experts that their layer then used.
      modelled_ms: total modelled time, or None without a cost model.
    """

    num_tokens: int
    accesses: int
    on_demand_loads: int
    prefetch_copies: int = 0
    prefetch_hits: int = 0
    modelled_ms: float | None = None

    @property
    def loads_per_token(self) -> float:
        return self.on_demand_loads / self.num_tokens

    @property
    def copies_per_token(self) -> float:
        return (self.on_demand_loads + self.prefetch_copies) / self.num_tokens

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.on_demand_loads / self.accesses if self.accesses else 1.0

    @property
    def ms_per_token(self) -> float | None:
        return None if self.modelled_ms is None else self.modelled_ms / self.num_tokens

    def to_json_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.update(loads_per_token=self.loads_per_token,
                      copies_per_token=self.copies_per_token, hit_rate=self.hit_rate,
                      ms_per_token=self.ms_per_token)
        return fields


def _check_allocation(trace: RoutingTrace, slots_per_layer: Sequence[int],
                      num_experts: int) -> None:
    if len(slots_per_layer) != trace.num_layers:
        raise UserInputError(
            f"the allocation has {len(slots_per_layer)} layers but the trace has "
            f"{trace.num_layers}; use an allocation made for this model")
    if trace.max_expert_id() >= num_experts:
        raise UserInputError(
            f"the trace uses expert id {trace.max_expert_id()} but num_experts is "
            f"{num_experts}; pass the model's expert count")


def simulate_lru(trace: RoutingTrace, slots_per_layer: Sequence[int], num_experts: int,
                 prefetch_count: int = 0, cost_model: CostModel | None = None
                 ) -> SimulationResult:
    """Replay the trace through per-layer LRU caches, optionally with prefetching.

    At token t and layer l, the layer first looks up its active experts
    (stamp 2t + 1) and loads the missing ones, protecting the token's experts
    from eviction. Then, with prefetching, it copies the first
    `prefetch_count` experts predicted for layer l+1 that are not cached into
    layer l+1's LRU victim slots (stamp 2t), protecting the other predicted
    experts. A prefetched expert that layer l+1 uses is a hit.
    """
    _check_allocation(trace, slots_per_layer, num_experts)
    states = [replacement.LruState.init(slots, num_experts) for slots in slots_per_layer]
    counts = dict(accesses=0, on_demand_loads=0, prefetch_copies=0, prefetch_hits=0)
    modelled_ms = 0.0
    prefetched_for: list[set[int]] = [set() for _ in slots_per_layer]
    for token in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            active = [int(e) for e in trace.experts[token, layer] if e >= 0]
            states[layer], loads = _serve_layer(states[layer], active, 2 * token + 1)
            counts["accesses"] += len(active)
            counts["on_demand_loads"] += loads
            counts["prefetch_hits"] += len(prefetched_for[layer].intersection(active))
            prefetched_for[layer] = set()

            copies = 0
            if prefetch_count and layer + 1 < trace.num_layers:
                predicted = trace.predicted[token, layer + 1]
                states[layer + 1], chosen = _prefetch_layer(
                    states[layer + 1], predicted, prefetch_count, 2 * token)
                prefetched_for[layer + 1] = set(chosen)
                copies = len(chosen)
                counts["prefetch_copies"] += copies
            if cost_model is not None:
                modelled_ms += cost_model.layer_ms(loads, copies, len(active))
    return SimulationResult(num_tokens=trace.num_tokens,
                            modelled_ms=modelled_ms if cost_model else None, **counts)


def _serve_layer(state: replacement.LruState, active: list[int], time: int):
    """Look up a token's experts in one layer; returns (new_state, on-demand loads)."""
    loads = 0
    for expert in active:
        if replacement.lookup(state, expert) != replacement.EMPTY:
            state = replacement.touch(state, expert, time)
        else:
            loads += 1
            state, _, _ = replacement.insert(state, expert, time, protected=active)
    return state, loads


def _prefetch_layer(state: replacement.LruState, predicted: np.ndarray, count: int,
                    time: int):
    """Copy up to `count` predicted experts into the layer; returns (new_state, copied ids)."""
    chosen = prefetch.choose_prefetches(predicted, state.cached_mask(), count)
    protected = [int(e) for e in predicted if e >= 0]
    copied = []
    for expert in chosen.tolist():
        state, slot, _ = replacement.insert(state, expert, time, protected=protected)
        if slot != replacement.EMPTY:
            copied.append(expert)
    return state, copied


def simulate_belady(trace: RoutingTrace, slots_per_layer: Sequence[int], num_experts: int,
                    cost_model: CostModel | None = None) -> SimulationResult:
    """Replay the trace under Belady's optimal replacement, without prefetching.

    Its on-demand loads are also its total copies: the minimum copies any
    replacement policy, with or without prefetching, can make on this trace
    with this allocation.
    """
    _check_allocation(trace, slots_per_layer, num_experts)
    loads_TL = np.stack([
        replacement.belady_step_loads(trace.layer_steps(layer), slots)
        for layer, slots in enumerate(slots_per_layer)], axis=1)
    active_TL = np.sum(trace.experts >= 0, axis=-1)
    modelled_ms = None
    if cost_model is not None:
        modelled_ms = float(np.sum(loads_TL) * cost_model.load_ms
                            + np.sum(active_TL) * cost_model.expert_compute_ms)
    return SimulationResult(num_tokens=trace.num_tokens, accesses=int(active_TL.sum()),
                            on_demand_loads=int(loads_TL.sum()), modelled_ms=modelled_ms)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A comparison row: its trace (stock or gated), allocation, prefetching and replacement."""

    name: str
    slots_per_layer: tuple[int, ...]
    gated: bool = False
    prefetch_count: int = 0
    replacement: str = "lru"


def standard_policies(uniform_slots: Sequence[int], dp_slots: Sequence[int] | None,
                      prefetch_count: int, with_gating: bool) -> list[Policy]:
    """Return the comparison rows, from the LRU baseline to the Belady bound.

    Each LRU row adds one technique to the row before it. With prefetch_count 0
    the rows leave prefetching out, and without `dp_slots` the Belady row uses
    the uniform allocation.
    """
    uniform_slots = tuple(uniform_slots)
    lru = "lru+prefetch" if prefetch_count else "lru"
    gate = "+adapgate" if with_gating else ""
    rows = [Policy("lru", uniform_slots)]
    if prefetch_count:
        rows.append(Policy(lru, uniform_slots, prefetch_count=prefetch_count))
    if with_gating:
        rows.append(Policy(lru + gate, uniform_slots, gated=True,
                           prefetch_count=prefetch_count))
    if dp_slots is None:
        rows.append(Policy("belady" + gate, uniform_slots, gated=with_gating,
                           replacement="belady"))
        return rows

    dp_slots = tuple(dp_slots)
    rows.append(Policy(lru + gate + "+dp", dp_slots, gated=with_gating,
                       prefetch_count=prefetch_count))
    rows.append(Policy("belady" + gate + "+dp", dp_slots, gated=with_gating,
                       replacement="belady"))
    return rows


def run_policy(policy: Policy, trace: RoutingTrace, gated_trace: RoutingTrace | None,
               num_experts: int, cost_model: CostModel | None = None) -> SimulationResult:
    """Simulate one comparison row on the stock or the gated trace."""
    source = gated_trace if policy.gated else trace
    if source is None:
        raise UserInputError(f"policy {policy.name} needs a gated trace")
    if policy.replacement == "belady":
        return simulate_belady(source, policy.slots_per_layer, num_experts, cost_model)
    return simulate_lru(source, policy.slots_per_layer, num_experts,
                        policy.prefetch_count, cost_model)


# --- Command line -------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Define the flags at run time, so importing the library defines none."""
    flags.DEFINE_string("trace", None, "Routing trace npz to replay (stock routing).")
    flags.DEFINE_string("gated_trace", None,
                        "Routing trace recorded with adaptive gating on. Without it, the "
                        "gated rows re-gate --trace with the --profile thresholds.")
    flags.DEFINE_string("profile", None, "Model profile JSON (gate thresholds, DP costs).")
    flags.DEFINE_float("gate_budget", None, "Gate budget T, by default the profile's.")
    flags.DEFINE_integer("cache_size", None, "Total expert slots over all layers.")
    flags.DEFINE_integer("num_experts", None,
                         "Experts per layer; defaults to the profile's, else the largest "
                         "id in the trace plus one.")
    flags.DEFINE_string("allocation_file", None,
                        "Slots per layer from `python -m adapmoe_jax.allocate`; without "
                        "it the DP allocation is computed here.")
    flags.DEFINE_enum("dp_cost", "analytic", ["analytic", "empirical"],
                      "Cost of the DP allocation: the profile's analytic cost, or LRU "
                      "loads measured on the trace itself (an optimistic fit).")
    flags.DEFINE_integer("prefetch_count", 1, "Experts prefetched per layer and token.")
    flags.DEFINE_enum("preset", None, sorted(PRESETS),
                      "Cost model preset. Both assume PCIe 4.0 x16 at 25 GB/s effective.")
    flags.DEFINE_string("model_config", None,
                        "HF config.json whose expert size sets --expert_bytes. The "
                        "embedded preset defaults to the embedded model's config.")
    flags.DEFINE_integer("expert_bytes", None, "Bytes of one expert's weights.")
    flags.DEFINE_float("bandwidth_gbps", None,
                       "Host-to-device bandwidth in GB/s (1e9 bytes per second, not bits).")
    flags.DEFINE_float("expert_compute_ms", None,
                       "Milliseconds to run one expert for one token.")
    flags.DEFINE_string("output_json", None, "Optional path for the results as JSON.")
    flags.mark_flags_as_required(["trace", "cache_size"])


def _cost_model_from_flags() -> CostModel | None:
    settings = dict(PRESETS[FLAGS.preset]) if FLAGS.preset else {}
    model_config = FLAGS.model_config
    embedded_config = os.path.join(cli.DEFAULT_MODEL_DIR, "config.json")
    if FLAGS.preset == "embedded" and not model_config and os.path.isfile(embedded_config):
        model_config = embedded_config
    if model_config:
        settings["expert_bytes"] = expert_bytes_of(MixtralConfig.from_json_file(model_config))
    for name in ("expert_bytes", "bandwidth_gbps", "expert_compute_ms"):
        if FLAGS[name].value is not None:
            settings[name] = FLAGS[name].value
    if not settings:
        return None
    missing = [name for name in ("expert_bytes", "bandwidth_gbps", "expert_compute_ms")
               if settings.get(name) is None]
    if missing:
        raise UserInputError(
            f"the cost model is missing {missing[0]}; pass --{missing[0]}"
            + (" or --model_config" if missing[0] == "expert_bytes" else ""))
    return CostModel(**settings)


def _dp_slots(profile, trace_for_dp: RoutingTrace, num_experts: int, gated: bool):
    """Return the DP allocation the flags ask for, or None when none can be made."""
    cache_size = FLAGS.cache_size
    if FLAGS.allocation_file:
        return allocation.read_allocation(FLAGS.allocation_file, trace_for_dp.num_layers,
                                          num_experts)
    if FLAGS.dp_cost == "empirical":
        layer_traces = [trace_for_dp.layer_steps(l) for l in range(trace_for_dp.num_layers)]
        table = allocation.empirical_cost_table(layer_traces, num_experts)
        return allocation.allocate_slots(table, cache_size)
    if profile is None:
        return None
    return allocation.dp_allocation(profile, cache_size, adapgate=gated)


def _print_table(rows) -> None:
    header = (f"{'policy':<28}{'loads/token':>12}{'copies/token':>14}{'hit rate':>10}"
              f"{'ms/token':>10}")
    print(header)
    for policy, result in rows:
        ms = "-" if result.ms_per_token is None else f"{result.ms_per_token:.2f}"
        print(f"{policy.name:<28}{result.loads_per_token:>12.3f}"
              f"{result.copies_per_token:>14.3f}{result.hit_rate:>10.3f}{ms:>10}")


def run_from_flags() -> list[tuple[Policy, SimulationResult]]:
    """Run every comparison row the flags allow; print and optionally save the results."""
    trace = load_trace(FLAGS.trace)
    profile = profiles.load_profile(FLAGS.profile) if FLAGS.profile else None
    num_experts = FLAGS.num_experts or (profile.num_experts if profile
                                        else trace.max_expert_id() + 1)
    if profile is not None:
        profiles.check_matches(profile, trace.num_layers, num_experts)

    gated_trace = None
    if FLAGS.gated_trace:
        gated_trace = load_trace(FLAGS.gated_trace)
        if gated_trace.num_layers != trace.num_layers:
            raise UserInputError(
                f"--gated_trace has {gated_trace.num_layers} layers but --trace has "
                f"{trace.num_layers}; record both traces with the same model")
    elif profile is not None:
        gated_trace = gate_trace(trace, profile.gate_thresholds(FLAGS.gate_budget))
    with_gating = gated_trace is not None

    uniform = allocation.uniform_allocation(trace.num_layers, num_experts, FLAGS.cache_size)
    dp_slots = _dp_slots(profile, gated_trace or trace, num_experts, with_gating)
    cost_model = _cost_model_from_flags()
    rows = []
    for policy in standard_policies(uniform, dp_slots, FLAGS.prefetch_count, with_gating):
        rows.append((policy, run_policy(policy, trace, gated_trace, num_experts, cost_model)))

    _print_table(rows)
    if FLAGS.output_json:
        profiles.write_json_atomic(_report(rows, trace, cost_model), FLAGS.output_json)
    return rows


def _report(rows, trace: RoutingTrace, cost_model: CostModel | None) -> dict:
    policies = []
    for policy, result in rows:
        entry = {"name": policy.name, "slots_per_layer": list(policy.slots_per_layer)}
        entry.update(result.to_json_dict())
        policies.append(entry)
    return {"cache_size": FLAGS.cache_size, "num_tokens": trace.num_tokens,
            "cost_model": dataclasses.asdict(cost_model) if cost_model else None,
            "policies": policies}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    run_from_flags()


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
