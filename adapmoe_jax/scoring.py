"""Scoring passes shared by evaluation, calibration and the gating study.

Text becomes non-overlapping windows of at most `context_length` tokens. Each
window starts with BOS when the tokenizer adds one. A window of C tokens feeds
its first C - 1 tokens to the model, and the logits at position t score token
t + 1, so the first token of every window is never scored. Every model input
position is therefore a scored position, and a routing trace has one row per
scored token. A short last window is padded to the common length and its
padding is masked out, which is exact for a causal model and keeps one
compiled shape.

`probe_forward` is `transformer.forward` without a KV cache, built from the
same `attention_block` and MoE functions. It adds what evaluation and
calibration need: the experts the adaptive gate dropped, the next-layer
expert prediction, an additive perturbation of each layer's MoE output, and
the gap between each token's top two experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adapmoe_jax import cli
from adapmoe_jax import profiles
from adapmoe_jax.ckpt.converted import CONFIG_JSON
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.model import layers
from adapmoe_jax.model import transformer
from adapmoe_jax.policies import gating
from adapmoe_jax.policies import prefetch
from adapmoe_jax.text.tokenizer import Tokenizer

Array = jax.Array
Params = transformer.Params


# --- Windows --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Windows:
    """Model inputs cut from one text.

    Attributes:
      inputs_WT: [W, T] int32 token ids fed to the model, padded with 0.
      targets_WT: [W, T] int32, the token each input position predicts.
      scored_WT: [W, T] bool, False on padding.
    """

    inputs_WT: np.ndarray
    targets_WT: np.ndarray
    scored_WT: np.ndarray

    @property
    def num_windows(self) -> int:
        return self.inputs_WT.shape[0]

    @property
    def num_scored(self) -> int:
        return int(self.scored_WT.sum())


def encode_text(tokenizer: Tokenizer, text: str, vocab_size: int,
                origin: str = "text") -> tuple[list[int], int | None]:
    """Tokenize `text`; returns (ids without the leading BOS, the BOS id or None).

    The BOS id is None when the tokenizer adds no BOS, so windows start with a
    text token. Raises UserInputError when an id does not fit the model's
    vocabulary, which means the tokenizer belongs to another model.
    """
    ids = tokenizer.encode(text)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    if bos_id is not None:
        ids = ids[1:]
    largest = max(ids, default=bos_id if bos_id is not None else -1)
    if largest >= vocab_size:
        raise UserInputError(
            f"{origin} encodes to token id {largest}, but the model has vocab_size="
            f"{vocab_size}; use the tokenizer that belongs to the checkpoint")
    return ids, bos_id


def split_windows(text_ids: list[int], bos_id: int | None, context_length: int,
                  max_tokens: int) -> Windows:
    """Cut text ids into windows that score at most `max_tokens` tokens.

    Windows hold `context_length` tokens, BOS included, except a shorter last
    one. A window needs two tokens to score one, so a text too short for any
    window gives a Windows with W = 0.
    """
    if context_length < 2:
        raise UserInputError(
            f"invalid context length {context_length}; use at least 2 tokens")
    if max_tokens < 1:
        raise UserInputError(f"invalid max_tokens {max_tokens}; use a positive number")
    prefix = [] if bos_id is None else [bos_id]
    body_length = context_length - len(prefix)
    windows: list[list[int]] = []
    position = scored = 0
    while position < len(text_ids) and scored < max_tokens:
        # A window of n tokens scores n - 1 of them.
        take = min(body_length, max_tokens - scored + 1 - len(prefix))
        window = prefix + text_ids[position:position + take]
        position += take
        if len(window) < 2:
            break
        windows.append(window)
        scored += len(window) - 1
    return _pad_windows(windows)


def _pad_windows(windows: list[list[int]]) -> Windows:
    length = max((len(window) - 1 for window in windows), default=0)
    inputs_WT = np.zeros((len(windows), length), np.int32)
    targets_WT = np.zeros((len(windows), length), np.int32)
    scored_WT = np.zeros((len(windows), length), bool)
    for row, window in enumerate(windows):
        count = len(window) - 1
        inputs_WT[row, :count] = window[:-1]
        targets_WT[row, :count] = window[1:]
        scored_WT[row, :count] = True
    return Windows(inputs_WT, targets_WT, scored_WT)


def read_config(checkpoint: str, dtype: str | None) -> MixtralConfig:
    """Read the checkpoint's config alone, to check flags before loading weights."""
    return MixtralConfig.from_json_file(os.path.join(checkpoint, CONFIG_JSON), dtype=dtype)


def check_context_length(context_length: int, config: MixtralConfig) -> None:
    """Raise UserInputError unless windows of this length fit the model."""
    if context_length < 2:
        raise UserInputError(
            f"invalid --context_length={context_length}; use at least 2 tokens")
    if context_length > config.max_position_embeddings:
        raise UserInputError(
            f"--context_length={context_length} exceeds the model's "
            f"max_position_embeddings={config.max_position_embeddings}; use at most that")


def text_file_windows(tokenizer: Tokenizer, path: str, config: MixtralConfig,
                      context_length: int, max_tokens: int) -> Windows:
    """Read, tokenize and window a text file; raises UserInputError if it is under 2 tokens."""
    text = cli.read_text_file(path)
    text_ids, bos_id = encode_text(tokenizer, text, config.vocab_size, origin=path)
    windows = split_windows(text_ids, bos_id, context_length, max_tokens)
    if windows.num_windows == 0:
        count = len(text_ids) + (bos_id is not None)
        raise UserInputError(
            f"{path} is {count} token(s) long; scoring needs at least 2 tokens, so pass a "
            "longer text")
    return windows


# --- The probed forward pass --------------------------------------------------------------

class ProbeOutputs(NamedTuple):
    """Outputs of `probe_forward`; per-layer arrays are [L, B, T, ...]."""

    logits_BTV: Array  # float32
    weights_LBTK: Array  # float32 after gating; a dropped expert has weight 0
    experts_LBTK: Array  # int32, -1 where the gate dropped the expert
    predicted_LBTK: Array  # int32, layer l's router on layer l-1's MoE input; -1 at l = 0
    expert_gap_LBTD: Array | None  # E1(x) - E2(x), only with with_expert_gap


def probe_forward(params: Params, config: MixtralConfig, tokens_BT: Array,
                  thresholds_L: Array, moe_delta_LBTD: Array | None = None,
                  with_expert_gap: bool = False) -> ProbeOutputs:
    """Run the model without a cache and record routing, predictions and expert gaps.

    Args:
      thresholds_L: [L] adaptive-gate thresholds. All zeros give stock Mixtral
        routing bit for bit, since `gating.adaptive_gate` then drops nothing.
      moe_delta_LBTD: added to each layer's MoE output before the residual
        sum. Calibration differentiates the loss with respect to it at zero.
      with_expert_gap: also return E1(x) - E2(x), the outputs of each token's
        first and second expert before weighting; needs K >= 2.

    Returns:
      ProbeOutputs. With zero thresholds and no delta, logits and routing
      equal `transformer.forward(params, config, tokens_BT)`.
    """
    batch, num_tokens = tokens_BT.shape
    k = config.num_experts_per_tok
    x_BTD = transformer.embed(params, tokens_BT)
    # Step l predicts layer l + 1 from its own MoE input; the last step's
    # prediction (with layer 0's router) is discarded below.
    next_router_LDE = jnp.roll(params["layers"]["router"], -1, axis=0)

    def layer_step(x_BTD, scanned):
        layer, next_router_DE, threshold, delta_BTD = scanned
        x_BTD, moe_in_BTD, logits_BTE, _, _ = transformer.attention_block(
            layer, config, x_BTD, None, None, 0)
        moe_in_TD = moe_in_BTD.reshape(batch * num_tokens, -1)
        weights_TK, experts_TK = gating.route(logits_BTE.reshape(batch * num_tokens, -1), k)
        gated_TK, active_TK = gating.adaptive_gate(weights_TK, threshold)
        moe_out_TD = layers.moe_dense(moe_in_TD, gated_TK, experts_TK,
                                      layer["w1"], layer["w3"], layer["w2"])
        moe_out_BTD = moe_out_TD.reshape(x_BTD.shape)
        if delta_BTD is not None:
            moe_out_BTD = moe_out_BTD + delta_BTD.astype(moe_out_BTD.dtype)
        x_BTD = x_BTD + moe_out_BTD

        predicted_TK = prefetch.predict_next_experts(moe_in_TD, next_router_DE, k)
        gap_BTD = None
        if with_expert_gap:
            gap_TD = _top_two_gap(moe_in_TD, experts_TK, layer["w1"], layer["w3"], layer["w2"])
            gap_BTD = gap_TD.reshape(x_BTD.shape)
        per_token = (gated_TK, gating.drop_inactive(experts_TK, active_TK), predicted_TK)
        per_token = tuple(a.reshape(batch, num_tokens, k) for a in per_token)
        return x_BTD, (*per_token, gap_BTD)

    scanned = (params["layers"], next_router_LDE, thresholds_L, moe_delta_LBTD)
    x_BTD, (weights_LBTK, experts_LBTK, next_LBTK, gap_LBTD) = jax.lax.scan(
        layer_step, x_BTD, scanned)
    unknown_1BTK = jnp.full((1, batch, num_tokens, k), -1, jnp.int32)
    predicted_LBTK = jnp.concatenate([unknown_1BTK, next_LBTK[:-1]], axis=0)
    logits_BTV = transformer.unembed(params, config, x_BTD)
    return ProbeOutputs(logits_BTV, weights_LBTK, experts_LBTK, predicted_LBTK, gap_LBTD)


def _top_two_gap(x_TD: Array, experts_TK: Array, w1_EDF: Array, w3_EDF: Array,
                 w2_EFD: Array) -> Array:
    """Return E1(x) - E2(x) per token: its first expert's output minus its second's."""
    hidden_TEF = jax.nn.silu(jnp.einsum("td,edf->tef", x_TD, w1_EDF))
    hidden_TEF = hidden_TEF * jnp.einsum("td,edf->tef", x_TD, w3_EDF)
    out_TED = jnp.einsum("tef,efd->ted", hidden_TEF, w2_EFD)
    first_TD = jnp.take_along_axis(out_TED, experts_TK[:, 0, None, None], axis=1)[:, 0]
    second_TD = jnp.take_along_axis(out_TED, experts_TK[:, 1, None, None], axis=1)[:, 0]
    return first_TD - second_TD


def token_nll(logits_BTV: Array, targets_BT: Array) -> Array:
    """Return the float32 negative log-likelihood of each target token, [B, T]."""
    log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]


# --- Scoring windows ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Per scored token results of a text, in text order; N scored tokens.

    Attributes:
      nll_N: float32 negative log-likelihood of each scored token.
      experts_NLK: int32 experts per layer, -1 where the gate dropped one.
      weights_NLK: float32 routing weights after gating.
      predicted_NLK: int32 experts predicted for layer l from layer l-1's MoE
        input, -1 at layer 0.
    """

    nll_N: np.ndarray
    experts_NLK: np.ndarray
    weights_NLK: np.ndarray
    predicted_NLK: np.ndarray


@functools.partial(jax.jit, static_argnames=("config",))
def _score_batch(params, config, inputs_BT, targets_BT, thresholds_L):
    outputs = probe_forward(params, config, inputs_BT, thresholds_L)
    nll_BT = token_nll(outputs.logits_BTV, targets_BT)
    return nll_BT, outputs.experts_LBTK, outputs.weights_LBTK, outputs.predicted_LBTK


def score_windows(params: Params, config: MixtralConfig, windows: Windows,
                  thresholds_L: np.ndarray | None = None,
                  on_window: Callable[[int, int], None] | None = None) -> TokenScores:
    """Score every window, gating each token with `thresholds_L` (None for stock routing).

    `on_window(index, num_windows)` is called after each window, for progress logs.
    """
    if thresholds_L is None:
        thresholds_L = np.zeros(config.num_hidden_layers, np.float32)
    thresholds_L = jnp.asarray(thresholds_L, jnp.float32)
    parts: list[tuple[np.ndarray, ...]] = []
    for index in range(windows.num_windows):
        row = slice(index, index + 1)
        nll_BT, experts, weights, predicted = _score_batch(
            params, config, jnp.asarray(windows.inputs_WT[row]),
            jnp.asarray(windows.targets_WT[row]), thresholds_L)
        scored_T = windows.scored_WT[index]
        parts.append((
            np.asarray(nll_BT)[0, scored_T],
            _tokens_first(experts, scored_T),
            _tokens_first(weights, scored_T),
            _tokens_first(predicted, scored_T),
        ))
        if on_window is not None:
            on_window(index, windows.num_windows)
    if not parts:
        raise UserInputError("no tokens to score; the text needs at least 2 tokens")
    nll_N, experts_NLK, weights_NLK, predicted_NLK = (
        np.concatenate(arrays, axis=0) for arrays in zip(*parts))
    return TokenScores(nll_N.astype(np.float32), experts_NLK.astype(np.int32),
                       weights_NLK.astype(np.float32), predicted_NLK.astype(np.int32))


def _tokens_first(array_L1TK: Array, scored_T: np.ndarray) -> np.ndarray:
    """Turn one window's [L, 1, T, K] array into [scored T, L, K]."""
    return np.asarray(array_L1TK)[:, 0, scored_T].transpose(1, 0, 2)


def active_experts(experts_NLK: np.ndarray) -> np.ndarray:
    """Return [N, L] counts of the experts each token used per layer."""
    return np.sum(experts_NLK >= 0, axis=-1)


# --- Gate settings --------------------------------------------------------------------

def check_non_negative(name: str, value: float) -> None:
    """Raise UserInputError unless `value` is finite and >= 0."""
    if not math.isfinite(value) or value < 0:
        raise UserInputError(f"invalid {name}={value!r}; use a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class GateSetting:
    """The adaptive-gate configuration of one scoring run.

    Attributes:
      mode: "off" (stock routing), "sensitivity" (AdapMoE) or "naive" (one threshold).
      thresholds: [L] per-layer thresholds, or None when mode is "off".
      gate_budget: the loss budget of "sensitivity" mode, else None.
      naive_threshold: the threshold of "naive" mode, else None.
      profile: the profile path of "sensitivity" mode, when known.
    """

    mode: str
    thresholds: tuple[float, ...] | None = None
    gate_budget: float | None = None
    naive_threshold: float | None = None
    profile: str | None = None

    @classmethod
    def off(cls) -> "GateSetting":
        return cls("off")

    @classmethod
    def naive(cls, threshold: float, num_layers: int) -> "GateSetting":
        check_non_negative("--naive_threshold", threshold)
        return cls("naive", (float(threshold),) * num_layers, naive_threshold=float(threshold))

    @classmethod
    def sensitivity(cls, profile: profiles.ModelProfile, budget: float,
                    profile_path: str | None = None) -> "GateSetting":
        check_non_negative("--gate_budget", budget)
        thresholds = tuple(float(t) for t in profile.gate_thresholds(budget))
        return cls("sensitivity", thresholds, gate_budget=float(budget), profile=profile_path)

    def thresholds_array(self) -> np.ndarray | None:
        if self.thresholds is None:
            return None
        return np.asarray(self.thresholds, np.float32)

    def describe(self) -> str:
        """Return a short label such as "sensitivity, budget 0.005"."""
        if self.mode == "sensitivity":
            return f"sensitivity, budget {self.gate_budget:g}"
        if self.mode == "naive":
            return f"naive, threshold {self.naive_threshold:g}"
        return "off"

    def to_json_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if self.thresholds is not None:
            fields["thresholds"] = list(self.thresholds)
        return fields


def load_sensitivity_profile(path: str | None, config: MixtralConfig,
                             checkpoint: str) -> profiles.ModelProfile:
    """Load the profile that sensitivity gating needs, or explain how to make one."""
    if path is None:
        raise UserInputError(
            f"--adapgate needs a model profile with layer sensitivities, and no profile "
            f"ships with {checkpoint}; make one with `python -m adapmoe_jax.calibrate "
            f"--checkpoint={checkpoint} --text_file=TEXT --output=profile.json` and pass "
            "--profile=profile.json, or pass --naive_threshold=VALUE instead")
    profile = profiles.load_profile(path)
    profiles.check_matches(profile, config.num_hidden_layers, config.num_local_experts)
    return profile


# --- Summary and trace ----------------------------------------------------------------

def summarize(scores: TokenScores) -> dict[str, Any]:
    """Return perplexity and expert-use statistics of scored tokens as a JSON-ready dict.

    `experts_per_token` is the mean number of experts a token used per layer,
    K without gating. `single_expert_ratio` is the share of (token, layer)
    pairs that used one expert.
    """
    active_NL = active_experts(scores.experts_NLK)
    mean_nll = float(np.mean(scores.nll_N, dtype=np.float64))
    return {
        "num_tokens": int(scores.nll_N.shape[0]),
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "experts_per_token": float(active_NL.mean()),
        "experts_per_token_per_layer": active_NL.mean(axis=0).tolist(),
        "single_expert_ratio": float(np.mean(active_NL == 1)),
        "single_expert_ratio_per_layer": np.mean(active_NL == 1, axis=0).tolist(),
    }


def evaluate_windows(params: Params, config: MixtralConfig, windows: Windows,
                     gate: GateSetting,
                     on_window: Callable[[int, int], None] | None = None
                     ) -> tuple[dict[str, Any], TokenScores]:
    """Score the windows under `gate`; returns (`summarize` dict, per-token scores)."""
    scores = score_windows(params, config, windows, gate.thresholds_array(), on_window)
    return summarize(scores), scores


def save_trace(scores: TokenScores, path: str) -> None:
    """Write the routing trace npz that `python -m adapmoe_jax.simulate` reads.

    Arrays are [tokens, L, K]: `experts` int32 with -1 where the gate dropped
    the expert, `weights` float32, `predicted` int32 (-1 at layer 0). A reader
    sees the old file or the new one, never a part.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as f:
        tmp_path = f.name
        try:
            np.savez(f, experts=scores.experts_NLK, weights=scores.weights_NLK,
                     predicted=scores.predicted_NLK)
        except BaseException:
            f.close()
            os.remove(tmp_path)
            raise
    os.replace(tmp_path, path)
