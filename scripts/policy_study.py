"""Compare AdapMoE's expert cache policies on routing traces recorded from the model.

The study scores the validation text twice with the library's scoring pass:
once with stock routing and once with AdapMoE's sensitivity gate at the gate
budget. The second is a real gated run, so later layers see the hidden states
that gating produces. For each cache size it then replays both traces with
`adapmoe_jax.simulate`:

  (a) lru                          uniform slots, LRU, no prefetching (the
                                   mixtral-offloading baseline)
  (b) lru+prefetch                 (a) with cross-layer prefetching
  (c) lru+prefetch+adapgate        (b) on the gated trace
  (d) lru+prefetch+adapgate+dp     (c) with the DP allocation from the profile's
                                   analytic cost with adaptive gating
  (e) belady+adapgate+dp           Belady's replacement on the gated trace with
                                   the allocation of (d)
  (f) lru+prefetch+adapgate+dp-empirical
                                   (d) with the DP allocation from the empirical
                                   cost of the gated trace itself

It also reports the per-layer prefetch accuracy, how well the analytic and the
empirical cost tables predict the loads of LRU with prefetching, and whether
the full policy (d) meets two goals at --goal_cache_size. It writes
policy_study.json, policy_study.md and both traces (trace_stock.npz,
trace_gated.npz) to --out_dir.

From the repository root:

  PYTHONPATH=. python scripts/policy_study.py --out_dir=runs/policy_study
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

from adapmoe_jax import allocation
from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax import scoring
from adapmoe_jax import simulate
from adapmoe_jax.ckpt import loading
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.text.tokenizer import Tokenizer

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_TEXT = os.path.join(_REPO_ROOT, "data", "validation", "tinystories.txt")

# Row keys in the order `simulate.standard_policies` returns the rows when it
# gets prefetching, gating and a DP allocation. Row "f" is the empirical DP row.
_ROW_KEYS = ("a", "b", "c", "d", "e")
_EMPIRICAL_ROW_KEY = "f"
_LOAD_GOAL_RATIO = 0.5
_COPY_GOAL_RATIO = 1.3

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Define the flags at run time, so the tests can import this module."""
    flags.DEFINE_string(
        "checkpoint", None, "Checkpoint directory, HF or converted; default: the embedded "
        "model (adapmoe_jax/default_model).")
    flags.DEFINE_string(
        "profile", None, "Model profile JSON with layer sensitivities, single-expert ratios "
        "and prefetch accuracy; default: the embedded model's configs/mini-mixtral.json.")
    flags.DEFINE_list(
        "text_file", [_DEFAULT_TEXT], "Comma-separated UTF-8 texts to score. Their traces "
        "are joined in the given order into one trace.")
    flags.DEFINE_integer("max_tokens", 4096, "Maximum tokens scored per text file.")
    flags.DEFINE_integer(
        "context_length", 256, "Tokens per window, BOS included; windows do not overlap.")
    flags.DEFINE_list("cache_sizes", ["32", "64", "128"],
                      "Comma-separated total expert slots over all layers.")
    flags.DEFINE_float(
        "gate_budget", None, "Loss budget T of the gated trace (layer l's threshold is "
        "sqrt(T / S_l)); default: the profile's gate_budget.")
    flags.DEFINE_integer("prefetch_count", 1,
                         "Experts prefetched per layer and token; AdapMoE prefetches 1.")
    flags.DEFINE_list(
        "cost_slots", [], "Comma-separated slot counts at which the cost tables are checked "
        "against replayed loads; default: every count from 1 to E - 1.")
    flags.DEFINE_integer(
        "goal_cache_size", 64, "Cache size at which the goals are checked; it joins "
        "--cache_sizes when missing there.")
    flags.DEFINE_string(
        "dtype", None, "Parameter and activation dtype; default: the checkpoint's.")
    flags.DEFINE_string("out_dir", None, "Folder for the JSON, markdown and trace files.")


# --- Traces ---------------------------------------------------------------------------

def score_texts(params, config, windows_list: Sequence[scoring.Windows],
                thresholds_L: np.ndarray | None) -> scoring.TokenScores:
    """Score every text's windows and join the per-token results in text order."""
    parts = [scoring.score_windows(params, config, windows, thresholds_L)
             for windows in windows_list]
    names = [field.name for field in dataclasses.fields(scoring.TokenScores)]
    return scoring.TokenScores(
        **{name: np.concatenate([getattr(part, name) for part in parts]) for name in names})


def trace_of(scores: scoring.TokenScores, origin: str) -> simulate.RoutingTrace:
    trace = simulate.RoutingTrace(scores.experts_NLK, scores.weights_NLK,
                                  scores.predicted_NLK)
    return simulate.validate_trace(trace, origin=origin)


def prefetch_accuracy(trace: simulate.RoutingTrace) -> np.ndarray:
    """Return [L] shares of tokens whose first predicted expert for layer l is used there.

    Layer 0 has no prediction and gets 0. On a gated trace, an expert that the
    gate dropped does not count as used.
    """
    first_NL = trace.predicted[:, :, 0]
    hit_NL = np.any(first_NL[:, :, None] == trace.experts, axis=-1) & (first_NL >= 0)
    accuracy_L = hit_NL.mean(axis=0)
    accuracy_L[0] = 0.0
    return accuracy_L


def single_expert_ratio(trace: simulate.RoutingTrace) -> np.ndarray:
    """Return [L] shares of tokens that use one expert at each layer."""
    return np.mean(scoring.active_experts(trace.experts) == 1, axis=0)


# --- Policy comparison ----------------------------------------------------------------

def cost_models(config) -> dict[str, simulate.CostModel]:
    """Return the embedded and Mixtral-8x7B presets, the first sized from `config`'s experts."""
    embedded = dict(simulate.PRESETS["embedded"], expert_bytes=simulate.expert_bytes_of(config))
    return {"embedded": simulate.CostModel(**embedded),
            "mixtral-8x7b": simulate.CostModel(**simulate.PRESETS["mixtral-8x7b"])}


def compare_policies(stock: simulate.RoutingTrace, gated: simulate.RoutingTrace,
                     profile: profiles.ModelProfile, cache_size: int, prefetch_count: int,
                     empirical_table: np.ndarray,
                     models: dict[str, simulate.CostModel]) -> dict[str, Any]:
    """Replay rows (a) to (e) and the empirical DP row at one cache size."""
    num_layers, num_experts = profile.num_layers, profile.num_experts
    uniform = allocation.uniform_allocation(num_layers, num_experts, cache_size)
    dp_slots = allocation.dp_allocation(profile, cache_size, adapgate=True)
    dp_empirical = allocation.allocate_slots(empirical_table, cache_size)
    policies = simulate.standard_policies(uniform, dp_slots, prefetch_count, with_gating=True)
    if len(policies) != len(_ROW_KEYS):
        raise AssertionError(f"expected rows {_ROW_KEYS}, got {[p.name for p in policies]}")
    full = policies[_ROW_KEYS.index("d")]
    policies.append(dataclasses.replace(full, name=full.name + "-empirical",
                                        slots_per_layer=dp_empirical))

    rows = []
    for key, policy in zip(_ROW_KEYS + (_EMPIRICAL_ROW_KEY,), policies):
        rows.append(simulate_row(key, policy, stock, gated, num_experts, models))
    return {"cache_size": cache_size, "uniform_slots": list(uniform),
            "dp_slots": list(dp_slots), "dp_slots_empirical": list(dp_empirical),
            "rows": rows}


def simulate_row(key: str, policy: simulate.Policy, stock: simulate.RoutingTrace,
                 gated: simulate.RoutingTrace, num_experts: int,
                 models: dict[str, simulate.CostModel]) -> dict[str, Any]:
    """Replay one policy once per cost model. The counts are the same in every replay."""
    results = {name: simulate.run_policy(policy, stock, gated, num_experts, model)
               for name, model in models.items()}
    counts = next(iter(results.values())).to_json_dict()
    del counts["modelled_ms"], counts["ms_per_token"]
    return {"key": key, "name": policy.name, "trace": "gated" if policy.gated else "stock",
            "replacement": policy.replacement, "prefetch_count": policy.prefetch_count,
            "slots_per_layer": list(policy.slots_per_layer), **counts,
            "ms_per_token": {name: result.ms_per_token for name, result in results.items()}}


# --- Cost tables against replayed loads -------------------------------------------------

def layer_loads_with_prefetch(trace: simulate.RoutingTrace, layer: int, slots: int,
                              num_experts: int, prefetch_count: int) -> float:
    """Return one layer's on-demand loads per token under LRU with prefetching.

    A layer's cache receives only its own accesses and the prefetches that layer
    l-1 issues from predicted[:, l], and both come from the trace. So
    `simulate.simulate_lru` on a two-layer trace, a stand-in layer that always
    uses expert 0 followed by `layer`, replays this layer exactly as the full
    replay with `slots` slots at this layer would.
    """
    num_tokens, _, top_k = trace.experts.shape
    experts = np.full((num_tokens, 2, top_k), -1, np.int32)
    weights = np.zeros((num_tokens, 2, top_k), np.float32)
    predicted = np.full((num_tokens, 2, top_k), -1, np.int32)
    experts[:, 0, 0] = 0
    weights[:, 0, 0] = 1.0
    experts[:, 1] = trace.experts[:, layer]
    weights[:, 1] = trace.weights[:, layer]
    predicted[:, 1] = trace.predicted[:, layer]
    pair = simulate.RoutingTrace(experts, weights, predicted)
    result = simulate.simulate_lru(pair, (1, slots), num_experts, prefetch_count)
    # The stand-in layer loads expert 0 once and then always hits.
    return (result.on_demand_loads - 1) / num_tokens


def compare_costs(trace: simulate.RoutingTrace, profile: profiles.ModelProfile,
                  adapgate: bool, slot_counts: Sequence[int], prefetch_count: int,
                  empirical_table: np.ndarray) -> dict[str, Any]:
    """Compare three cost estimates with replayed loads per token, layer by layer.

    The estimates are the analytic f(s) with the profile's p and r, the same
    formula with p and r measured on this trace, and the empirical table (LRU
    with the same prefetching on this trace, so it matches the measurement by
    construction, up to the per-layer replay). The measured loads come from LRU
    with prefetching on this trace.
    """
    num_layers, num_experts = profile.num_layers, profile.num_experts
    analytic = allocation.analytic_cost_table(profile, adapgate)
    accuracy_L = prefetch_accuracy(trace)
    ratio_L = single_expert_ratio(trace)
    columns = list(slot_counts)
    measured_LS = np.array([
        [layer_loads_with_prefetch(trace, layer, slots, num_experts, prefetch_count)
         for slots in columns] for layer in range(num_layers)])
    estimates = {
        "analytic_profile": analytic[:, columns],
        "analytic_trace": np.array([
            [allocation.expected_loads(slots, num_experts, float(accuracy_L[layer]),
                                       float(ratio_L[layer])) for slots in columns]
            for layer in range(num_layers)]),
        "empirical": empirical_table[:, columns],
    }
    errors = {}
    for name, estimate_LS in estimates.items():
        difference_LS = estimate_LS - measured_LS
        errors[name] = {
            "mae": float(np.abs(difference_LS).mean()),
            "mean_signed_error": float(difference_LS.mean()),
            "mae_per_slot_count": np.abs(difference_LS).mean(axis=0).tolist(),
        }
    return {
        "slot_counts": columns,
        "measured_mean_per_slot_count": measured_LS.mean(axis=0).tolist(),
        "errors": errors,
        "better_estimate": min(("analytic_profile", "empirical"),
                               key=lambda name: errors[name]["mae"]),
        "per_layer": {"measured": measured_LS.tolist(),
                      **{name: value.tolist() for name, value in estimates.items()}},
    }


def empirical_table_of(trace: simulate.RoutingTrace, num_experts: int,
                       prefetch_count: int) -> np.ndarray:
    """Measure LRU on-demand loads per token of each layer and slot count, with prefetching."""
    layer_traces = [trace.layer_steps(layer) for layer in range(trace.num_layers)]
    predicted = [trace.predicted[:, layer] for layer in range(trace.num_layers)]
    return allocation.empirical_cost_table(layer_traces, num_experts, predicted, prefetch_count)


# --- Goals ----------------------------------------------------------------------------

def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def check_goals(comparison: dict[str, Any]) -> dict[str, Any]:
    """Check row (d) against row (a) for loads and against row (e) for copies."""
    rows = {row["key"]: row for row in comparison["rows"]}
    baseline, full, bound = rows["a"], rows["d"], rows["e"]
    full_loads, baseline_loads = full["loads_per_token"], baseline["loads_per_token"]
    full_copies, bound_copies = full["copies_per_token"], bound["copies_per_token"]
    return {
        "cache_size": comparison["cache_size"],
        "halves_loads": bool(full_loads <= _LOAD_GOAL_RATIO * baseline_loads),
        "full_loads_per_token": full_loads,
        "baseline_loads_per_token": baseline_loads,
        "loads_ratio": _ratio(full_loads, baseline_loads),
        "copies_within_bound": bool(full_copies <= _COPY_GOAL_RATIO * bound_copies),
        "full_copies_per_token": full_copies,
        "belady_copies_per_token": bound_copies,
        "copies_ratio": _ratio(full_copies, bound_copies),
    }


# --- Markdown -------------------------------------------------------------------------

def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _yes_no(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def markdown_report(report: dict[str, Any]) -> str:
    """Return the report as markdown: header, goals, policy tables, prefetch, costs."""
    lines = _markdown_header(report)
    lines += _markdown_goals(report["goals"])
    for comparison in report["policies"]:
        lines += _markdown_policies(comparison, list(report["cost_models"]))
    lines += _markdown_prefetch(report)
    lines += _markdown_costs(report["cost_comparison"], report["prefetch_count"])
    return "\n".join(lines) + "\n"


def _markdown_header(report: dict[str, Any]) -> list[str]:
    machine = report["machine"]
    stock, gated = report["traces"]["stock"], report["traces"]["gated"]
    models = ", ".join(
        f"{name} ({model['expert_bytes']:,} bytes per expert, {model['bandwidth_gbps']:g} "
        f"GB/s, {model['expert_compute_ms']:g} ms per expert)"
        for name, model in report["cost_models"].items())
    lines = [
        "# Expert cache policies on recorded routing traces", "",
        f"- Command: `{report['command']}`",
        f"- Machine: {machine['processor']}, {machine['cpu_count']} CPUs, "
        f"{machine['platform']}; JAX {machine['jax_version']} on "
        f"{machine['jax_backend']} ({', '.join(machine['jax_devices'])})",
        f"- Date: {report['date']}", "",
        f"Checkpoint {report['checkpoint']} (dtype {report['dtype']}), profile "
        f"{report['profile']}, texts {', '.join(report['text_files'])}: "
        f"{stock['num_tokens']} scored tokens, context length {report['context_length']}.",
        f"Stock routing: perplexity {stock['perplexity']:.4f}, "
        f"{stock['experts_per_token']:.3f} experts per token. Gated at budget "
        f"{report['gate_budget']:g} (a real gated run, threshold sqrt(T / S_l)): perplexity "
        f"{gated['perplexity']:.4f}, {gated['experts_per_token']:.3f} experts per token.",
        f"Prefetching copies up to {report['prefetch_count']} predicted expert(s) per layer "
        "and token. Modelled times are estimates from `simulate.CostModel`, not "
        f"measurements: {models}.", "",
        "Rows:",
        "- (a) uniform slots and LRU without prefetching, the mixtral-offloading baseline",
        "- (b) (a) with prefetching",
        "- (c) (b) on the gated trace",
        "- (d) (c) with the DP allocation from the profile's analytic cost with adaptive "
        "gating: the full policy",
        "- (e) Belady's optimal replacement on the gated trace with the allocation of (d). "
        "It makes no prefetches, so its on-demand loads are also its total copies, the "
        "fewest any policy can make on that trace and allocation.",
        "- (f) (d) with the DP allocation from the empirical cost of the gated trace, "
        "fitted on the same trace that it replays",
    ]
    if report["gate_budget"] != report["profile_gate_budget"]:
        lines += [""]
        lines.append(
            f"NOTE: the profile's single_expert_ratio was measured at budget "
            f"{report['profile_gate_budget']:g}, not {report['gate_budget']:g}, so the "
            "analytic cost of the DP rows uses ratios from another budget.")
    return lines


def _markdown_goals(goals: dict[str, Any]) -> list[str]:
    return [
        "", f"## Goals at cache size {goals['cache_size']}", "",
        f"- Does the full policy (d) at least halve on-demand loads per token against "
        f"uniform LRU (a)? {_yes_no(goals['halves_loads'])}: "
        f"{goals['full_loads_per_token']:.3f} against {goals['baseline_loads_per_token']:.3f}"
        f" loads per token, ratio {_number(goals['loads_ratio'])} (goal <= "
        f"{_LOAD_GOAL_RATIO}).",
        f"- Are the total copies of (d) within {_COPY_GOAL_RATIO}x of Belady's (e) on the "
        f"same gated trace and allocation? {_yes_no(goals['copies_within_bound'])}: "
        f"{goals['full_copies_per_token']:.3f} against "
        f"{goals['belady_copies_per_token']:.3f} copies per token, ratio "
        f"{_number(goals['copies_ratio'])} (goal <= {_COPY_GOAL_RATIO}).",
    ]


def _markdown_policies(comparison: dict[str, Any], model_names: list[str]) -> list[str]:
    def slots(values):
        return " ".join(str(value) for value in values)

    lines = [
        "", f"## Cache size {comparison['cache_size']}", "",
        f"- Uniform slots per layer: {slots(comparison['uniform_slots'])}",
        f"- DP slots, analytic cost with adaptive gating: {slots(comparison['dp_slots'])}",
        f"- DP slots, empirical cost of the gated trace: "
        f"{slots(comparison['dp_slots_empirical'])}", "",
        "| row | policy | trace | on-demand loads/token | total copies/token | hit rate | "
        + " | ".join(f"ms/token, {name}" for name in model_names) + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(model_names),
    ]
    for row in comparison["rows"]:
        times = " | ".join(_number(row["ms_per_token"][name]) for name in model_names)
        lines.append(
            f"| {row['key']} | {row['name']} | {row['trace']} | {row['loads_per_token']:.3f} "
            f"| {row['copies_per_token']:.3f} | {row['hit_rate']:.3f} | {times} |")
    return lines


def _markdown_prefetch(report: dict[str, Any]) -> list[str]:
    per_layer = report["per_layer"]
    profile_accuracy = per_layer["profile_prefetch_accuracy"]
    profile_ratio = per_layer["profile_single_expert_ratio"]
    lines = [
        "", "## Prefetch accuracy per layer", "",
        "Share of tokens whose first predicted expert for layer l (layer l's router on "
        "layer l-1's MoE input) is among the experts layer l uses; 0 for layer 0. On the "
        "gated trace a dropped expert does not count. The profile's value was measured "
        "under stock routing. The single-expert ratio is the r of the analytic cost.", "",
        "| layer | accuracy, stock trace | accuracy, gated trace | accuracy, profile | "
        "single-expert ratio, gated trace | single-expert ratio, profile |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for layer, (stock, gated) in enumerate(zip(per_layer["prefetch_accuracy_stock"],
                                               per_layer["prefetch_accuracy_gated"])):
        accuracy = None if profile_accuracy is None else profile_accuracy[layer]
        ratio = None if profile_ratio is None else profile_ratio[layer]
        lines.append(
            f"| {layer} | {stock:.3f} | {gated:.3f} | {_number(accuracy)} | "
            f"{per_layer['single_expert_ratio_gated'][layer]:.3f} | {_number(ratio)} |")
    return lines


def _markdown_costs(cost_comparison: dict[str, Any], prefetch_count: int) -> list[str]:
    lines = [
        "", "## Which cost predicts replayed loads", "",
        f"Measured: on-demand loads per token of each layer, replayed through LRU with "
        f"prefetching ({prefetch_count} per layer and token) at s slots by "
        "`simulate.simulate_lru`; prefetched copies are not counted. Estimates: "
        "`analytic, profile` is `allocation.expected_loads` with the profile's prefetch "
        "accuracy p and single-expert ratio r (r = 0 on the stock trace). It models "
        "prefetching through p but assumes every expert equally likely and no reuse "
        "between tokens. `analytic, trace` is the same formula with p and r measured on "
        "the trace. `empirical` is `allocation.empirical_cost_table`, LRU on-demand loads "
        "on the same trace with the same prefetching, fitted in-sample. The errors are mean absolute "
        "errors in loads per token over layers and slot counts. The DP allocation "
        "depends only on the differences between a layer's costs, so a constant offset "
        "in an estimate does not change the allocation.",
    ]
    for trace_name, comparison in cost_comparison.items():
        names = list(comparison["errors"])
        lines += [
            "", f"### {trace_name.capitalize()} trace", "",
            "| s | measured loads/token | " + " | ".join(f"MAE, {n}" for n in names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for column, slots in enumerate(comparison["slot_counts"]):
            errors = " | ".join(
                f"{comparison['errors'][n]['mae_per_slot_count'][column]:.3f}" for n in names)
            lines.append(
                f"| {slots} | {comparison['measured_mean_per_slot_count'][column]:.3f} | "
                f"{errors} |")
        overall = " | ".join(f"{comparison['errors'][n]['mae']:.3f}" for n in names)
        bias = " | ".join(f"{comparison['errors'][n]['mean_signed_error']:+.3f}"
                          for n in names)
        lines += [f"| all | | {overall} |", f"| mean signed error | | {bias} |", "",
                  f"Better predictor of the two the allocator uses: "
                  f"**{comparison['better_estimate']}**."]
    return lines


# --- Command line -----------------------------------------------------------------------

def parse_counts(flag_name: str, texts: Sequence[str], low: int, high: int | None,
                 reason: str = "") -> list[int]:
    """Parse a list flag of integers in [low, high], raising UserInputError on a bad entry.

    `reason`, when given, ends the error message as the reason for the bounds.
    """
    values = []
    for text in texts:
        try:
            value = int(text)
        except ValueError:
            raise UserInputError(
                f"invalid --{flag_name} entry {text!r}; give comma-separated integers") from None
        if value < low or (high is not None and value > high):
            upper = "" if high is None else f" and <= {high}"
            raise UserInputError(
                f"invalid --{flag_name} entry {value}; use integers >= {low}{upper}"
                + (f", because {reason}" if reason else ""))
        values.append(value)
    return values


def describe_machine() -> dict[str, Any]:
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    return {"processor": processor, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax_version": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [device.device_kind for device in jax.devices()]}


def trace_summary(scores: scoring.TokenScores) -> dict[str, Any]:
    summary = scoring.summarize(scores)
    return {key: summary[key] for key in ("num_tokens", "perplexity", "mean_nll",
                                          "experts_per_token", "single_expert_ratio")}


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The validated flags of one study run."""

    checkpoint: str
    profile_path: str
    profile: profiles.ModelProfile
    cache_sizes: tuple[int, ...]
    goal_cache_size: int
    slot_counts: tuple[int, ...]
    gate: scoring.GateSetting


def settings_from_flags() -> StudySettings:
    """Validate the flags and load the profile, before any weights are loaded."""
    if FLAGS.out_dir is None:
        raise UserInputError("missing --out_dir; pass the folder for the study's outputs")
    if not FLAGS.text_file:
        raise UserInputError("--text_file is empty; pass at least one text file")
    if FLAGS.max_tokens < 1:
        raise UserInputError(f"invalid --max_tokens={FLAGS.max_tokens}; use a positive number")
    if FLAGS.prefetch_count < 1:
        raise UserInputError(
            f"invalid --prefetch_count={FLAGS.prefetch_count}; rows (b) to (d) prefetch, "
            "so use 1 or more")

    checkpoint = cli.resolve_checkpoint(FLAGS.checkpoint)
    config = scoring.read_config(checkpoint, FLAGS.dtype)
    scoring.check_context_length(FLAGS.context_length, config)
    profile_path = FLAGS.profile or cli.default_profile_path(checkpoint)
    if profile_path is None:
        raise UserInputError(
            f"no profile ships with {checkpoint}; make one with `python -m "
            f"adapmoe_jax.calibrate --checkpoint={checkpoint} --text_file=TEXT "
            "--output=profile.json` and pass --profile=profile.json")
    profile = scoring.load_sensitivity_profile(profile_path, config, checkpoint)
    # Check before scoring that the profile has what the DP rows need.
    allocation.analytic_cost_table(profile, adapgate=True)

    num_layers, num_experts = profile.num_layers, profile.num_experts
    one_slot_per_layer = f"the DP allocation gives each of the {num_layers} layers a slot"
    cache_sizes = parse_counts("cache_sizes", FLAGS.cache_sizes, num_layers, None,
                               one_slot_per_layer)
    goal_cache_size = parse_counts("goal_cache_size", [str(FLAGS.goal_cache_size)],
                                   num_layers, None, one_slot_per_layer)[0]
    slot_counts = parse_counts("cost_slots", FLAGS.cost_slots, 1, num_experts,
                               f"a layer has {num_experts} experts")
    gate_budget = profile.gate_budget if FLAGS.gate_budget is None else FLAGS.gate_budget
    if gate_budget != profile.gate_budget:
        logging.warning("the profile's single_expert_ratio was measured at budget %g, not "
                        "%g; the analytic DP cost uses it anyway", profile.gate_budget,
                        gate_budget)
    return StudySettings(
        checkpoint=checkpoint, profile_path=profile_path, profile=profile,
        cache_sizes=tuple(sorted(set(cache_sizes) | {goal_cache_size})),
        goal_cache_size=goal_cache_size,
        slot_counts=tuple(slot_counts or range(1, num_experts)),
        gate=scoring.GateSetting.sensitivity(profile, gate_budget, profile_path))


def record_traces(settings: StudySettings):
    """Score the texts with stock and with gated routing, and write both traces.

    Returns (config, stock scores, gated scores). The traces go to --out_dir as
    trace_stock.npz and trace_gated.npz.
    """
    config = scoring.read_config(settings.checkpoint, FLAGS.dtype)
    tokenizer = Tokenizer.from_dir(settings.checkpoint)
    windows_list = [scoring.text_file_windows(tokenizer, path, config, FLAGS.context_length,
                                              FLAGS.max_tokens) for path in FLAGS.text_file]
    config, params = loading.load_params(settings.checkpoint, dtype=FLAGS.dtype)
    logging.info("scoring %d tokens with stock routing and with gating %s",
                 sum(windows.num_scored for windows in windows_list),
                 settings.gate.describe())
    stock_scores = score_texts(params, config, windows_list, None)
    gated_scores = score_texts(params, config, windows_list, settings.gate.thresholds_array())
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    scoring.save_trace(stock_scores, os.path.join(FLAGS.out_dir, "trace_stock.npz"))
    scoring.save_trace(gated_scores, os.path.join(FLAGS.out_dir, "trace_gated.npz"))
    return config, stock_scores, gated_scores


def run_study(settings: StudySettings, config, stock_scores: scoring.TokenScores,
              gated_scores: scoring.TokenScores) -> dict[str, Any]:
    """Replay the policies, compare the cost tables and return the JSON-ready report."""
    profile, num_experts = settings.profile, settings.profile.num_experts
    stock = trace_of(stock_scores, "stock trace")
    gated = trace_of(gated_scores, "gated trace")
    logging.info("measuring the empirical cost tables")
    empirical = {"stock": empirical_table_of(stock, num_experts, FLAGS.prefetch_count),
                 "gated": empirical_table_of(gated, num_experts, FLAGS.prefetch_count)}
    models = cost_models(config)
    comparisons = []
    for cache_size in settings.cache_sizes:
        logging.info("replaying the policies at cache size %d", cache_size)
        comparisons.append(compare_policies(stock, gated, profile, cache_size,
                                            FLAGS.prefetch_count, empirical["gated"], models))
    logging.info("comparing the cost tables with replayed loads")
    cost_comparison = {
        name: compare_costs(trace, profile, name == "gated", settings.slot_counts,
                            FLAGS.prefetch_count, empirical[name])
        for name, trace in (("stock", stock), ("gated", gated))}
    goal_comparison = next(comparison for comparison in comparisons
                           if comparison["cache_size"] == settings.goal_cache_size)

    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "checkpoint": settings.checkpoint,
        "profile": settings.profile_path,
        "dtype": config.dtype,
        "text_files": list(FLAGS.text_file),
        "context_length": FLAGS.context_length,
        "max_tokens_per_text": FLAGS.max_tokens,
        "gate_budget": settings.gate.gate_budget,
        "profile_gate_budget": profile.gate_budget,
        "gate_thresholds": list(settings.gate.thresholds),
        "prefetch_count": FLAGS.prefetch_count,
        "cost_models": {name: dataclasses.asdict(model) for name, model in models.items()},
        "traces": {"stock": trace_summary(stock_scores), "gated": trace_summary(gated_scores)},
        "goals": check_goals(goal_comparison),
        "policies": comparisons,
        "per_layer": {
            "prefetch_accuracy_stock": prefetch_accuracy(stock).tolist(),
            "prefetch_accuracy_gated": prefetch_accuracy(gated).tolist(),
            "profile_prefetch_accuracy": (None if profile.prefetch_accuracy is None
                                          else list(profile.prefetch_accuracy)),
            "single_expert_ratio_gated": single_expert_ratio(gated).tolist(),
            "profile_single_expert_ratio": list(profile.single_expert_ratio),
        },
        "cost_comparison": cost_comparison,
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(
            f"unexpected arguments {argv[1:]}; give lists comma-separated, as in "
            "--cache_sizes=32,64,128")
    settings = settings_from_flags()
    config, stock_scores, gated_scores = record_traces(settings)
    report = run_study(settings, config, stock_scores, gated_scores)
    profiles.write_json_atomic(report, os.path.join(FLAGS.out_dir, "policy_study.json"))
    with open(os.path.join(FLAGS.out_dir, "policy_study.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(report))

    goals = report["goals"]
    print(f"cache size {goals['cache_size']}: the full policy halves on-demand loads: "
          f"{'yes' if goals['halves_loads'] else 'no'} (ratio {_number(goals['loads_ratio'])});"
          f" its copies are within {_COPY_GOAL_RATIO}x of Belady's: "
          f"{'yes' if goals['copies_within_bound'] else 'no'} (ratio "
          f"{_number(goals['copies_ratio'])})")
    print(f"wrote policy_study.json, policy_study.md and the traces to {FLAGS.out_dir}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
