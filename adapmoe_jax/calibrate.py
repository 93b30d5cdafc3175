"""Estimate each layer's sensitivity S_l on a calibration text and write a model profile.

Derivation (AdapMoE, Zhong et al., ICCAD 2024). A token routed to experts E1
and E2 with renormalised weights w1 >= w2 gets the layer output
w1 E1(x) + w2 E2(x). Dropping E2 gives the whole weight to E1, so the output
changes by w2 (E1(x) - E2(x)). Expanding the loss to second order in that
change, at a trained model whose expected gradient is about zero, and letting
the Fisher information F = E[g g^T] stand in for the Hessian, the loss grows
by about 1/2 w2^2 (E1 - E2)^T F (E1 - E2). Call the expectation of that
quadratic form S_l and fold the 1/2 into the budget T: the loss change stays
under T when w2 < sqrt(T / S_l), the threshold `policies.gating` applies.

Estimator. With a zero perturbation added to each layer's MoE output, one
backward pass per window gives g_t, the gradient of the window's summed NLL
with respect to layer l's MoE output at position t, for all layers at once.
Then

  S_l = mean over calibration tokens t of (g_t . (E1(x_t) - E2(x_t)))^2,

where E1 and E2 are token t's top two experts under stock routing. g_t is the
gradient of the whole window's loss. It counts token t's own loss and also,
in a causal model, the losses of the later tokens that attend to position t,
so it measures the loss change when the gate alters token t alone.

The profile also records, on the same tokens, `prefetch_accuracy[l]`: how
often the top-1 expert predicted for layer l (layer l's router on layer l-1's
MoE input) is among the K experts layer l uses under stock routing, 0 for
layer 0; and `single_expert_ratio[l]`: the share of tokens that use one expert
at layer l when every token is gated at --gate_budget with these sensitivities.

Example:
  python -m adapmoe_jax.calibrate --checkpoint=DIR --text_file=calibration.txt \
      --output=configs/my-model.json
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax import scoring
from adapmoe_jax.ckpt import loading
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.text.tokenizer import Tokenizer

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory, HF or converted; default: the embedded model.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 calibration text.")
_OUTPUT = flags.DEFINE_string("output", None, "Path of the model profile JSON to write.")
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 4096, "Maximum number of calibration tokens.")
_CONTEXT_LENGTH = flags.DEFINE_integer(
    "context_length", 256, "Tokens per window, BOS included; windows do not overlap.")
_GATE_BUDGET = flags.DEFINE_float(
    "gate_budget", 0.005, "Loss budget T stored in the profile and used to measure "
    "single_expert_ratio.")
_DTYPE = flags.DEFINE_string(
    "dtype", None, "Parameter and activation dtype (float32, bfloat16, float16); "
    "default: the checkpoint's.")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-layer statistics of one calibration run; lists have L entries.

    Attributes:
      layer_sensitivity: S_l, in squared nats.
      prefetch_accuracy: top-1 next-layer prediction hit rate, 0 at layer 0.
      single_expert_ratio: share of tokens that use one expert at the budget.
      num_tokens: calibration tokens.
      mean_nll: mean NLL of those tokens under stock routing, in nats.
    """

    layer_sensitivity: list[float]
    prefetch_accuracy: list[float]
    single_expert_ratio: list[float]
    num_tokens: int
    mean_nll: float


@functools.partial(jax.jit, static_argnames=("config",))
def _window_statistics(params, config, inputs_BT, targets_BT, scored_BT):
    """Return (summed NLL, [L] summed (g . gap)^2, [L] prefetch hits) of one window.

    NOTE: an empirical Fisher in the strict sense averages squared gradients of
    each token's own loss. g here also carries the later tokens' losses, so S_l
    can come out larger than that estimate, and budgets tuned on profiles made
    another way may not transfer unchanged; this is unverified on a real model.
    """
    num_layers = config.num_hidden_layers
    delta_LBTD = jnp.zeros((num_layers, *inputs_BT.shape, config.hidden_size), jnp.float32)
    thresholds_L = jnp.zeros((num_layers,), jnp.float32)

    def window_loss(delta_LBTD):
        outputs = scoring.probe_forward(params, config, inputs_BT, thresholds_L,
                                        moe_delta_LBTD=delta_LBTD, with_expert_gap=True)
        nll_BT = scoring.token_nll(outputs.logits_BTV, targets_BT)
        return jnp.sum(jnp.where(scored_BT, nll_BT, 0.0)), outputs

    (loss, outputs), grad_LBTD = jax.value_and_grad(window_loss, has_aux=True)(delta_LBTD)
    gap_LBTD = outputs.expert_gap_LBTD.astype(jnp.float32)
    projection_LBT = jnp.einsum("lbtd,lbtd->lbt", grad_LBTD, gap_LBTD)
    squares_L = jnp.sum(jnp.where(scored_BT, jnp.square(projection_LBT), 0.0), axis=(1, 2))

    top_prediction_LBT1 = outputs.predicted_LBTK[..., :1]
    hit_LBT = jnp.any(top_prediction_LBT1 == outputs.experts_LBTK, axis=-1)
    hits_L = jnp.sum(hit_LBT & scored_BT, axis=(1, 2))
    return loss, squares_L, hits_L


def estimate_sensitivity(params, config: MixtralConfig, windows: scoring.Windows,
                         on_window: Callable[[int, int, float], None] | None = None
                         ) -> tuple[np.ndarray, np.ndarray, float]:
    """Return ([L] S_l, [L] prefetch accuracy, mean NLL) over the windows' scored tokens.

    `on_window(index, num_windows, mean_nll)` is called after each window.
    """
    check_top_k(config)
    num_layers = config.num_hidden_layers
    squares_L = np.zeros(num_layers, np.float64)
    hits_L = np.zeros(num_layers, np.int64)
    total_nll = 0.0
    for index in range(windows.num_windows):
        row = slice(index, index + 1)
        loss, window_squares, window_hits = _window_statistics(
            params, config, jnp.asarray(windows.inputs_WT[row]),
            jnp.asarray(windows.targets_WT[row]), jnp.asarray(windows.scored_WT[row]))
        squares_L += np.asarray(window_squares, np.float64)
        hits_L += np.asarray(window_hits)
        total_nll += float(loss)
        if on_window is not None:
            on_window(index, windows.num_windows,
                      float(loss) / int(windows.scored_WT[index].sum()))
    count = windows.num_scored
    return squares_L / count, hits_L / count, total_nll / count


def check_top_k(config: MixtralConfig) -> None:
    """Raise UserInputError unless tokens have a second expert that the gate could drop."""
    if config.num_experts_per_tok < 2:
        raise UserInputError(
            f"the model routes each token to num_experts_per_tok="
            f"{config.num_experts_per_tok} expert; adaptive gating needs at least 2")


def calibrate(params, config: MixtralConfig, windows: scoring.Windows, gate_budget: float,
              on_window: Callable[[int, int, float], None] | None = None) -> Calibration:
    """Estimate S_l and prefetch accuracy, then measure the single-expert ratio at the budget."""
    sensitivity_L, accuracy_L, mean_nll = estimate_sensitivity(params, config, windows,
                                                               on_window)
    for layer, value in enumerate(sensitivity_L):
        if not math.isfinite(value) or value <= 0:
            raise UserInputError(
                f"layer {layer} got sensitivity {value!r} on this text, and the gate "
                "needs a positive finite value in every layer; calibrate on a longer or "
                "different text, and check the checkpoint for NaN weights")
    profile = _profile(config, sensitivity_L, gate_budget)
    gate = scoring.GateSetting.sensitivity(profile, gate_budget)
    scores = scoring.score_windows(params, config, windows, gate.thresholds_array())
    single_L = np.mean(scoring.active_experts(scores.experts_NLK) == 1, axis=0)
    return Calibration(
        layer_sensitivity=sensitivity_L.tolist(),
        prefetch_accuracy=accuracy_L.tolist(),
        single_expert_ratio=single_L.tolist(),
        num_tokens=windows.num_scored,
        mean_nll=mean_nll,
    )


def _profile(config: MixtralConfig, sensitivity_L: Sequence[float], gate_budget: float,
             **fields) -> profiles.ModelProfile:
    return profiles.ModelProfile(
        num_layers=config.num_hidden_layers, num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok, layer_sensitivity=tuple(sensitivity_L),
        gate_budget=gate_budget, **fields)


def profile_from_calibration(config: MixtralConfig, result: Calibration, gate_budget: float,
                             source: str) -> profiles.ModelProfile:
    notes = (
        f"Estimated on {result.num_tokens} tokens (mean NLL {result.mean_nll:.4f} nats). "
        "layer_sensitivity[l] is the mean over tokens of (g . (E1(x) - E2(x)))^2, where g "
        "is the gradient of the window's summed NLL with respect to layer l's MoE output "
        "and E1, E2 are the token's top two experts; the threshold of layer l is "
        "sqrt(gate_budget / layer_sensitivity[l]). prefetch_accuracy[l] is how often the "
        "top-1 expert predicted from layer l-1's MoE input is among layer l's experts "
        "under stock routing (0 for layer 0). single_expert_ratio[l] is the share of "
        "tokens that used one expert at layer l with every token gated at gate_budget.")
    return _profile(config, result.layer_sensitivity, gate_budget,
                    single_expert_ratio=tuple(result.single_expert_ratio),
                    prefetch_accuracy=tuple(result.prefetch_accuracy),
                    source=source, notes=notes)


def calibration_windows(tokenizer: Tokenizer, path: str, config: MixtralConfig,
                        context_length: int, max_tokens: int) -> scoring.Windows:
    """Read and window the calibration text; it must fill at least one whole window."""
    text = cli.read_text_file(path)
    text_ids, bos_id = scoring.encode_text(tokenizer, text, config.vocab_size, origin=path)
    count = len(text_ids) + (bos_id is not None)
    if count < context_length:
        raise UserInputError(
            f"calibration text {path} is {count} tokens long, shorter than "
            f"--context_length={context_length}; pass a longer text or a smaller "
            "--context_length")
    return scoring.split_windows(text_ids, bos_id, context_length, max_tokens)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserInputError(f"unexpected arguments {argv[1:]}; all options are --flags")
    if _TEXT_FILE.value is None:
        raise UserInputError("missing --text_file; pass the UTF-8 calibration text")
    if _OUTPUT.value is None:
        raise UserInputError("missing --output; pass the path of the profile JSON to write")
    if _MAX_TOKENS.value < 1:
        raise UserInputError(f"invalid --max_tokens={_MAX_TOKENS.value}; use a positive number")
    scoring.check_non_negative("--gate_budget", _GATE_BUDGET.value)

    checkpoint = cli.resolve_checkpoint(_CHECKPOINT.value)
    config = scoring.read_config(checkpoint, _DTYPE.value)
    scoring.check_context_length(_CONTEXT_LENGTH.value, config)
    check_top_k(config)
    tokenizer = Tokenizer.from_dir(checkpoint)
    windows = calibration_windows(tokenizer, _TEXT_FILE.value, config,
                                  _CONTEXT_LENGTH.value, _MAX_TOKENS.value)

    config, params = loading.load_params(checkpoint, dtype=_DTYPE.value)
    logging.info("calibrating on %d tokens of %s in %d windows", windows.num_scored,
                 _TEXT_FILE.value, windows.num_windows)

    def log_window(index: int, count: int, mean_nll: float) -> None:
        logging.info("window %d of %d: mean NLL %.4f", index + 1, count, mean_nll)

    result = calibrate(params, config, windows, _GATE_BUDGET.value, on_window=log_window)
    source = (f"python -m adapmoe_jax.calibrate on {_TEXT_FILE.value} (checkpoint "
              f"{checkpoint}, context length {_CONTEXT_LENGTH.value}, dtype {config.dtype})")
    profile = profile_from_calibration(config, result, _GATE_BUDGET.value, source)
    profiles.save_profile(profile, _OUTPUT.value)
    sensitivity = ", ".join(f"{value:.4g}" for value in result.layer_sensitivity)
    print(f"wrote {_OUTPUT.value}: {result.num_tokens} tokens; layer sensitivity "
          f"[{sensitivity}]; mean single-expert ratio "
          f"{np.mean(result.single_expert_ratio):.3f} at budget {_GATE_BUDGET.value:g}")


if __name__ == "__main__":
    cli.run(main)
