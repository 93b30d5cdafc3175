"""Token sampling and the generation loop, both independent of the engine behind the logits."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from adapmoe_jax.errors import UserInputError


class Engine(Protocol):
    """An engine that returns float logits [V] after a prompt, then after each token."""

    def start(self, prompt_ids: Sequence[int], max_len: int) -> np.ndarray: ...

    def step(self, token_id: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Settings that choose the next token.

    Attributes:
      temperature: divides the logits; 0 picks the argmax (greedy).
      top_p: nucleus sampling keeps the smallest set of tokens whose probability
        reaches top_p; 1 keeps all.
      seed: seed of the sampling generator.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserInputError(
                f"invalid --temperature={self.temperature}; use 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"invalid --top_p={self.top_p}; use a value in (0, 1]")


def sample_token(logits_V: np.ndarray, settings: SamplingSettings,
                 rng: np.random.Generator) -> int:
    """Choose the next token id from float logits [V]."""
    if settings.temperature == 0:
        return int(np.argmax(logits_V))
    scaled = logits_V.astype(np.float64) / settings.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if settings.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep every token up to and including the one that reaches top_p.
        keep = order[:int(np.searchsorted(cumulative, settings.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids and timings (seconds) of one prompt."""

    token_ids: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    stopped_at_eos: bool


def generate(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int,
             eos_ids: Sequence[int], settings: SamplingSettings,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Prefill `prompt_ids`, then sample up to `max_new_tokens`, stopping at EOS.

    The EOS token is included in the result when reached. `on_token` receives
    every new token as soon as it is chosen, for streaming.
    """
    rng = np.random.default_rng(settings.seed)
    started = time.perf_counter()
    logits = engine.start(prompt_ids, len(prompt_ids) + max_new_tokens)
    prefill_seconds = time.perf_counter() - started

    tokens: list[int] = []
    steps = 0
    stopped = False
    started = time.perf_counter()
    for index in range(max_new_tokens):
        token = sample_token(logits, settings, rng)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids:
            stopped = True
            break
        if index + 1 < max_new_tokens:
            logits = engine.step(token)
            steps += 1
    decode_seconds = time.perf_counter() - started
    return GenerationResult(tokens, prefill_seconds, decode_seconds, steps, stopped)
