"""Model tests: expert mixtures against a naive oracle, cached decoding, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapmoe_jax.config import tiny_config
from adapmoe_jax.model import layers, transformer
from adapmoe_jax.policies import gating

from model_oracle import naive_moe


def _random_experts(seed, num_experts=4, width=8, hidden=12):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    w1 = jax.random.normal(keys[0], (num_experts, width, hidden)) * 0.3
    w3 = jax.random.normal(keys[1], (num_experts, width, hidden)) * 0.3
    w2 = jax.random.normal(keys[2], (num_experts, hidden, width)) * 0.3
    x = jax.random.normal(keys[3], (5, width))
    return x, w1, w3, w2


@pytest.mark.parametrize("moe", ["dense", "gathered", "flat"])
def test_moe_matches_naive_oracle(moe):
    x, w1, w3, w2 = _random_experts(0)
    logits = jax.random.normal(jax.random.PRNGKey(9), (5, 4)) * 3
    weights, experts = gating.route(logits, 2)
    if moe == "dense":
        out = layers.moe_dense(x, weights, experts, w1, w3, w2)
    elif moe == "gathered":
        out = layers.moe_gathered(x, weights, experts, w1, w3, w2)
    else:
        out = layers.moe_from_flat(x, weights, experts, layers.flatten_experts(w1, w3, w2))
    expected = naive_moe(x, np.asarray(weights), np.asarray(experts), w1, w3, w2)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


def test_moe_dense_ignores_gated_off_expert():
    x, w1, w3, w2 = _random_experts(1)
    weights = jnp.array([[1.0, 0.0]] * 5)
    experts = jnp.array([[0, 3]] * 5, jnp.int32)
    out = layers.moe_dense(x, weights, experts, w1, w3, w2)
    only_first = layers.moe_dense(x, weights, jnp.array([[0, 1]] * 5, jnp.int32), w1, w3, w2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(only_first))


def test_flatten_round_trip():
    _, w1, w3, w2 = _random_experts(2)
    flat = layers.flatten_experts(w1, w3, w2)
    assert flat.shape == (4, 3 * 8 * 12)
    for got, want in zip(layers.unflatten_experts(flat, 8, 12), (w1, w3, w2)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_attention_mask_sliding_window():
    mask = np.asarray(layers.attention_mask(jnp.arange(5), jnp.arange(5), 3))
    # Query 4 attends to keys 2, 3, 4: a window of three including itself.
    np.testing.assert_array_equal(mask[4], [False, False, True, True, True])
    np.testing.assert_array_equal(mask[1], [True, True, False, False, False])


def test_gqa_head_grouping():
    # Two KV heads, four query heads: heads 0 and 1 read KV head 0, 2 and 3 read KV head 1.
    q = jnp.ones((1, 1, 4, 2))
    k = jnp.ones((1, 3, 2, 2))
    v = jnp.stack([jnp.zeros((1, 3, 2)), jnp.ones((1, 3, 2))], axis=2)
    out = np.asarray(layers.grouped_query_attention(q, k, v, jnp.ones((1, 3), bool)))
    np.testing.assert_array_equal(out[0, 0, :, 0], [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("window", [None, 4])
def test_cached_decode_equals_full_forward(window):
    config = tiny_config(sliding_window=window)
    params = transformer.init_params(config, seed=1)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 20), 0, config.vocab_size)
    full, _, _ = transformer.forward(params, config, tokens)

    cache = transformer.KVCache.init(config, 1, 32)
    logits, cache, _ = transformer.forward(params, config, tokens[:, :8], cache, 0)
    pieces = [logits]
    for pos in range(8, 20):
        logits, cache, _ = transformer.forward(params, config, tokens[:, pos:pos + 1], cache,
                                               pos, moe_impl="gather")
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=1e-5)


def test_forward_same_with_and_without_jit():
    config = tiny_config()
    params = transformer.init_params(config, seed=2)
    tokens = jnp.arange(9)[None] % config.vocab_size
    jitted = jax.jit(lambda p, t: transformer.forward(p, config, t)[0])(params, tokens)
    with jax.disable_jit():
        eager = transformer.forward(params, config, tokens)[0]
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_forward_gated_budget_zero_is_stock():
    config = tiny_config()
    params = transformer.init_params(config, seed=4)
    tokens = jnp.arange(7)[None]
    stock, _, routing = transformer.forward(params, config, tokens)
    gated, _, gated_routing = transformer.forward(
        params, config, tokens, gate_fn=gating.gate_weights,
        thresholds_L=jnp.zeros((config.num_hidden_layers,)))
    np.testing.assert_array_equal(np.asarray(stock), np.asarray(gated))
    np.testing.assert_array_equal(np.asarray(routing.weights), np.asarray(gated_routing.weights))


def test_split_and_merge_expert_params():
    config = tiny_config()
    params = transformer.init_params(config)
    nonexpert, experts = transformer.split_expert_params(params)
    assert set(experts) == {"w1", "w3", "w2"}
    assert "w1" not in nonexpert["layers"]
    merged = transformer.merge_expert_params(nonexpert, experts)
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_param_counts_match_initialised_params():
    config = tiny_config()
    params = transformer.init_params(config)
    counts = transformer.param_counts(config)
    _, experts = transformer.split_expert_params(params)
    assert counts["experts"] == sum(x.size for x in jax.tree.leaves(experts))
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(params))
