"""Measure perplexity on a text file, with or without AdapMoE's adaptive gate.

The text is cut into non-overlapping windows of --context_length tokens, each
starting with BOS when the tokenizer adds one, and every token but the first
of each window is scored (see `scoring`). With --adapgate every scored token
is gated: a token's second expert is dropped at layer l when its weight is
below sqrt(gate_budget / S_l), with S_l from the model profile that
`python -m adapmoe_jax.calibrate` writes. --naive_threshold instead uses one
threshold in every layer, the baseline that AdapMoE compares against.

Examples:
  python -m adapmoe_jax.evaluate --text_file=data/validation/tinystories.txt
  python -m adapmoe_jax.evaluate --checkpoint=DIR --text_file=book.txt --adapgate \
      --profile=profile.json --gate_budget=0.002 --output_json=eval.json \
      --trace_out=trace.npz
"""

from __future__ import annotations

from typing import Sequence

from absl import flags
from absl import logging

from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax import scoring
from adapmoe_jax.ckpt import loading
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.text.tokenizer import Tokenizer

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory, HF or converted; default: the embedded model.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text file to score.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4096, "Maximum number of tokens scored.")
_CONTEXT_LENGTH = flags.DEFINE_integer(
    "context_length", 256, "Tokens per window, BOS included; windows do not overlap.")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Parameter and activation dtype (float32, bfloat16, float16); "
    "default: the checkpoint's.")
_ADAPGATE = flags.DEFINE_bool(
    "adapgate", False, "Gate every scored token with the profile's layer sensitivities.")
_GATE_BUDGET = flags.DEFINE_float(
    "gate_budget", None, "Loss budget T of the adaptive gate; layer l's threshold is sqrt(T / S_l). "
    "Default: the profile's gate_budget, because T only has meaning relative to the "
    "profile's sensitivity scale (0.005, the AdapMoE default, in the Mixtral profiles).")
_NAIVE_THRESHOLD = flags.DEFINE_float(
    "naive_threshold", None, "Gate with this one weight threshold in every layer instead "
    "of the profile's sensitivities; turns gating on.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "Model profile JSON with layer sensitivities; default: the shipped "
    "profile of the embedded model.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the results to this JSON file.")
_TRACE_OUT = flags.DEFINE_string(
    "trace_out", None, "Write the routing trace of the scored tokens to this npz file.")


def resolve_gate(config: MixtralConfig, checkpoint: str) -> scoring.GateSetting:
    """Build the gate setting from the flags."""
    if _NAIVE_THRESHOLD.value is not None:
        return scoring.GateSetting.naive(_NAIVE_THRESHOLD.value, config.num_hidden_layers)
    if not _ADAPGATE.value:
        if _PROFILE.value is not None:
            raise UserInputError(
                "--profile applies only with --adapgate; add --adapgate or drop --profile")
        return scoring.GateSetting.off()
    profile_path = _PROFILE.value or cli.default_profile_path(checkpoint)
    profile = scoring.load_sensitivity_profile(profile_path, config, checkpoint)
    budget = profile.gate_budget if _GATE_BUDGET.value is None else _GATE_BUDGET.value
    return scoring.GateSetting.sensitivity(profile, budget, profile_path)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(f"unexpected arguments {argv[1:]}; all options are --flags")
    if _TEXT_FILE.value is None:
        raise UserInputError("missing --text_file; pass the UTF-8 text file to score")
    if _MAX_TOKENS.value < 1:
        raise UserInputError(f"invalid --max_tokens={_MAX_TOKENS.value}; use a positive number")
    if _GATE_BUDGET.value is not None:
        scoring.check_non_negative("--gate_budget", _GATE_BUDGET.value)
    if _NAIVE_THRESHOLD.value is not None:
        scoring.check_non_negative("--naive_threshold", _NAIVE_THRESHOLD.value)

    checkpoint = cli.resolve_checkpoint(_CHECKPOINT.value)
    config = scoring.read_config(checkpoint, _DTYPE.value)
    scoring.check_context_length(_CONTEXT_LENGTH.value, config)
    tokenizer = Tokenizer.from_dir(checkpoint)
    windows = scoring.text_file_windows(tokenizer, _TEXT_FILE.value, config,
                                        _CONTEXT_LENGTH.value, _MAX_TOKENS.value)
    gate = resolve_gate(config, checkpoint)

    config, params = loading.load_params(checkpoint, dtype=_DTYPE.value)
    logging.info("scoring %d tokens of %s in %d windows, gating %s", windows.num_scored,
                 _TEXT_FILE.value, windows.num_windows, gate.describe())

    def log_window(index: int, count: int) -> None:
        logging.info("scored window %d of %d", index + 1, count)

    summary, scores = scoring.evaluate_windows(params, config, windows, gate, log_window)
    report = {
        "checkpoint": checkpoint,
        "text_file": _TEXT_FILE.value,
        "context_length": _CONTEXT_LENGTH.value,
        "num_windows": windows.num_windows,
        "dtype": config.dtype,
        **summary,
        "gating": gate.to_json_dict(),
        "nll": scores.nll_N.tolist(),
    }
    if _OUTPUT_JSON.value:
        profiles.write_json_atomic(report, _OUTPUT_JSON.value)
    if _TRACE_OUT.value:
        scoring.save_trace(scores, _TRACE_OUT.value)
    print(f"perplexity {summary['perplexity']:.4f} over {summary['num_tokens']} tokens; "
          f"{summary['experts_per_token']:.3f} experts per token, single-expert ratio "
          f"{summary['single_expert_ratio']:.3f}; gating {gate.describe()}")


if __name__ == "__main__":
    cli.run(main)
