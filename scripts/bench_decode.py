"""Benchmark offloaded decoding over device cache sizes.

For each --cache_sizes entry the script builds an engine with the uniform
allocation, prefetch on and no gating, plus an --adapgate row with the DP
allocation when a model profile is found. Each row runs one warm-up generation
(it compiles, and is timed apart), then --repeats timed greedy generations of
--new_tokens tokens from the same prompt. Every timed generation gets a fresh
engine, so no run starts with experts cached by an earlier one. The jitted
functions are module-level and keyed by shapes, so only the warm-up compiles.

Two more measurements follow the rows:
  * the offloaded engine with every slot of every layer (all experts cached
    after its warm-up, and the engine reused) against the fully jitted
    `ResidentEngine` step, as a ratio of time per decoded token;
  * device memory held by experts at --memory_cache_size against all expert
    bytes, from the slot buffer sizes and, where the device reports it, from
    `memory_stats()`.

From the repository root:

  PYTHONPATH=. python scripts/bench_decode.py --output_json=runs/bench/decode.json \
      --markdown_out=runs/bench/decode.md
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import os
import platform
import shlex
import statistics
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from adapmoe_jax import allocation, cli, profiles, sampling
from adapmoe_jax.ckpt.loading import load_checkpoint
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.model import transformer
from adapmoe_jax.runtime import engine as engine_lib
from adapmoe_jax.runtime.stats import ExpertStats
from adapmoe_jax.text.tokenizer import Tokenizer

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "HF or converted checkpoint directory; default: the embedded model "
    "(adapmoe_jax/default_model).")
_PROMPT = flags.DEFINE_string("prompt", "Once upon a time",
                              "Prompt text; every generation starts from it.")
_NEW_TOKENS = flags.DEFINE_integer(
    "new_tokens", 64, "Tokens generated per run (at least 2). EOS does not end a run, so "
    "every run decodes the same number of tokens.")
_CACHE_SIZES = flags.DEFINE_list(
    "cache_sizes", ["32", "64", "128", "256"],
    "Comma-separated device cache sizes, in experts over all layers. A size of at least "
    "L x E runs the all-resident engine.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed generations per row, after the warm-up.")
_PREFETCH_COUNT = flags.DEFINE_integer("prefetch_count", 1,
                                       "Experts prefetched per token and layer.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "Model profile JSON. When one is found (this flag, or the shipped "
    "profile of the embedded model), each cache size also gets an --adapgate row.")
_GATE_BUDGET = flags.DEFINE_float(
    "gate_budget", 0.005, "Adaptive gating loss budget T of the --adapgate rows "
    "(threshold sqrt(T / S_l)).")
_MEMORY_CACHE_SIZE = flags.DEFINE_integer(
    "memory_cache_size", 64, "Cache size of the device memory comparison, in experts.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Parameter and activation dtype; default: the checkpoint's.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the full results here.")
_MARKDOWN_OUT = flags.DEFINE_string(
    "markdown_out", None, "Write the markdown report here; it is printed either way.")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One benchmarked engine configuration."""

    label: str
    cache_size: int
    adapgate: bool
    allocation: str
    slots_per_layer: tuple[int, ...] | None
    make_engine: Callable[[], Any]


class _PrefillSnapshot:
    """Forwards `start` and `step` to an engine and copies its counters after the prefill.

    The copy separates the decode tokens' counters from the prompt's, whose
    loads would otherwise inflate the per-token numbers.
    """

    def __init__(self, engine):
        self.engine = engine
        self.after_prefill: ExpertStats | None = None

    def start(self, prompt_ids, max_len):
        logits = self.engine.start(prompt_ids, max_len)
        self.after_prefill = copy.deepcopy(self.engine.stats)
        return logits

    def step(self, token_id):
        return self.engine.step(token_id)


def subtract_stats(end: ExpertStats, start: ExpertStats) -> ExpertStats:
    """Return the counters accumulated between two snapshots."""
    return ExpertStats(**{field.name: getattr(end, field.name) - getattr(start, field.name)
                          for field in dataclasses.fields(ExpertStats)})


def time_generation(engine, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
    """Run one greedy generation; return its timings and its decode-phase counters."""
    snapshot = _PrefillSnapshot(engine)
    result = sampling.generate(snapshot, prompt_ids, new_tokens, eos_ids=(),
                               settings=sampling.SamplingSettings())
    decode = subtract_stats(engine.stats, snapshot.after_prefill).summary()
    tokens = max(decode["tokens"], 1)
    return {
        "token_ids": result.token_ids,
        "time_to_first_token_seconds": result.prefill_seconds,
        "decode_seconds": result.decode_seconds,
        "decode_steps": result.decode_steps,
        "decode_tokens_per_second": result.decode_steps / result.decode_seconds,
        "seconds_per_decode_token": result.decode_seconds / result.decode_steps,
        "expert_loads_per_token": decode["expert_loads_per_token"],
        "cache_hit_rate": decode["cache_hit_rate"],
        "prefetches_issued": decode["prefetches_issued"],
        "prefetch_precision": decode["prefetch_precision"],
        "bytes_host_to_device_per_token": decode["bytes_host_to_device"] / tokens,
        "copy_wait_seconds": decode["copy_wait_seconds"],
        "prefill_expert_loads": int(snapshot.after_prefill.loads.sum()),
    }


_MEDIAN_KEYS = ("decode_tokens_per_second", "seconds_per_decode_token",
                "time_to_first_token_seconds", "expert_loads_per_token", "cache_hit_rate",
                "prefetch_precision", "bytes_host_to_device_per_token", "copy_wait_seconds")


def benchmark_row(spec: RowSpec, prompt_ids: list[int], new_tokens: int, repeats: int,
                  reference_tokens: list[int] | None) -> dict[str, Any]:
    """Time one warm-up and `repeats` generations, each on the engine `make_engine` returns."""
    warmup = time_generation(spec.make_engine(), prompt_ids, new_tokens)
    runs = [time_generation(spec.make_engine(), prompt_ids, new_tokens)
            for _ in range(repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in _MEDIAN_KEYS}
    tokens = runs[0]["token_ids"]
    row = {
        "label": spec.label,
        "cache_size": spec.cache_size,
        "adapgate": spec.adapgate,
        "allocation": spec.allocation,
        "slots_per_layer": list(spec.slots_per_layer) if spec.slots_per_layer else None,
        "warmup": {"time_to_first_token_seconds": warmup["time_to_first_token_seconds"],
                   "decode_seconds": warmup["decode_seconds"]},
        "median": median,
        "generated_token_ids": tokens,
        "same_tokens_every_run": all(run["token_ids"] == tokens for run in runs),
        "matches_resident_tokens": (None if reference_tokens is None
                                    else tokens == reference_tokens),
        "runs": [{key: value for key, value in run.items() if key != "token_ids"}
                 for run in runs],
    }
    logging.info("%s: %.1f tokens/s decode, %.3f s to first token, %.2f loads per token",
                 spec.label, median["decode_tokens_per_second"],
                 median["time_to_first_token_seconds"], median["expert_loads_per_token"])
    return row


def choose_rows(config, params, store, full_params, profile, cache_sizes: list[int],
                gate_budget: float, prefetch_count: int) -> list[RowSpec]:
    """Build the uniform row of every cache size, each followed by its --adapgate row."""
    total = config.num_experts_total
    num_layers, num_experts = config.num_hidden_layers, config.num_local_experts
    thresholds = None
    if profile is not None:
        thresholds = cli.gate_thresholds(True, gate_budget, None, profile, num_layers)
    has_dp_stats = (profile is not None and profile.prefetch_accuracy is not None
                    and profile.single_expert_ratio is not None)
    rows = []
    for cache_size in cache_sizes:
        settings = [(False, engine_lib.GateSettings())]
        if thresholds is not None:
            settings.append((True, engine_lib.GateSettings(thresholds)))
        for adapgate, gate in settings:
            if cache_size >= total:
                name, slots = "resident", None
                make = functools.partial(engine_lib.ResidentEngine, config, full_params, gate)
            else:
                if adapgate and has_dp_stats and cache_size >= num_layers:
                    name = "dp"
                    slots = allocation.dp_allocation(profile, cache_size, adapgate=True)
                else:
                    name = "uniform"
                    slots = allocation.uniform_allocation(num_layers, num_experts, cache_size)
                make = functools.partial(engine_lib.OffloadedEngine, config, params, store,
                                         slots, 0, gate, prefetch_count)
            label = f"cache {cache_size}, {name}" + (", adapgate" if adapgate else "")
            rows.append(RowSpec(label, cache_size, adapgate, name, slots, make))
    return rows


def compare_all_cached(config, params, store, full_params, prompt_ids, new_tokens, repeats,
                       prefetch_count) -> dict[str, Any]:
    """Time the offloaded engine with every expert cached against the resident engine.

    The offloaded engine is built once with E slots per layer and reused, so
    its warm-up loads every expert the prompt and its greedy continuation use,
    and the timed runs, which repeat them, find them all cached.
    """
    resident = benchmark_row(
        RowSpec("resident, fully jitted step", config.num_experts_total, False, "resident",
                None, lambda: engine_lib.ResidentEngine(config, full_params)),
        prompt_ids, new_tokens, repeats, None)
    slots = (config.num_local_experts,) * config.num_hidden_layers
    offloaded_engine = engine_lib.OffloadedEngine(config, params, store, slots_per_layer=slots,
                                                  prefetch_count=prefetch_count)
    offloaded = benchmark_row(
        RowSpec("offloaded, every expert cached", config.num_experts_total, False,
                "all slots", slots, lambda: offloaded_engine),
        prompt_ids, new_tokens, repeats, resident["generated_token_ids"])
    ratio = (offloaded["median"]["seconds_per_decode_token"]
             / resident["median"]["seconds_per_decode_token"])
    return {"resident": resident, "offloaded_all_cached": offloaded,
            "offloaded_over_resident_time_per_token": ratio}


def device_bytes_in_use() -> int | None:
    """Return the device allocator's bytes in use, or None where it reports nothing."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_in_use"])


def stack_all_experts(params, store):
    """Copy every expert to the device; return full params, as ResidentEngine takes them."""
    w1, w3, w2 = store.all_stacked()
    experts = {"w1": jnp.asarray(w1), "w3": jnp.asarray(w3), "w2": jnp.asarray(w2)}
    full = transformer.merge_expert_params(params, experts)
    jax.block_until_ready(full)
    return full


def measure_expert_memory(config, params, store, cache_size: int,
                          resident_delta: int | None) -> dict[str, Any]:
    """Compare device memory held by an offloaded engine's experts with all expert bytes."""
    before = device_bytes_in_use()
    engine = engine_lib.OffloadedEngine(config, params, store, cache_size=cache_size)
    jax.block_until_ready([cache.slots_CP for cache in engine.caches])
    after = device_bytes_in_use()
    slot_bytes = engine.device_expert_bytes()
    # The engine also slices each layer's non-expert params into arrays of its own.
    layer_copy_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params["layers"]))
    measured = None if before is None or after is None else after - before
    result = {
        "cache_size": cache_size,
        "slots_per_layer": list(engine.slots_per_layer),
        "slot_buffer_bytes": slot_bytes,
        "all_expert_bytes": store.nbytes,
        "slot_buffer_share": slot_bytes / store.nbytes,
        "memory_stats_available": measured is not None,
        "measured_engine_bytes": measured,
        "engine_layer_param_copy_bytes": layer_copy_bytes,
        "measured_resident_expert_bytes": resident_delta,
    }
    if measured is None:
        result["note"] = ("jax.devices()[0].memory_stats() returned no bytes_in_use on this "
                          "device, so only the buffer sizes are reported")
    return result


def parse_cache_sizes(texts: Sequence[str]) -> list[int]:
    sizes = []
    for text in texts:
        try:
            size = int(text)
        except ValueError:
            raise UserInputError(
                f"invalid --cache_sizes entry {text!r}; give comma-separated integers such "
                "as 32,64,128") from None
        if size < 0:
            raise UserInputError(f"invalid --cache_sizes entry {size}; use 0 or more")
        sizes.append(size)
    if not sizes:
        raise UserInputError("--cache_sizes is empty; pass at least one cache size")
    return sizes


def check_settings(prompt_ids: list[int], config) -> None:
    if _NEW_TOKENS.value < 2:
        raise UserInputError(
            f"invalid --new_tokens={_NEW_TOKENS.value}; use 2 or more so at least one "
            "token is decoded")
    if _REPEATS.value < 1:
        raise UserInputError(f"invalid --repeats={_REPEATS.value}; use 1 or more")
    if _PREFETCH_COUNT.value < 0:
        raise UserInputError(
            f"invalid --prefetch_count={_PREFETCH_COUNT.value}; use 0 or more")
    if _MEMORY_CACHE_SIZE.value < 0:
        raise UserInputError(
            f"invalid --memory_cache_size={_MEMORY_CACHE_SIZE.value}; use 0 or more")
    limit = config.max_position_embeddings
    if len(prompt_ids) + _NEW_TOKENS.value > limit:
        raise UserInputError(
            f"the prompt has {len(prompt_ids)} tokens and --new_tokens={_NEW_TOKENS.value}, "
            f"more than the model's {limit} positions; shorten the prompt or lower "
            "--new_tokens")


def machine_description() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jax_devices": [str(device) for device in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _format_rate(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown_report(report: dict[str, Any]) -> str:
    """Format the rows, the all-cached comparison and the memory comparison as markdown."""
    machine = report["machine"]
    lines = [
        "# Decode benchmark", "",
        f"Date {report['date']}. Command: `{report['command']}`", "",
        f"Machine: {machine['cpu_count']} CPUs ({machine['processor'] or 'processor unknown'})"
        f", {machine['platform']}, jax {machine['jax_version']}, devices "
        f"{', '.join(machine['jax_devices'])}.", "",
        f"Checkpoint {report['checkpoint']} ({report['dtype']}), prompt of "
        f"{len(report['prompt_token_ids'])} tokens, {report['new_tokens']} new tokens, "
        f"median of {report['repeats']} runs, each on a fresh engine. Per-token counters "
        "cover the decode steps only. The warm-up compiles only the shapes that no "
        "earlier row compiled.", "",
        "| configuration | warm-up s | decode tokens/s | time to first token s | "
        "loads per token | hit rate | prefetch precision | H2D MB per token | "
        "copy wait s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        median = row["median"]
        warmup = row["warmup"]["time_to_first_token_seconds"] + row["warmup"]["decode_seconds"]
        precision = (_format_rate(median["prefetch_precision"])
                     if any(run["prefetches_issued"] for run in row["runs"]) else "n/a")
        lines.append(
            f"| {row['label']} | {warmup:.2f} | {median['decode_tokens_per_second']:.1f} | "
            f"{median['time_to_first_token_seconds']:.3f} | "
            f"{median['expert_loads_per_token']:.2f} | {_format_rate(median['cache_hit_rate'])} "
            f"| {precision} | {median['bytes_host_to_device_per_token'] / 1e6:.3f} | "
            f"{median['copy_wait_seconds']:.3f} |")

    cached = report["all_cached"]
    resident_ms = 1e3 * cached["resident"]["median"]["seconds_per_decode_token"]
    offloaded = cached["offloaded_all_cached"]
    offloaded_ms = 1e3 * offloaded["median"]["seconds_per_decode_token"]
    lines += [
        "", "## Offloaded engine with every expert cached against the resident engine", "",
        f"Resident, fully jitted step: {resident_ms:.2f} ms per token. Offloaded, E slots "
        f"per layer, engine reused after its warm-up: {offloaded_ms:.2f} ms per token "
        f"(hit rate {_format_rate(offloaded['median']['cache_hit_rate'])}). Ratio "
        f"{cached['offloaded_over_resident_time_per_token']:.2f}x.",
    ]

    memory = report["memory"]
    lines += [
        "", f"## Device memory held by experts at cache size {memory['cache_size']}", "",
        f"Slot buffers {memory['slot_buffer_bytes'] / 1e6:.2f} MB of "
        f"{memory['all_expert_bytes'] / 1e6:.2f} MB of experts "
        f"({_format_rate(memory['slot_buffer_share'])}).",
    ]
    if memory["memory_stats_available"]:
        lines.append(
            f"Device allocator: building the engine added "
            f"{memory['measured_engine_bytes'] / 1e6:.2f} MB, of which "
            f"{memory['engine_layer_param_copy_bytes'] / 1e6:.2f} MB are its per-layer "
            "copies of the non-expert params; stacking every expert for the resident "
            f"engine added {memory['measured_resident_expert_bytes'] / 1e6:.2f} MB.")
    else:
        lines.append(f"Device measurement not available: {memory['note']}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(
            f"unexpected arguments {argv[1:]}; give lists comma-separated, as in "
            "--cache_sizes=32,64")
    cache_sizes = parse_cache_sizes(_CACHE_SIZES.value)
    checkpoint = cli.resolve_checkpoint(_CHECKPOINT.value)
    config, params, store = load_checkpoint(checkpoint, dtype=_DTYPE.value)
    tokenizer = Tokenizer.from_dir(checkpoint)
    prompt_ids = tokenizer.encode(_PROMPT.value)
    check_settings(prompt_ids, config)
    profile = cli.resolve_profile(_PROFILE.value, checkpoint, config)
    if profile is None:
        logging.info("no model profile found, so the --adapgate rows are skipped")

    before_resident = device_bytes_in_use()
    full_params = stack_all_experts(params, store)
    after_resident = device_bytes_in_use()
    resident_delta = (None if before_resident is None or after_resident is None
                      else after_resident - before_resident)

    new_tokens, repeats = _NEW_TOKENS.value, _REPEATS.value
    all_cached = compare_all_cached(config, params, store, full_params, prompt_ids,
                                    new_tokens, repeats, _PREFETCH_COUNT.value)
    reference_tokens = all_cached["resident"]["generated_token_ids"]
    specs = choose_rows(config, params, store, full_params, profile, cache_sizes,
                        _GATE_BUDGET.value, _PREFETCH_COUNT.value)
    rows = [benchmark_row(spec, prompt_ids, new_tokens, repeats, reference_tokens)
            for spec in specs]
    memory = measure_expert_memory(config, params, store, _MEMORY_CACHE_SIZE.value,
                                   resident_delta)

    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "checkpoint": checkpoint,
        "dtype": config.dtype,
        "prompt": _PROMPT.value,
        "prompt_token_ids": prompt_ids,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefetch_count": _PREFETCH_COUNT.value,
        "gate_budget": _GATE_BUDGET.value if profile is not None else None,
        "rows": rows,
        "all_cached": all_cached,
        "memory": memory,
    }
    markdown = markdown_report(report)
    print(markdown)
    if _OUTPUT_JSON.value:
        profiles.write_json_atomic(report, _OUTPUT_JSON.value)
    if _MARKDOWN_OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_MARKDOWN_OUT.value)), exist_ok=True)
        with open(_MARKDOWN_OUT.value, "w", encoding="utf-8") as f:
            f.write(markdown)


if __name__ == "__main__":
    cli.run(main)
