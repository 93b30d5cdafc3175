"""Tests for the tokenizer wrapper, with the real Mixtral-8x7B tokenizer files."""

import json
import os
import shutil

import pytest

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.text.tokenizer import REPLACEMENT_CHAR, Tokenizer

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "data", "mixtral-8x7b")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")

STREAM_TEXTS = [
    "Once upon a time, there was a little fox.",
    "fox 🦊 ꙮ done",  # byte-fallback tokens: 4 and 3 bytes per character
    "héllo 世界  two  spaces\nnew line\ttab",
    " leading space and trailing ",
    "🦊🦊",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(REFERENCE_DIR)


def _copy_reference(directory, tokenizer_config=None, post_processor="keep"):
    """Copy the tokenizer files, optionally replacing tokenizer_config.json's content
    and tokenizer.json's post-processor."""
    os.makedirs(directory, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(REFERENCE_DIR, name), os.path.join(directory, name))
    if tokenizer_config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f)
    if post_processor != "keep":
        path = os.path.join(directory, "tokenizer.json")
        with open(path) as f:
            data = json.load(f)
        data["post_processor"] = post_processor
        with open(path, "w") as f:
            json.dump(data, f)
    return directory


def test_special_ids(tokenizer):
    assert tokenizer.bos_id == 1
    assert tokenizer.eos_id == 2
    assert tokenizer.eos_ids == (2,)
    assert tokenizer.add_bos
    assert not tokenizer.add_eos
    assert tokenizer.vocab_size == 32000


def test_encode_known_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [1, 22557, 1526]
    assert tokenizer.encode("Once upon a time, there was a little fox.") == [
        1, 5713, 3714, 264, 727, 28725, 736, 403, 264, 1628, 285, 1142, 28723]


def test_encode_empty_text(tokenizer):
    assert tokenizer.encode("") == [1]


def test_decode_round_trip(tokenizer):
    for text in STREAM_TEXTS[:3]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_from_post_processor_only(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    directory = _copy_reference(str(tmp_path), tokenizer_config=config)

    tokenizer = Tokenizer.from_dir(directory)

    assert tokenizer.add_bos
    assert tokenizer.encode("Hello world") == [1, 22557, 1526]


def test_bos_added_without_post_processor(tmp_path):
    directory = _copy_reference(str(tmp_path), post_processor=None)

    tokenizer = Tokenizer.from_dir(directory)

    assert tokenizer.backend.encode("Hello world").ids == [22557, 1526]
    assert tokenizer.encode("Hello world") == [1, 22557, 1526]


def test_bos_disabled_by_tokenizer_config(tmp_path):
    config = {"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    directory = _copy_reference(str(tmp_path), tokenizer_config=config)

    tokenizer = Tokenizer.from_dir(directory)

    assert tokenizer.encode("Hello world") == [22557, 1526]


def test_eos_added_when_configured(tmp_path):
    config = {"add_bos_token": True, "add_eos_token": True, "bos_token": "<s>",
              "eos_token": "</s>"}
    directory = _copy_reference(str(tmp_path), tokenizer_config=config)

    assert Tokenizer.from_dir(directory).encode("Hello world") == [1, 22557, 1526, 2]


def test_missing_tokenizer_json_raises(tmp_path):
    with pytest.raises(UserInputError, match=r"tokenizer file not found: .*tokenizer\.json"):
        Tokenizer.from_dir(str(tmp_path))


def test_unknown_bos_token_raises(tmp_path):
    directory = _copy_reference(str(tmp_path), tokenizer_config={"bos_token": "<bos>"})
    with pytest.raises(UserInputError, match="bos_token '<bos>' is not in"):
        Tokenizer.from_dir(directory)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decode_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder()

    deltas = [decoder.push(token_id) for token_id in ids]
    tail = decoder.flush()

    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert tail == ""
    for delta in deltas:
        assert REPLACEMENT_CHAR not in delta


def test_stream_decode_holds_partial_character(tokenizer):
    ids = tokenizer.encode("fox 🦊")
    assert len(ids) == 8  # BOS, "▁f", "ox", "▁", then the four UTF-8 bytes of the fox.
    decoder = tokenizer.stream_decoder()

    deltas = [decoder.push(token_id) for token_id in ids]

    assert deltas[-4:] == ["", "", "", "🦊"]


def test_stream_flush_returns_incomplete_bytes(tokenizer):
    ids = tokenizer.encode("fox 🦊")[:-1]
    decoder = tokenizer.stream_decoder()

    text = "".join(decoder.push(token_id) for token_id in ids)

    assert text == "fox "
    assert decoder.flush() == tokenizer.decode(ids)[len("fox "):]


def test_stream_decode_keeps_special_tokens(tokenizer):
    ids = tokenizer.encode("Hello world") + [tokenizer.eos_id]
    decoder = tokenizer.stream_decoder(skip_special_tokens=False)

    text = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()

    assert text == tokenizer.decode(ids, skip_special_tokens=False)
