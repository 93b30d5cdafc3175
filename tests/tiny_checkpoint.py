"""Tiny checkpoints with a character tokenizer, saved in HF format, for command tests."""

import json
import os
import string

import jax
import tokenizers
from tokenizers import models, processors

from adapmoe_jax.ckpt import loading
from adapmoe_jax.config import tiny_config
from adapmoe_jax.model import transformer

TEXT = ("Once upon a time there was a small fox. The fox ran to the river, "
        "drank, and slept under an old tree until the sun went down.\n")

# A random tiny router gives every expert a weight near 1/E, so nothing is ever
# gated; scaling it spreads the top-2 weights over (0.5, 1].
ROUTER_SCALE = 40.0


def write_char_tokenizer(directory):
    """Write a character-level tokenizer of 100 ids that adds BOS, for tiny models."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in string.printable:
        if char not in "\x0b\x0c\r":
            vocab[char] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)


def write_tiny_checkpoint(directory, config=None, seed=0, edit_params=None):
    """Save a tiny random Mixtral with a character tokenizer; returns (config, params)."""
    config = config or tiny_config()
    params = transformer.init_params(config, seed=seed)
    layers = dict(params["layers"])
    layers["router"] = layers["router"] * ROUTER_SCALE
    params = {**params, "layers": layers}
    if edit_params is not None:
        params = edit_params(params)
    os.makedirs(directory, exist_ok=True)
    loading.save_hf_checkpoint(config, jax.device_get(params), str(directory))
    write_char_tokenizer(str(directory))
    return config, params


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)
