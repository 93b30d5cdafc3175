"""Compare sensitivity-based and naive adaptive gating: perplexity against experts per token.

Scores each validation text with stock routing, then once per loss budget of
AdapMoE's sensitivity gate (threshold sqrt(budget / S_l) per layer, S_l from
the model profile) and once per naive threshold (the same threshold in every
layer). Every scored token is gated, as `python -m adapmoe_jax.evaluate
--adapgate` does. Writes to --out_dir:

  gating_study.json  every run's perplexity, experts per token and
                     single-expert ratio, in total and per layer
  gating_study.md    the same as one table per source text
  gating_study.png   perplexity against experts per token, one panel per source

Lists are comma-separated. From the repository root:

  PYTHONPATH=. python scripts/gating_accuracy_study.py --out_dir=runs/gating_study \
      --budgets=0,0.001,0.003,0.005,0.007 --naive_thresholds=0.1,0.2,0.3,0.4
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import flags
from absl import logging

from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax import scoring
from adapmoe_jax.ckpt import loading
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.text.tokenizer import Tokenizer

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_TEXTS = [os.path.join(_REPO_ROOT, "data", "validation", f"{name}.txt")
                  for name in ("tinystories", "shakespeare", "kjv")]

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory, HF or converted; default: the embedded model.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "Model profile JSON with layer sensitivities; default: the shipped "
    "profile of the embedded model.")
_TEXT_FILES = flags.DEFINE_list(
    "text_files", _DEFAULT_TEXTS, "Comma-separated UTF-8 texts to score; default: the "
    "three validation texts in data/validation/.")
_BUDGETS = flags.DEFINE_list(
    "budgets", ["0", "0.001", "0.003", "0.005", "0.007", "0.01"],
    "Comma-separated loss budgets of the sensitivity gate.")
_NAIVE_THRESHOLDS = flags.DEFINE_list(
    "naive_thresholds", ["0.1", "0.2", "0.3", "0.4"],
    "Comma-separated thresholds of the naive gate, one threshold for every layer.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4096, "Maximum tokens scored per text.")
_CONTEXT_LENGTH = flags.DEFINE_integer(
    "context_length", 256, "Tokens per window, BOS included; windows do not overlap.")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Parameter and activation dtype; default: the checkpoint's.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the JSON, markdown and PNG.")


def parse_values(flag_name: str, texts: Sequence[str]) -> list[float]:
    """Parse a list flag into non-negative floats, raising UserInputError on a bad entry."""
    values = []
    for text in texts:
        try:
            value = float(text)
        except ValueError:
            raise UserInputError(
                f"invalid --{flag_name} entry {text!r}; give comma-separated numbers such "
                "as 0,0.001,0.005") from None
        scoring.check_non_negative(f"--{flag_name} entry", value)
        values.append(value)
    return values


def gate_settings(config, checkpoint: str, budgets: list[float],
                  naive_thresholds: list[float]) -> list[scoring.GateSetting]:
    """Return the stock setting first, then the sensitivity and naive settings."""
    settings = [scoring.GateSetting.off()]
    if budgets:
        profile_path = _PROFILE.value or cli.default_profile_path(checkpoint)
        profile = scoring.load_sensitivity_profile(profile_path, config, checkpoint)
        settings += [scoring.GateSetting.sensitivity(profile, budget, profile_path)
                     for budget in budgets]
    settings += [scoring.GateSetting.naive(threshold, config.num_hidden_layers)
                 for threshold in naive_thresholds]
    return settings


def setting_value(gate: scoring.GateSetting) -> float | None:
    if gate.mode == "sensitivity":
        return gate.gate_budget
    if gate.mode == "naive":
        return gate.naive_threshold
    return None


def run_study(params, config, texts: dict[str, scoring.Windows],
              settings: list[scoring.GateSetting]) -> list[dict[str, Any]]:
    """Score every text under every setting; returns one result dict per run."""
    results = []
    for source, windows in texts.items():
        stock_perplexity = None
        for gate in settings:
            summary, _ = scoring.evaluate_windows(params, config, windows, gate)
            if gate.mode == "off":
                stock_perplexity = summary["perplexity"]
            results.append({
                "source": source,
                "mode": gate.mode,
                "setting": setting_value(gate),
                "perplexity_increase": summary["perplexity"] / stock_perplexity - 1.0,
                **summary,
                "thresholds": None if gate.thresholds is None else list(gate.thresholds),
            })
            logging.info("%s, gating %s: perplexity %.4f, %.3f experts per token", source,
                         gate.describe(), summary["perplexity"], summary["experts_per_token"])
    return results


def markdown_tables(results: list[dict[str, Any]], header: str) -> str:
    """Return one markdown table per source text."""
    lines = ["# Adaptive gating: perplexity against experts per token", "", header]
    for source in dict.fromkeys(result["source"] for result in results):
        lines += ["", f"## {source}", "",
                  "| gating | budget or threshold | perplexity | increase | "
                  "experts per token | single-expert ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        for result in results:
            if result["source"] != source:
                continue
            setting = "" if result["setting"] is None else f"{result['setting']:g}"
            lines.append(
                f"| {result['mode']} | {setting} | {result['perplexity']:.4f} | "
                f"{100 * result['perplexity_increase']:+.2f}% | "
                f"{result['experts_per_token']:.3f} | {result['single_expert_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Draw perplexity against experts per token, one panel per source text."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UserInputError(
            "matplotlib is not installed, so the plot was skipped (the JSON and markdown "
            "were written); install it with pip install 'adapmoe_jax[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    sources = list(dict.fromkeys(result["source"] for result in results))
    figure, axes = pyplot.subplots(1, len(sources), figsize=(5 * len(sources), 4),
                                   squeeze=False)
    for axis, source in zip(axes[0], sources):
        runs = [result for result in results if result["source"] == source]
        for mode, marker, label in (("sensitivity", "o-", "sensitivity (AdapMoE)"),
                                    ("naive", "s--", "naive threshold")):
            points = sorted((r["experts_per_token"], r["perplexity"], r["setting"])
                            for r in runs if r["mode"] == mode)
            if not points:
                continue
            xs, ys, values = zip(*points)
            axis.plot(xs, ys, marker, label=label)
            for x, y, value in points:
                axis.annotate(f"{value:g}", (x, y), fontsize=7, xytext=(3, 3),
                              textcoords="offset points")
        stock = [r for r in runs if r["mode"] == "off"]
        axis.plot([r["experts_per_token"] for r in stock], [r["perplexity"] for r in stock],
                  "k*", markersize=10, label="stock routing")
        axis.set_title(source)
        axis.set_xlabel("experts per token (mean over layers)")
        axis.set_ylabel("perplexity")
        axis.ticklabel_format(axis="y", useOffset=False)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(
            f"unexpected arguments {argv[1:]}; give lists comma-separated, as in "
            "--budgets=0,0.001,0.005")
    if _OUT_DIR.value is None:
        raise UserInputError("missing --out_dir; pass the folder for the study's outputs")
    if not _TEXT_FILES.value:
        raise UserInputError("--text_files is empty; pass at least one text file")
    budgets = parse_values("budgets", _BUDGETS.value)
    naive_thresholds = parse_values("naive_thresholds", _NAIVE_THRESHOLDS.value)

    checkpoint = cli.resolve_checkpoint(_CHECKPOINT.value)
    config = scoring.read_config(checkpoint, _DTYPE.value)
    scoring.check_context_length(_CONTEXT_LENGTH.value, config)
    settings = gate_settings(config, checkpoint, budgets, naive_thresholds)
    tokenizer = Tokenizer.from_dir(checkpoint)
    texts = {}
    for path in _TEXT_FILES.value:
        source = os.path.splitext(os.path.basename(path))[0]
        if source in texts:
            raise UserInputError(
                f"two text files are named {source}; rename one so the results stay apart")
        texts[source] = scoring.text_file_windows(tokenizer, path, config,
                                                  _CONTEXT_LENGTH.value, _MAX_TOKENS.value)

    config, params = loading.load_params(checkpoint, dtype=_DTYPE.value)
    results = run_study(params, config, texts, settings)

    os.makedirs(_OUT_DIR.value, exist_ok=True)
    profile_path = next((gate.profile for gate in settings if gate.profile), None)
    header = (f"Checkpoint {checkpoint}, profile {profile_path}, context length "
              f"{_CONTEXT_LENGTH.value}, at most {_MAX_TOKENS.value} tokens per text, dtype "
              f"{config.dtype}. Every scored token is gated. The increase is relative to "
              "stock routing on the same text.")
    report = {
        "checkpoint": checkpoint,
        "profile": profile_path,
        "context_length": _CONTEXT_LENGTH.value,
        "max_tokens": _MAX_TOKENS.value,
        "dtype": config.dtype,
        "text_files": dict(zip(texts, _TEXT_FILES.value)),
        "results": results,
    }
    profiles.write_json_atomic(report, os.path.join(_OUT_DIR.value, "gating_study.json"))
    with open(os.path.join(_OUT_DIR.value, "gating_study.md"), "w", encoding="utf-8") as f:
        f.write(markdown_tables(results, header))
    plot(results, os.path.join(_OUT_DIR.value, "gating_study.png"))
    print(f"wrote gating_study.json, gating_study.md and gating_study.png to {_OUT_DIR.value}")


if __name__ == "__main__":
    cli.run(main)
