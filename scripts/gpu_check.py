"""Check expert offloading on a GPU at Mixtral-8x7B dimensions and print JSON.

Builds --num_layers decoder layers of Mixtral-8x7B (D=4096, F=14336, 8 experts,
top-2, bfloat16) with random weights and measures:

  * host-to-device bandwidth of one expert copy (`jax.device_put`, median of
    --copy_repeats), from a numpy array (pageable memory, what the engine's
    `ExpertStore` holds) and, where JAX offers the `pinned_host` memory kind,
    from pinned host memory, against the nominal PCIe 5.0 x16 peak;
  * whether a copy overlaps expert computation: compute alone, copy alone and
    both issued together;
  * time per decoded token of `OffloadedEngine` against the copy bound
    (on-demand loads per token x expert bytes / measured bandwidth) and against
    the all-resident `ResidentEngine`.

A phase starts only if its estimated duration fits in what is left of
--time_budget_s, so a full run is meant to end within 8 minutes. --dry_run uses tiny dimensions so the script runs on
a CPU in seconds.

From the repository root, on a machine with a GPU:

  PYTHONPATH=. python scripts/gpu_check.py --output_json=runs/bench/gpu_check.json
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax import cli, profiles, sampling
from adapmoe_jax.ckpt.expert_store import ExpertStore
from adapmoe_jax.config import MIXTRAL_8X7B
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.model import layers, transformer
from adapmoe_jax.runtime import engine as engine_lib
from adapmoe_jax.runtime.stats import ExpertStats

_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Use tiny dimensions (D=64, F=128) so the script runs on a CPU.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder layers to build.")
_SLOTS_PER_LAYER = flags.DEFINE_integer(
    "slots_per_layer", 4, "Device cache slots per layer of the offloaded engine (0 to 8).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 16, "Random prompt length, in tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32,
                                   "Tokens generated per engine run (at least 2).")
_COPY_REPEATS = flags.DEFINE_integer(
    "copy_repeats", 10, "Timed copies per bandwidth measurement, after one warm-up copy.")
_OVERLAP_TOKENS = flags.DEFINE_integer(
    "overlap_tokens", 512, "Tokens in the expert computation of the overlap test.")
_TIME_BUDGET = flags.DEFINE_float(
    "time_budget_s", 420.0, "Seconds the run may take, counted from the start, model "
    "building included; a phase starts only if its estimated duration still fits.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None,
                                   "Also write the JSON printed on stdout here.")

# Estimated upper bounds of each phase's seconds at full dimensions, compilation
# included (guesses, not measured on a GPU), so the last phase also ends in time.
_PHASE_ESTIMATES = {"bandwidth": 15.0, "overlap": 30.0, "resident engine": 60.0,
                    "offloaded engine": 90.0}

# PCIe 5.0 x16 moves 32 GT/s on each of 16 lanes with 128b/130b encoding, about
# 63 GB/s per direction, commonly quoted as 64 GB/s.
# NOTE: assumes the GPU's host link is PCIe 5.0 x16, as for H200 boards attached
# to x86 hosts. The script does not detect the link.
_NOMINAL_PEAK_GBPS = 64.0
_PEAK_NOTE = ("nominal PCIe 5.0 x16 peak per direction (32 GT/s x 16 lanes, 128b/130b), "
              "not a measurement; the link itself is not detected")
_TIMING_REPEATS = 5


def build_config(dry_run: bool, num_layers: int):
    """Return Mixtral-8x7B with `num_layers` layers, or its tiny stand-in for --dry_run."""
    config = MIXTRAL_8X7B.replace(num_hidden_layers=num_layers)
    if dry_run:
        config = config.replace(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=16, vocab_size=512)
    return config


def build_model(config, seed: int = 0):
    """Return (non-expert params, full params, host ExpertStore) with random weights.

    The experts are initialised on the device, flattened into the store's [L, E, P]
    layout and copied to a numpy array, so the store contains every expert on the host.
    """
    full = transformer.init_params(config, seed)
    nonexpert, experts = transformer.split_expert_params(full)
    flat_LEP = layers.flatten_experts(experts["w1"], experts["w3"], experts["w2"])
    store = ExpertStore(np.asarray(jax.device_get(flat_LEP)), config.hidden_size,
                        config.intermediate_size)
    del flat_LEP
    return nonexpert, full, store


def pinned_host_support(device) -> tuple[bool, str]:
    """Return whether `device` offers the pinned_host memory kind, and the kinds it has."""
    kinds = sorted(memory.kind for memory in device.addressable_memories())
    return "pinned_host" in kinds, ", ".join(kinds)


def copy_to_pinned(array: np.ndarray, device) -> jax.Array:
    sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    pinned = jax.device_put(array, sharding)
    pinned.block_until_ready()
    return pinned


def device_memory(device) -> jax.sharding.Sharding:
    """Return a sharding on the device's default memory.

    The memory kind is named because `jax.device_put(pinned_array, device)`
    raises a memory kind mismatch in jax 0.10.2 instead of copying.
    """
    return jax.sharding.SingleDeviceSharding(device, memory_kind=device.default_memory().kind)


def timed_copy(source, device) -> float:
    """Copy `source` to the device's default memory; return the seconds until it is ready."""
    started = time.perf_counter()
    jax.device_put(source, device_memory(device)).block_until_ready()
    return time.perf_counter() - started


def measure_bandwidth(sources: Sequence[Any], device, repeats: int,
                      nbytes: int) -> dict[str, Any]:
    """Time `repeats` copies, cycling through `sources`; the first untimed copy warms up."""
    timed_copy(sources[0], device)
    seconds = [timed_copy(sources[i % len(sources)], device) for i in range(repeats)]
    median = statistics.median(seconds)
    return {"median_seconds": median, "median_gbps": nbytes / median / 1e9,
            "seconds": seconds}


@jax.jit
def repeated_expert(x_TD, expert_P, iterations):
    """Apply one SwiGLU expert `iterations` times; each pass reads the previous output."""
    width = x_TD.shape[-1]
    hidden = expert_P.shape[-1] // (3 * width)
    w1, w3, w2 = layers.unflatten_experts(expert_P, width, hidden)

    def body(_, x_TD):
        return x_TD + 0.01 * layers.swiglu_expert(x_TD, w1, w3, w2)

    return jax.lax.fori_loop(0, iterations, body, x_TD)


def median_seconds(action: Callable[[], Any]) -> float:
    """Run `action` (which blocks until its results are ready) and return the median time."""
    seconds = []
    for _ in range(_TIMING_REPEATS):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure_overlap(x_TD, expert_P, source, copy_seconds: float, device) -> dict[str, Any]:
    """Time compute alone, the copy alone, and both issued together (compute first).

    The compute repeats one expert until it takes about as long as one copy, so
    a full overlap would hide about half of the sum. `overlapped` is set when
    issuing both together saves at least half of the shorter one.
    """
    single = jnp.int32(1)
    repeated_expert(x_TD, expert_P, single).block_until_ready()
    single_pass = median_seconds(lambda: repeated_expert(x_TD, expert_P, single)
                                 .block_until_ready())
    iterations = int(min(max(round(copy_seconds / single_pass), 1), 10_000))
    count = jnp.int32(iterations)

    def compute_only():
        repeated_expert(x_TD, expert_P, count).block_until_ready()

    target = device_memory(device)

    def copy_only():
        jax.device_put(source, target).block_until_ready()

    def both():
        out = repeated_expert(x_TD, expert_P, count)
        row = jax.device_put(source, target)
        jax.block_until_ready((out, row))

    compute_seconds = median_seconds(compute_only)
    copy_alone = median_seconds(copy_only)
    together = median_seconds(both)
    hidden = compute_seconds + copy_alone - together
    shorter = min(compute_seconds, copy_alone)
    return {
        "compute_iterations": iterations,
        "compute_seconds": compute_seconds,
        "copy_seconds": copy_alone,
        "together_seconds": together,
        "sum_exceeds_together": compute_seconds + copy_alone > together,
        "hidden_seconds": hidden,
        "hidden_share_of_shorter": hidden / shorter,
        "overlapped": hidden >= 0.5 * shorter,
    }


class _PrefillSnapshot:
    """Forwards `start` and `step` to an engine and copies its counters after the prefill."""

    def __init__(self, engine):
        self.engine = engine
        self.after_prefill: ExpertStats | None = None

    def start(self, prompt_ids, max_len):
        logits = self.engine.start(prompt_ids, max_len)
        self.after_prefill = copy.deepcopy(self.engine.stats)
        return logits

    def step(self, token_id):
        return self.engine.step(token_id)


def time_engine(make_engine: Callable[[], Any], prompt_ids: list[int],
                new_tokens: int) -> dict[str, Any]:
    """Run a warm-up generation (it compiles), then time one on a fresh engine.

    Counters cover the timed run's decode steps only.
    """
    settings = sampling.SamplingSettings()
    started = time.perf_counter()
    sampling.generate(make_engine(), prompt_ids, new_tokens, (), settings)
    warmup_seconds = time.perf_counter() - started

    engine = make_engine()
    snapshot = _PrefillSnapshot(engine)
    result = sampling.generate(snapshot, prompt_ids, new_tokens, (), settings)
    decode = ExpertStats(**{
        field.name: getattr(engine.stats, field.name) - getattr(snapshot.after_prefill,
                                                                 field.name)
        for field in dataclasses.fields(ExpertStats)}).summary()
    steps = result.decode_steps
    return {
        "warmup_seconds": warmup_seconds,
        "prefill_seconds": result.prefill_seconds,
        "seconds_per_token": result.decode_seconds / steps,
        "expert_loads_per_token": decode["expert_loads_per_token"],
        "cache_hit_rate": decode["cache_hit_rate"],
        "prefetches_issued_per_token": decode["prefetches_issued"] / steps,
        "prefetch_precision": decode["prefetch_precision"],
        "bytes_host_to_device_per_token": decode["bytes_host_to_device"] / steps,
        "copy_wait_seconds_per_token": decode["copy_wait_seconds"] / steps,
    }


def copy_bounds(offloaded: dict[str, Any], expert_nbytes: int,
                bandwidth_gbps: dict[str, float]) -> dict[str, Any]:
    """Compare the offloaded time per token with the time its copies take at each bandwidth.

    `on_demand` counts only the loads a layer waits for; `all_copies` adds the
    prefetches, the time if no copy overlapped anything.
    """
    bounds = {}
    on_demand_bytes = offloaded["expert_loads_per_token"] * expert_nbytes
    all_bytes = offloaded["bytes_host_to_device_per_token"]
    for source, gbps in bandwidth_gbps.items():
        on_demand = on_demand_bytes / (gbps * 1e9)
        bounds[source] = {
            "on_demand_seconds_per_token": on_demand,
            "all_copies_seconds_per_token": all_bytes / (gbps * 1e9),
            "time_over_on_demand_bound": (offloaded["seconds_per_token"] / on_demand
                                          if on_demand else None),
        }
    return bounds


class PhaseClock:
    """Time budget of the run: a phase starts only if its estimated duration is left."""

    def __init__(self, budget_seconds: float):
        self.deadline = time.monotonic() + budget_seconds
        self.skipped: list[str] = []

    def allows(self, phase: str, estimate_seconds: float) -> bool:
        left = self.deadline - time.monotonic()
        if left >= estimate_seconds:
            logging.info("starting %s (%.0f s of the budget left)", phase, left)
            return True
        logging.warning("skipped %s: %.0f s of --time_budget_s left, %.0f s estimated",
                        phase, max(left, 0.0), estimate_seconds)
        self.skipped.append(phase)
        return False


def _estimate(phase: str) -> float:
    """Return the phase's estimated seconds, or 0 with --dry_run, whose phases take seconds."""
    return 0.0 if _DRY_RUN.value else _PHASE_ESTIMATES[phase]


def check_flags() -> None:
    if _NUM_LAYERS.value < 2:
        raise UserInputError(f"invalid --num_layers={_NUM_LAYERS.value}; use 2 or more")
    if not 0 <= _SLOTS_PER_LAYER.value <= 8:
        raise UserInputError(
            f"invalid --slots_per_layer={_SLOTS_PER_LAYER.value}; use 0 to 8")
    if _NEW_TOKENS.value < 2:
        raise UserInputError(f"invalid --new_tokens={_NEW_TOKENS.value}; use 2 or more")
    for name, value in (("prompt_tokens", _PROMPT_TOKENS.value),
                        ("copy_repeats", _COPY_REPEATS.value),
                        ("overlap_tokens", _OVERLAP_TOKENS.value)):
        if value < 1:
            raise UserInputError(f"invalid --{name}={value}; use 1 or more")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(f"unexpected arguments {argv[1:]}; pass settings as flags")
    check_flags()
    started_all = time.perf_counter()
    clock = PhaseClock(_TIME_BUDGET.value)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    config = build_config(_DRY_RUN.value, _NUM_LAYERS.value)
    report: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "jax_version": jax.__version__, "device": str(device),
                    "device_kind": device.device_kind},
        "dry_run": _DRY_RUN.value,
        "dims": {"hidden_size": config.hidden_size,
                 "intermediate_size": config.intermediate_size,
                 "num_layers": config.num_hidden_layers,
                 "num_experts": config.num_local_experts, "dtype": config.dtype},
        "nominal_peak_gbps": _NOMINAL_PEAK_GBPS if on_gpu else None,
        "peak_note": _PEAK_NOTE if on_gpu else "no GPU, so no peak applies",
    }

    started = time.perf_counter()
    nonexpert, full, store = build_model(config)
    report["build_seconds"] = time.perf_counter() - started
    report["expert_bytes"] = store.expert_nbytes
    pinned_supported, kinds = pinned_host_support(device)
    report["memory_kinds"] = kinds

    pageable_sources = [store.expert_flat(0, expert) for expert in range(store.num_experts)]
    pinned_sources = []
    if pinned_supported:
        try:
            pinned_sources = [copy_to_pinned(source, device) for source in pageable_sources[:4]]
        except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError) as error:
            logging.warning("copying experts to pinned host memory failed: %s", error)
            report["pinned_host_error"] = str(error)
    report["pinned_host_used"] = bool(pinned_sources)

    bandwidth: dict[str, Any] = {}
    if clock.allows("bandwidth", _estimate("bandwidth")):
        bandwidth["pageable"] = measure_bandwidth(pageable_sources, device,
                                                  _COPY_REPEATS.value, store.expert_nbytes)
        if pinned_sources:
            bandwidth["pinned"] = measure_bandwidth(pinned_sources, device,
                                                    _COPY_REPEATS.value, store.expert_nbytes)
        if on_gpu:
            for result in bandwidth.values():
                result["share_of_nominal_peak"] = result["median_gbps"] / _NOMINAL_PEAK_GBPS
    report["bandwidth"] = bandwidth

    if bandwidth and clock.allows("overlap", _estimate("overlap")):
        x_TD = jax.random.normal(jax.random.PRNGKey(1),
                                 (_OVERLAP_TOKENS.value, config.hidden_size), config.jax_dtype)
        expert_P = jax.device_put(pageable_sources[0], device)
        report["overlap"] = {
            source: measure_overlap(x_TD, expert_P, sources[-1],
                                    bandwidth[source]["median_seconds"], device)
            for source, sources in (("pageable", pageable_sources),
                                    ("pinned", pinned_sources)) if sources}

    prompt_ids = np.random.default_rng(0).integers(
        3, config.vocab_size, _PROMPT_TOKENS.value).tolist()
    new_tokens = _NEW_TOKENS.value
    if clock.allows("resident engine", _estimate("resident engine")):
        report["resident"] = time_engine(
            lambda: engine_lib.ResidentEngine(config, full), prompt_ids, new_tokens)
    del full
    slots = [_SLOTS_PER_LAYER.value] * config.num_hidden_layers
    if clock.allows("offloaded engine", _estimate("offloaded engine")):
        offloaded = time_engine(
            lambda: engine_lib.OffloadedEngine(config, nonexpert, store, slots_per_layer=slots),
            prompt_ids, new_tokens)
        offloaded["slots_per_layer"] = slots
        gbps = {source: result["median_gbps"] for source, result in bandwidth.items()}
        offloaded["copy_bounds"] = copy_bounds(offloaded, store.expert_nbytes, gbps)
        if "resident" in report:
            offloaded["time_over_resident"] = (offloaded["seconds_per_token"]
                                               / report["resident"]["seconds_per_token"])
        report["offloaded"] = offloaded

    memory = device.memory_stats()
    report["device_peak_bytes_in_use"] = memory.get("peak_bytes_in_use") if memory else None
    report["skipped_phases"] = clock.skipped
    report["total_seconds"] = time.perf_counter() - started_all
    print(json.dumps(report, indent=1))
    if _OUTPUT_JSON.value:
        profiles.write_json_atomic(report, _OUTPUT_JSON.value)


if __name__ == "__main__":
    cli.run(main)
