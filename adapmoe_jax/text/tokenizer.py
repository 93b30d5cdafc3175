"""The checkpoint's tokenizer: encode prompts, decode ids, and decode a token stream.

Wraps a Hugging Face `tokenizers` fast tokenizer (`tokenizer.json`) and applies the
BOS/EOS rules of the checkpoint's `tokenizer_config.json`, so ids match transformers'
`AutoTokenizer` for plain text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

from adapmoe_jax.errors import UserInputError

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A tokenizer with the checkpoint's special-token rules.

    Attributes:
      bos_id: the beginning-of-sequence id, or None if the tokenizer has none.
      eos_id: the tokenizer's end-of-sequence id, or None.
      eos_ids: the ids that end generation: generation_config.json's
        `eos_token_id`, else `eos_id`; empty if neither exists.
      add_bos: whether `encode` prepends `bos_id`.
      add_eos: whether `encode` appends `eos_id`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None,
                 eos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
                 add_eos: bool = False):
        if add_bos and bos_id is None:
            raise UserInputError(
                "the tokenizer must add a BOS token but none is defined; set bos_token "
                "in tokenizer_config.json")
        if add_eos and eos_id is None:
            raise UserInputError(
                "the tokenizer must add an EOS token but none is defined; set "
                "eos_token in tokenizer_config.json")
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer":
        """Load `tokenizer.json` and the special-token settings from a checkpoint dir.

        BOS is added when tokenizer_config.json sets `add_bos_token`, or, when it
        does not mention it, when tokenizer.json's post-processor adds BOS. EOS
        follows `add_eos_token` the same way.
        """
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserInputError(
                f"tokenizer file not found: {path}; pass a checkpoint directory that "
                "contains tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for bad files.
            raise UserInputError(f"invalid tokenizer file {path}: {e}") from None

        tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        special_tokens = _read_json(os.path.join(directory, "special_tokens_map.json"))
        generation_config = _read_json(os.path.join(directory, "generation_config.json"))

        bos_id = _special_token_id(backend, "bos_token", tokenizer_config, special_tokens)
        eos_id = _special_token_id(backend, "eos_token", tokenizer_config, special_tokens)
        eos_ids = _eos_ids(generation_config, eos_id)
        added_bos, added_eos = _post_processor_additions(backend, bos_id, eos_id)
        add_bos = bool(tokenizer_config.get("add_bos_token", added_bos))
        add_eos = bool(tokenizer_config.get("add_eos_token", added_eos))
        return cls(backend, bos_id, eos_id, eos_ids, add_bos, add_eos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Return the ids of `text`, with BOS and EOS added as `add_bos` and `add_eos` specify."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos:
            ids = [self.bos_id, *ids]
        if self.add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def _read_json(path: str) -> dict[str, Any]:
    """Return the JSON object in `path`, or {} if the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"invalid JSON in {path}: {e}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"invalid {path}: expected a JSON object")
    return value


def _special_token_id(backend: tokenizers.Tokenizer, key: str,
                      *configs: dict[str, Any]) -> int | None:
    """Look up the id of special token `key` ("bos_token") named in the first config."""
    for config in configs:
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise UserInputError(
                    f"{key} {token!r} is not in tokenizer.json's vocabulary; fix "
                    "tokenizer_config.json or special_tokens_map.json")
            return token_id
    return None


def _eos_ids(generation_config: dict[str, Any], eos_id: int | None) -> tuple[int, ...]:
    eos = generation_config.get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and all(isinstance(i, int) for i in eos):
        return tuple(eos)
    return () if eos_id is None else (eos_id,)


def _post_processor_additions(backend: tokenizers.Tokenizer, bos_id: int | None,
                              eos_id: int | None) -> tuple[bool, bool]:
    """Return whether tokenizer.json's post-processor adds (BOS, EOS) to a text."""
    plain = backend.encode("a", add_special_tokens=False).ids
    special = backend.encode("a", add_special_tokens=True).ids
    added_bos = bos_id is not None and special[:1] == [bos_id] and plain[:1] != [bos_id]
    added_eos = eos_id is not None and special[-1:] == [eos_id] and plain[-1:] != [eos_id]
    return added_bos, added_eos


class StreamDecoder:
    """Turns ids that arrive one at a time into text deltas.

    `push` returns only text that later ids cannot change: while the decoded text
    ends in U+FFFD (an incomplete UTF-8 sequence from byte-fallback tokens) the
    delta is held back. Each push decodes only a short window, the ids since the
    previous emitted delta began, so a long stream costs O(window) per id.
    The deltas of every `push` plus `flush` add up to `Tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        # The window decodes ids[_window_start:]; ids[_window_start:_emitted_end]
        # were emitted already and give the context that decoding needs (the
        # leading-space rule of SentencePiece decoders, for one).
        self._window_start = 0
        self._emitted_end = 0
        self._emitted_text: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one id and return the newly stable text, possibly ""."""
        self._ids.append(token_id)
        context = self._decode(self._ids[self._window_start:self._emitted_end])
        text = self._decode(self._ids[self._window_start:])
        if text.endswith(REPLACEMENT_CHAR) or not text.startswith(context):
            return ""
        self._window_start = self._emitted_end
        self._emitted_end = len(self._ids)
        return self._emit(text[len(context):])

    def flush(self) -> str:
        """Return the text held back so far, incomplete sequences included."""
        full = self._decode(self._ids)
        emitted = "".join(self._emitted_text)
        # NOTE: if a decoder ever changed text that was already emitted, this returns
        # only what follows the longest common prefix, because emitted text is final.
        common = len(os.path.commonprefix([full, emitted]))
        self._emitted_end = len(self._ids)
        return self._emit(full[common:])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, delta: str) -> str:
        if delta:
            self._emitted_text.append(delta)
        return delta
