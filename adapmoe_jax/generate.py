"""Generate text from a Mixtral checkpoint with experts offloaded to a device cache.

  python -m adapmoe_jax.generate --cache_size=64 --adapgate --prompt="Once upon a time"

Without --checkpoint the embedded default model is used. Text streams to
stdout as tokens are produced; logs and the closing summary go to stderr.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging
import numpy as np

from adapmoe_jax import allocation, cli, profiles, sampling, simulate
from adapmoe_jax.ckpt.loading import load_checkpoint
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.runtime import engine as engine_lib
from adapmoe_jax.text.tokenizer import Tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "HF Mixtral or converted checkpoint directory "
                        "(default: the embedded default model).")
    flags.DEFINE_string("prompt", "Once upon a time", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 means greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling probability mass, in (0, 1].")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Parameter and activation dtype (default: the checkpoint's).")
    flags.DEFINE_integer("cache_size", 64, "Experts held on the device, over all layers "
                         "(0 to L x E; at least L x E keeps every expert resident).")
    flags.DEFINE_enum("allocation", "auto", ["auto", "dp", "uniform"],
                      "How the cache is split over layers; auto uses dp when the profile "
                      "has prefetch and gating statistics, else uniform.")
    flags.DEFINE_string("allocation_file", None,
                        "JSON from adapmoe_jax.allocate with slots_per_layer; overrides "
                        "--allocation.")
    flags.DEFINE_bool("prefetch", True, "Copy the predicted experts of the next layer "
                      "early (offloaded decoding only).")
    flags.DEFINE_integer("prefetch_count", 1, "Experts to prefetch per token and layer.")
    flags.DEFINE_bool("adapgate", False, "Drop the second expert where its weight is below "
                      "the layer's sensitivity-based threshold (decode tokens).")
    flags.DEFINE_bool("gate_prefill", False, "With --adapgate, gate prompt tokens too.")
    flags.DEFINE_float(
        "gate_budget", None, "Adaptive gating loss budget T; layer l's threshold is "
        "sqrt(T / S_l). Default: the profile's gate_budget, because T only has meaning "
        "relative to the profile's sensitivity scale (0.005, the AdapMoE default, in the "
        "Mixtral profiles).")
    flags.DEFINE_float("naive_threshold", None, "With --adapgate, one threshold for every "
                       "layer instead of sensitivity-based ones.")
    flags.DEFINE_string("profile", None, "Model profile JSON (default: the embedded "
                        "model's, when generating with it).")
    flags.DEFINE_string("output_json", None, "Write ids, text and statistics here.")
    flags.DEFINE_string("trace_out", None, "Write the decode tokens' routing trace (npz).")


def choose_allocation(config, profile, cache_size: int, adapgate: bool):
    """Return (slots_per_layer or None, allocation name) for the flags given."""
    num_layers, num_experts = config.num_hidden_layers, config.num_local_experts
    if cache_size < 0:
        raise UserInputError(
            f"invalid --cache_size={cache_size}; use 0 to {config.num_experts_total} "
            "(experts on the device over all layers)")
    if FLAGS.allocation_file:
        return list(allocation.read_allocation(FLAGS.allocation_file, num_layers,
                                               num_experts)), "file"
    if cache_size >= config.num_experts_total:
        return None, "resident"
    has_stats = (profile is not None and profile.prefetch_accuracy is not None
                 and (profile.single_expert_ratio is not None or not adapgate))
    requested = FLAGS.allocation
    if requested == "dp" and not has_stats:
        raise UserInputError(
            "--allocation=dp needs a profile with prefetch_accuracy (and "
            "single_expert_ratio with --adapgate); run adapmoe_jax.calibrate or pass "
            "--allocation=uniform")
    if requested == "auto":
        requested = "dp" if has_stats and cache_size >= num_layers else "uniform"
    if requested == "dp":
        return list(allocation.dp_allocation(profile, cache_size, adapgate)), "dp"
    return list(allocation.uniform_allocation(num_layers, num_experts, cache_size)), "uniform"


def check_prompt(prompt_ids: list[int], tokenizer: Tokenizer, config) -> None:
    content = [t for t in prompt_ids if t != tokenizer.bos_id]
    if not content:
        raise UserInputError("the prompt is empty; pass some text with --prompt")
    if FLAGS.max_new_tokens < 1:
        raise UserInputError(f"invalid --max_new_tokens={FLAGS.max_new_tokens}; use 1 or more")
    limit = config.max_position_embeddings
    if len(prompt_ids) + FLAGS.max_new_tokens > limit:
        raise UserInputError(
            f"the prompt has {len(prompt_ids)} tokens and --max_new_tokens="
            f"{FLAGS.max_new_tokens}, more than the model's {limit} positions "
            "(max_position_embeddings); shorten the prompt or lower --max_new_tokens")


def main(argv) -> None:
    del argv
    checkpoint = cli.resolve_checkpoint(FLAGS.checkpoint)
    config, params, store = load_checkpoint(checkpoint, dtype=FLAGS.dtype)
    tokenizer = Tokenizer.from_dir(checkpoint)
    settings = sampling.SamplingSettings(FLAGS.temperature, FLAGS.top_p, FLAGS.seed)
    prompt_ids = tokenizer.encode(FLAGS.prompt)
    check_prompt(prompt_ids, tokenizer, config)

    profile = cli.resolve_profile(FLAGS.profile, checkpoint, config)
    thresholds = cli.gate_thresholds(FLAGS.adapgate, FLAGS.gate_budget, FLAGS.naive_threshold,
                                     profile, config.num_hidden_layers)
    gate = engine_lib.GateSettings(thresholds, FLAGS.gate_prefill)
    slots, allocation_name = choose_allocation(config, profile, FLAGS.cache_size,
                                               FLAGS.adapgate)
    engine = engine_lib.build_engine(
        config, params, store, FLAGS.cache_size, slots, gate,
        prefetch_count=FLAGS.prefetch_count if FLAGS.prefetch else 0)
    # The offloaded engine keeps its own per-layer slices; drop the stacked copies.
    del params
    if FLAGS.trace_out:
        engine.trace = engine_lib.TraceRecorder()
    logging.info("model %s: %d layers x %d experts; cache %s (%s)", checkpoint,
                 config.num_hidden_layers, config.num_local_experts,
                 slots if slots is not None else "all resident", allocation_name)

    stream = tokenizer.stream_decoder()
    sys.stdout.write(FLAGS.prompt)
    sys.stdout.flush()

    def print_token(token_id: int) -> None:
        sys.stdout.write(stream.push(token_id))
        sys.stdout.flush()

    result = sampling.generate(engine, prompt_ids, FLAGS.max_new_tokens, tokenizer.eos_ids,
                               settings, on_token=print_token)
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()

    stats = engine.stats.summary()
    stats.update(
        prefill_tokens_per_second=len(prompt_ids) / result.prefill_seconds,
        time_to_first_token_seconds=result.prefill_seconds,
        decode_tokens_per_second=(result.decode_steps / result.decode_seconds
                                  if result.decode_steps else 0.0),
        device_expert_bytes=_device_expert_bytes(engine, store),
        allocation=allocation_name,
        slots_per_layer=slots)
    print(f"[{len(result.token_ids)} tokens, {stats['decode_tokens_per_second']:.1f} "
          f"tokens/s decode; {stats['expert_loads_per_token']:.2f} expert loads per token, "
          f"hit rate {stats['cache_hit_rate']:.1%}, prefetches used "
          f"{stats['prefetches_used']}/{stats['prefetches_issued']}, "
          f"{stats['experts_per_token']:.2f} experts per token and layer]",
          file=sys.stderr)
    if FLAGS.trace_out and engine.trace.experts:
        simulate.save_trace(engine.trace.to_trace(), FLAGS.trace_out)
    if FLAGS.output_json:
        profiles.write_json_atomic({
            "prompt": FLAGS.prompt,
            "prompt_token_ids": prompt_ids,
            "generated_token_ids": result.token_ids,
            "text": tokenizer.decode(result.token_ids),
            "stopped_at_eos": result.stopped_at_eos,
            "settings": {"cache_size": FLAGS.cache_size, "adapgate": FLAGS.adapgate,
                         "gate_budget": (FLAGS.gate_budget if FLAGS.gate_budget is not None
                                         else getattr(profile, "gate_budget", None)),
                         "naive_threshold": FLAGS.naive_threshold,
                         "gate_prefill": FLAGS.gate_prefill, "prefetch": FLAGS.prefetch,
                         "prefetch_count": FLAGS.prefetch_count,
                         "temperature": FLAGS.temperature, "top_p": FLAGS.top_p,
                         "seed": FLAGS.seed},
            "stats": stats,
        }, FLAGS.output_json)


def _device_expert_bytes(engine, store) -> int:
    if isinstance(engine, engine_lib.OffloadedEngine):
        return engine.device_expert_bytes()
    return store.nbytes


if __name__ == "__main__":
    define_flags()
    cli.run(main)
