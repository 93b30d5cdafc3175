"""Logits parity with transformers' MixtralForCausalLM on tiny checkpoints.

The fixtures under tests/fixtures/ were saved by transformers (see
scripts/make_reference_fixtures.py, versions in each versions.json), so these
tests need no torch. When torch and transformers are installed, the same
comparisons also run live on a freshly initialised model.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapmoe_jax.ckpt.loading import load_params
from adapmoe_jax.model import transformer

from model_oracle import tolerance

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ["gqa4", "window", "head_dim", "bf16"]


@functools.partial(jax.jit, static_argnums=(1, 5))
def _forward(params, config, tokens, cache, start_pos, moe_impl):
    return transformer.forward(params, config, tokens, cache, start_pos, moe_impl=moe_impl)


def _greedy_with_cache(params, config, prompt, num_steps):
    """Prefill, then decode greedily with the KV cache; returns (tokens, logits [steps, V])."""
    cache = transformer.KVCache.init(config, 1, len(prompt) + num_steps)
    logits, cache, _ = _forward(params, config, jnp.asarray(prompt)[None], cache, 0, "dense")
    last = np.asarray(logits[0, -1])
    tokens, all_logits = [], []
    for step in range(num_steps):
        all_logits.append(last)
        tokens.append(int(np.argmax(last)))
        logits, cache, _ = _forward(params, config, jnp.asarray([[tokens[-1]]]), cache,
                                    len(prompt) + step, "gather")
        last = np.asarray(logits[0, -1])
    return tokens, np.stack(all_logits)


def check_against_reference(directory, reference):
    config, params = load_params(directory)
    atol = tolerance(config.dtype)
    prompt = reference["prompt_ids"]

    prefill, _, _ = transformer.forward(params, config, jnp.asarray(prompt)[None])
    np.testing.assert_allclose(np.asarray(prefill[0]), reference["prefill_logits"], atol=atol)

    num_steps = len(reference["greedy_ids"])
    tokens, decode_logits = _greedy_with_cache(params, config, prompt, num_steps)
    np.testing.assert_allclose(decode_logits, reference["decode_logits"], atol=atol)
    if config.dtype == "float32":
        # bfloat16 rounding may flip a near tie, so only float32 must agree token for token.
        assert tokens == reference["greedy_ids"].tolist()

    full_ids = np.concatenate([prompt, reference["greedy_ids"][:-1]])
    full, _, _ = transformer.forward(params, config, jnp.asarray(full_ids)[None])
    np.testing.assert_allclose(np.asarray(full[0]), reference["full_logits"], atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_fixture(name):
    directory = os.path.join(FIXTURES, name)
    check_against_reference(directory, np.load(os.path.join(directory, "reference.npz")))


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_live(name, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib.util
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts",
                          "make_reference_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_reference_fixtures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FIXTURE_DIR = str(tmp_path)
    module.build_fixture(name, module.CONFIGS[name])
    directory = tmp_path / name
    check_against_reference(str(directory), np.load(directory / "reference.npz"))
    del sys
