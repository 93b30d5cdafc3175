"""Time greedy decoding: the fully jitted ResidentEngine step against transformers.

Both sides load the same HF checkpoint directory, encode the same prompt, and
decode --new_tokens tokens greedily with EOS suppressed, on the same number of
CPU threads. Each side first runs `_WARMUP_RUNS` warm-up generations, timed
and reported apart from the measurement. The first includes JAX compilation,
and more than one is needed because transformers' first few generate calls
were slower than later ones in smoke runs. Each side's time per decoded token
is the median over --repeats runs, and the script checks that both sides
chose the same tokens.

How each side is timed:
  * JAX: `sampling.generate` on a fresh `ResidentEngine`. Its decode time
    covers the N - 1 jitted decode steps after the prefill, so the time per
    token is decode seconds / (N - 1).
  * transformers: `MixtralForCausalLM.generate(do_sample=False,
    max_new_tokens=N, min_new_tokens=N)`, minus the same call with
    max_new_tokens=1 and min_new_tokens=1, which runs the prefill and
    chooses one token. The difference covers N - 1 decode forwards, so the
    time per token is the difference / (N - 1). Each run times both calls
    and the median is taken over the runs' per-token times.
  * `min_new_tokens` makes transformers set the EOS logits to -inf, so the
    JAX side masks the same logits before its argmax.

Threads: before JAX is imported the script appends
`--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2` to
XLA_FLAGS and restricts the process to the first `_THREADS` CPUs of its
affinity mask. jaxlib 0.10.2 rejects unknown `--` flags but accepts the bare
`intra_op_parallelism_threads=2` token, which is not in XLA's `--flag` form,
so the script does not rely on it. The affinity mask bounds XLA instead: its
CPU thread pools grow with the CPUs the process may run on (13 threads with
one CPU and 17 with two, measured with jaxlib 0.10.2). transformers runs with
`torch.set_num_threads(_THREADS)` under the same mask.

From the repository root:

  PYTHONPATH=. python scripts/bench_vs_transformers.py \
      --output_json=runs/bench/vs_transformers.json \
      --markdown_out=runs/bench/vs_transformers.md
"""

from __future__ import annotations

import os

# Both must be set before JAX creates its CPU client; see the module docstring.
_THREADS = 2
_WARMUP_RUNS = 3
_XLA_THREAD_FLAGS = (f"--xla_cpu_multi_thread_eigen=true "
                     f"intra_op_parallelism_threads={_THREADS}")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_THREAD_FLAGS}".strip()
_ALLOWED_CPUS = sorted(os.sched_getaffinity(0))[:_THREADS]
os.sched_setaffinity(0, _ALLOWED_CPUS)

import datetime  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from adapmoe_jax import cli, profiles, sampling  # noqa: E402
from adapmoe_jax.ckpt.converted import is_converted_dir  # noqa: E402
from adapmoe_jax.ckpt.loading import load_checkpoint  # noqa: E402
from adapmoe_jax.errors import UserInputError  # noqa: E402
from adapmoe_jax.model import transformer  # noqa: E402
from adapmoe_jax.runtime import engine as engine_lib  # noqa: E402
from adapmoe_jax.text.tokenizer import Tokenizer  # noqa: E402

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "HF Mixtral checkpoint directory (config.json and *.safetensors); "
    "default: the embedded model (adapmoe_jax/default_model).")
_PROMPT = flags.DEFINE_string("prompt", "Once upon a time", "Prompt text for both sides.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64,
                                   "Tokens generated per run (at least 2), EOS suppressed.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per side after the warm-up; the "
                                "comparison asks for at least 5.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Dtype of both models; default: the checkpoint's.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the full results here.")
_MARKDOWN_OUT = flags.DEFINE_string(
    "markdown_out", None, "Write the markdown report here; it is printed either way.")


class _SuppressEos:
    """Forwards an engine's logits with the EOS ids set to -inf, as min_new_tokens does."""

    def __init__(self, engine, eos_ids: Sequence[int]):
        self.engine = engine
        self.eos_ids = list(eos_ids)

    def _mask(self, logits_V: np.ndarray) -> np.ndarray:
        if self.eos_ids:
            logits_V = logits_V.copy()
            logits_V[self.eos_ids] = -np.inf
        return logits_V

    def start(self, prompt_ids, max_len):
        return self._mask(self.engine.start(prompt_ids, max_len))

    def step(self, token_id):
        return self._mask(self.engine.step(token_id))


def run_jax(config, full_params, prompt_ids: list[int], new_tokens: int, repeats: int
            ) -> dict[str, Any]:
    """Time the warm-up and `repeats` greedy generations of the ResidentEngine."""

    def generate_once() -> sampling.GenerationResult:
        engine = _SuppressEos(engine_lib.ResidentEngine(config, full_params),
                              config.eos_token_id)
        return sampling.generate(engine, prompt_ids, new_tokens, eos_ids=(),
                                 settings=sampling.SamplingSettings())

    warmup_seconds = []
    for _ in range(_WARMUP_RUNS):
        started = time.perf_counter()
        generate_once()
        warmup_seconds.append(time.perf_counter() - started)
    runs = [generate_once() for _ in range(repeats)]
    per_token = [run.decode_seconds / run.decode_steps for run in runs]
    return {
        "warmup_seconds": warmup_seconds,
        "prefill_seconds_median": statistics.median(run.prefill_seconds for run in runs),
        "seconds_per_decode_token_median": statistics.median(per_token),
        "seconds_per_decode_token_runs": per_token,
        "token_ids": runs[0].token_ids,
        "same_tokens_every_run": all(run.token_ids == runs[0].token_ids for run in runs),
    }


def load_transformers_model(checkpoint: str, dtype_name: str):
    """Load MixtralForCausalLM in eval mode with torch limited to `_THREADS` threads."""
    import torch
    import transformers

    torch.set_num_threads(_THREADS)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.MixtralForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype_name))
    model.eval()
    return model


def run_transformers(model, prompt_ids: list[int], pad_id: int, new_tokens: int,
                     repeats: int) -> dict[str, Any]:
    """Time the warm-up and `repeats` pairs of generate calls (N tokens and 1 token)."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def generate_timed(count: int) -> tuple[list[int], float]:
        with torch.inference_mode():
            started = time.perf_counter()
            output = model.generate(input_ids, attention_mask=attention_mask,
                                    do_sample=False, max_new_tokens=count,
                                    min_new_tokens=count, pad_token_id=pad_id)
            seconds = time.perf_counter() - started
        return output[0, len(prompt_ids):].tolist(), seconds

    warmup_seconds = []
    for _ in range(_WARMUP_RUNS):
        warmup_seconds.append(generate_timed(new_tokens)[1])
        generate_timed(1)
    prefill, full, per_token, tokens = [], [], [], []
    for _ in range(repeats):
        _, one_token_seconds = generate_timed(1)
        run_tokens, seconds = generate_timed(new_tokens)
        tokens.append(run_tokens)
        prefill.append(one_token_seconds)
        full.append(seconds)
        per_token.append((seconds - one_token_seconds) / (new_tokens - 1))
    return {
        "warmup_seconds": warmup_seconds,
        "prefill_seconds_median": statistics.median(prefill),
        "generate_seconds_median": statistics.median(full),
        "seconds_per_decode_token_median": statistics.median(per_token),
        "seconds_per_decode_token_runs": per_token,
        "token_ids": tokens[0],
        "same_tokens_every_run": all(run_tokens == tokens[0] for run_tokens in tokens),
        "num_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
    }


def prefill_logits_difference(model, config, full_params, prompt_ids: list[int]) -> float:
    """Prefill the prompt on both sides; return the max absolute logit difference.

    Compares the logits of the last prompt position.
    """
    import torch

    with torch.inference_mode():
        hf_logits = model(torch.tensor([prompt_ids])).logits[0, -1].float().numpy()
    engine = engine_lib.ResidentEngine(config, full_params)
    ours = engine.start(prompt_ids, len(prompt_ids))
    return float(np.max(np.abs(ours - hf_logits)))


def first_difference(left: list[int], right: list[int]) -> int | None:
    """Return the first index where the token lists differ, or None if they are equal."""
    for index, (left_id, right_id) in enumerate(zip(left, right)):
        if left_id != right_id:
            return index
    return None if len(left) == len(right) else min(len(left), len(right))


def machine_description() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "allowed_cpus": sorted(os.sched_getaffinity(0)),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jax_devices": [str(device) for device in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def markdown_report(report: dict[str, Any]) -> str:
    machine = report["machine"]
    ours, theirs = report["jax"], report["transformers"]
    match = ("identical" if report["tokens_match"] else
             f"different from token {report['first_different_token']}")
    lines = [
        "# ResidentEngine against transformers MixtralForCausalLM", "",
        f"Date {report['date']}. Command: `{report['command']}`", "",
        f"Machine: {machine['cpu_count']} CPUs, process limited to CPUs "
        f"{machine['allowed_cpus']} ({machine['processor'] or 'processor unknown'}), "
        f"{machine['platform']}; jax {machine['jax_version']}, torch "
        f"{machine['torch_version']}, transformers {machine['transformers_version']}.", "",
        f"Checkpoint {report['checkpoint']} ({report['dtype']}), prompt of "
        f"{len(report['prompt_token_ids'])} tokens, {report['new_tokens']} greedy tokens with "
        f"EOS suppressed, median of {report['repeats']} runs. XLA_FLAGS="
        f"`{machine['xla_flags']}`; torch threads {theirs['num_threads']}, attention "
        f"{theirs['attn_implementation']}. The transformers prefill is the time of generate "
        "with max_new_tokens=1, subtracted from the full call.", "",
        "| | first warm-up s | prefill s | ms per decoded token |",
        "|---|---:|---:|---:|",
        f"| JAX ResidentEngine | {ours['warmup_seconds'][0]:.2f} | "
        f"{ours['prefill_seconds_median']:.4f} | "
        f"{1e3 * ours['seconds_per_decode_token_median']:.2f} |",
        f"| transformers | {theirs['warmup_seconds'][0]:.2f} | "
        f"{theirs['prefill_seconds_median']:.4f} | "
        f"{1e3 * theirs['seconds_per_decode_token_median']:.2f} |",
        "",
        f"transformers takes {report['transformers_over_jax_time_per_token']:.2f}x the JAX "
        f"time per decoded token. Greedy tokens: {match}. Last prompt position's logits "
        f"differ by at most {report['prefill_logits_max_abs_difference']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(f"unexpected arguments {argv[1:]}; pass settings as flags")
    new_tokens, repeats = _NEW_TOKENS.value, _REPEATS.value
    if new_tokens < 2:
        raise UserInputError(
            f"invalid --new_tokens={new_tokens}; use 2 or more so at least one token is "
            "decoded")
    if repeats < 1:
        raise UserInputError(f"invalid --repeats={repeats}; use 1 or more (5 or more for "
                             "the comparison)")
    if repeats < 5:
        logging.warning("--repeats=%d is below the 5 runs the comparison asks for", repeats)
    checkpoint = cli.resolve_checkpoint(_CHECKPOINT.value)
    if is_converted_dir(checkpoint):
        raise UserInputError(
            f"{checkpoint} is a converted checkpoint, which transformers cannot load; pass "
            "the HF checkpoint directory it was converted from")

    config, params, store = load_checkpoint(checkpoint, dtype=_DTYPE.value)
    tokenizer = Tokenizer.from_dir(checkpoint)
    prompt_ids = tokenizer.encode(_PROMPT.value)
    if len(prompt_ids) + new_tokens > config.max_position_embeddings:
        raise UserInputError(
            f"the prompt has {len(prompt_ids)} tokens and --new_tokens={new_tokens}, more "
            f"than the model's {config.max_position_embeddings} positions; shorten the "
            "prompt or lower --new_tokens")
    w1, w3, w2 = store.all_stacked()
    full_params = transformer.merge_expert_params(
        params, {"w1": jax.numpy.asarray(w1), "w3": jax.numpy.asarray(w3),
                 "w2": jax.numpy.asarray(w2)})

    ours = run_jax(config, full_params, prompt_ids, new_tokens, repeats)
    model = load_transformers_model(checkpoint, config.dtype)
    pad_id = config.eos_token_id[0] if config.eos_token_id else 0
    theirs = run_transformers(model, prompt_ids, pad_id, new_tokens, repeats)
    difference = first_difference(ours["token_ids"], theirs["token_ids"])

    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "threads": _THREADS,
        "checkpoint": checkpoint,
        "dtype": config.dtype,
        "prompt": _PROMPT.value,
        "prompt_token_ids": prompt_ids,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "transformers_prefill_method": (
            "generate(max_new_tokens=1, min_new_tokens=1) timed in the same run and "
            "subtracted from generate(max_new_tokens=N, min_new_tokens=N); the "
            "difference is divided by N - 1 decode forwards"),
        "jax": ours,
        "transformers": theirs,
        "transformers_over_jax_time_per_token": (
            theirs["seconds_per_decode_token_median"] / ours["seconds_per_decode_token_median"]),
        "tokens_match": difference is None,
        "first_different_token": difference,
        "prefill_logits_max_abs_difference": prefill_logits_difference(
            model, config, full_params, prompt_ids),
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
