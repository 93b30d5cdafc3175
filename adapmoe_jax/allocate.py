"""Split the expert cache over the layers with AdapMoE's DP allocator.

Example:
  python -m adapmoe_jax.allocate --profile=configs/mixtral-8x7b.json \
      --cache_size=64 --adapgate --output=allocation.json

writes {"cache_size": 64, "slots_per_layer": [...]} and prints each layer's
slots and expected on-demand loads per token. With --cost=empirical the cost
of each slot count is measured by replaying a routing trace through LRU.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from adapmoe_jax import allocation
from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax import simulate
from adapmoe_jax.errors import UserInputError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Define the flags at run time, so importing this module defines none."""
    flags.DEFINE_string("profile", None,
                        "Model profile JSON, such as configs/mixtral-8x7b.json.")
    flags.DEFINE_integer("cache_size", None, "Total expert slots over all layers.")
    flags.DEFINE_bool("adapgate", False,
                      "Allocate for adaptive gating, using the profile's single_expert_ratio "
                      "(analytic cost only).")
    flags.DEFINE_enum("cost", "analytic", ["analytic", "empirical"],
                      "analytic: AdapMoE's expected-loads formula from the profile; "
                      "empirical: LRU loads per token measured on --trace.")
    flags.DEFINE_string("trace", None, "Routing trace npz for --cost=empirical.")
    flags.DEFINE_integer("prefetch_count", 1, "With --cost=empirical, experts prefetched per "
                         "token and layer in the replay (0 replays LRU alone).")
    flags.DEFINE_string("output", None, "Path of the allocation JSON to write.")
    flags.mark_flags_as_required(["profile", "cache_size"])


def cost_table_from_flags(profile: profiles.ModelProfile) -> np.ndarray:
    """Return the [L, E+1] cost table the flags select."""
    if FLAGS.cost == "analytic":
        if FLAGS.trace:
            raise UserInputError("--trace is used only with --cost=empirical")
        return allocation.analytic_cost_table(profile, FLAGS.adapgate)
    if FLAGS.adapgate:
        raise UserInputError(
            "--adapgate applies to --cost=analytic only; for the empirical cost, pass a "
            "trace recorded with adaptive gating on")
    if not FLAGS.trace:
        raise UserInputError("--cost=empirical needs --trace=PATH, a routing trace npz")
    trace = simulate.load_trace(FLAGS.trace)
    if trace.max_expert_id() >= profile.num_experts:
        raise UserInputError(
            f"the trace uses expert id {trace.max_expert_id()} but the profile has "
            f"{profile.num_experts} experts; use the trace and profile of one model")
    profiles.check_matches(profile, trace.num_layers, profile.num_experts)
    layer_traces = [trace.layer_steps(layer) for layer in range(trace.num_layers)]
    predicted = [trace.predicted[:, layer] for layer in range(trace.num_layers)]
    return allocation.empirical_cost_table(layer_traces, profile.num_experts, predicted,
                                           FLAGS.prefetch_count)


def format_table(slots_per_layer: Sequence[int], cost_table: np.ndarray) -> str:
    """Return one line per layer with its slots and expected loads per token, then the total."""
    lines = [f"{'layer':>5}  {'slots':>5}  {'loads/token':>11}"]
    total = 0.0
    for layer, slots in enumerate(slots_per_layer):
        loads = float(cost_table[layer, slots])
        total += loads
        lines.append(f"{layer:>5}  {slots:>5}  {loads:>11.4f}")
    lines.append(f"{'total':>5}  {sum(slots_per_layer):>5}  {total:>11.4f}")
    return "\n".join(lines)


def run_from_flags() -> tuple[int, ...]:
    profile = profiles.load_profile(FLAGS.profile)
    cost_table = cost_table_from_flags(profile)
    slots_per_layer = allocation.allocate_slots(cost_table, FLAGS.cache_size)
    if FLAGS.output:
        allocation.write_allocation(FLAGS.cache_size, slots_per_layer, FLAGS.output)
    print(format_table(slots_per_layer, cost_table))
    return slots_per_layer


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    run_from_flags()


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
