"""Tests for Mixtral routing, the adaptive gate and its thresholds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import gating

HAND_LOGITS = [[2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]


def maybe_jit(fn, use_jit, static_argnums=()):
    return jax.jit(fn, static_argnums=static_argnums) if use_jit else fn


def bits(array):
    return np.asarray(array, dtype=np.float32).view(np.uint32)


@pytest.fixture(autouse=True)
def strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.mark.parametrize("use_jit", [False, True])
def test_route_hand_worked_logits(use_jit):
    route = maybe_jit(gating.route, use_jit, static_argnums=1)
    weights, experts = route(jnp.array(HAND_LOGITS), 2)
    assert experts.dtype == jnp.int32
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(experts, [[0, 1]])
    np.testing.assert_allclose(weights, [[0.731059, 0.268941]], atol=1e-6)


@pytest.mark.parametrize("use_jit", [False, True])
def test_route_ties_go_to_lower_index(use_jit):
    route = maybe_jit(gating.route, use_jit, static_argnums=1)
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0],
                        [0.0, 1.0, 1.0, 1.0],
                        [3.0, 0.0, 3.0, 0.0]])
    weights, experts = route(logits, 2)
    np.testing.assert_array_equal(experts, [[0, 1], [1, 2], [0, 2]])
    np.testing.assert_allclose(weights, np.full((3, 2), 0.5))


def test_route_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 8)).astype(np.float32)
    weights, experts = gating.route(jnp.asarray(logits), 2)

    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    expected_experts = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    top = np.take_along_axis(probs, expected_experts, axis=-1)
    np.testing.assert_array_equal(experts, expected_experts)
    np.testing.assert_allclose(weights, top / top.sum(axis=-1, keepdims=True), rtol=1e-6)


def test_route_softmax_in_float32_for_bfloat16():
    logits = jnp.array(HAND_LOGITS, dtype=jnp.bfloat16)
    weights, experts = gating.route(logits, 2)
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(experts, [[0, 1]])


@pytest.mark.parametrize("use_jit", [False, True])
def test_gate_threshold_drops_second_expert(use_jit):
    weights, _ = gating.route(jnp.array(HAND_LOGITS), 2)
    gate = maybe_jit(gating.adaptive_gate, use_jit)
    gated, active = gate(weights, 0.3)
    np.testing.assert_array_equal(active, [[True, False]])
    np.testing.assert_array_equal(gated, [[1.0, 0.0]])


@pytest.mark.parametrize("use_jit", [False, True])
def test_gate_low_threshold_keeps_both(use_jit):
    weights, _ = gating.route(jnp.array(HAND_LOGITS), 2)
    gate = maybe_jit(gating.adaptive_gate, use_jit)
    gated, active = gate(weights, 0.25)
    np.testing.assert_array_equal(active, [[True, True]])
    np.testing.assert_array_equal(bits(gated), bits(weights))


def test_gate_weight_equal_to_threshold_is_kept():
    weights = jnp.array([[0.75, 0.25]], dtype=jnp.float32)
    _, active_at = gating.adaptive_gate(weights, 0.25)
    above = float(np.nextafter(np.float32(0.25), np.float32(1.0)))
    gated_above, active_above = gating.adaptive_gate(weights, above)
    np.testing.assert_array_equal(active_at, [[True, True]])
    np.testing.assert_array_equal(active_above, [[True, False]])
    np.testing.assert_array_equal(gated_above, [[1.0, 0.0]])


def test_gate_k3_drops_only_low_weights():
    weights = jnp.array([[0.5, 0.3, 0.2],
                         [0.5, 0.25, 0.25],
                         [0.4, 0.35, 0.25]], dtype=jnp.float32)
    gated, active = gating.adaptive_gate(weights, 0.25)
    np.testing.assert_array_equal(active, [[True, True, False],
                                           [True, True, True],
                                           [True, True, True]])
    np.testing.assert_allclose(gated[0], [0.625, 0.375, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(bits(gated[1:]), bits(weights[1:]))


def test_gate_k3_high_threshold_leaves_first_only():
    weights = jnp.array([[0.5, 0.3, 0.2], [0.34, 0.33, 0.33]], dtype=jnp.float32)
    gated, active = gating.adaptive_gate(weights, 0.35)
    np.testing.assert_array_equal(active, [[True, False, False]] * 2)
    np.testing.assert_array_equal(gated, [[1.0, 0.0, 0.0]] * 2)


def test_gate_k3_routed_weights_sum_to_one():
    rng = np.random.default_rng(1)
    weights, _ = gating.route(jnp.asarray(rng.normal(size=(128, 8)), jnp.float32), 3)
    gated, active = gating.adaptive_gate(weights, 0.2)
    np.testing.assert_allclose(jnp.sum(gated, axis=-1), 1.0, rtol=1e-6)
    assert bool(jnp.all(active[:, 0]))
    np.testing.assert_array_equal(gated == 0, ~np.asarray(active))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_zero_threshold_is_bit_identical(use_jit, k):
    rng = np.random.default_rng(k)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(256, 8)), jnp.float32)
    weights, _ = gating.route(logits, k)
    gate = maybe_jit(gating.adaptive_gate, use_jit)
    gated, active = gate(weights, 0.0)
    assert bool(jnp.all(active))
    np.testing.assert_array_equal(bits(gated), bits(weights))


def test_gate_threshold_above_half_leaves_one_expert():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
    logits = logits.at[0].set(0.0)  # a row whose two weights are both 0.5
    weights, _ = gating.route(logits, 2)
    for threshold in (0.500001, 0.7, 1.0):
        gated, active = gating.adaptive_gate(weights, threshold)
        np.testing.assert_array_equal(np.sum(active, axis=-1), 1)
        np.testing.assert_array_equal(gated[:, 0], 1.0)


def test_gate_threshold_half_keeps_only_exact_ties():
    weights = jnp.array([[0.5, 0.5], [0.6, 0.4]], dtype=jnp.float32)
    _, active = gating.adaptive_gate(weights, 0.5)
    np.testing.assert_array_equal(active, [[True, True], [True, False]])


def test_gate_traced_threshold_under_jit():
    weights, _ = gating.route(jnp.array(HAND_LOGITS * 2), 2)
    gate_layers = jax.jit(jax.vmap(gating.adaptive_gate, in_axes=(None, 0)))
    gated, active = gate_layers(weights, jnp.array([0.25, 0.3], jnp.float32))
    np.testing.assert_array_equal(active[0], [[True, True]] * 2)
    np.testing.assert_array_equal(active[1], [[True, False]] * 2)
    np.testing.assert_array_equal(gated[1], [[1.0, 0.0]] * 2)


def test_gate_weights_matches_gate_fn_form():
    weights, experts = gating.route(jnp.array(HAND_LOGITS), 2)
    gated = gating.gate_weights(weights, experts, 0.3)
    np.testing.assert_array_equal(gated, [[1.0, 0.0]])


def test_drop_inactive_marks_dropped_ids():
    experts = jnp.array([[3, 5], [1, 0]], jnp.int32)
    active = jnp.array([[True, False], [True, True]])
    np.testing.assert_array_equal(gating.drop_inactive(experts, active), [[3, -1], [1, 0]])


def test_thresholds_from_sensitivity_values():
    thresholds = gating.thresholds_from_sensitivity([4.0, 1.0, 0.01], 0.01)
    assert thresholds.dtype == np.float32
    np.testing.assert_allclose(thresholds, [0.05, 0.1, 1.0], rtol=1e-6)


def test_thresholds_zero_budget_gives_zeros():
    np.testing.assert_array_equal(gating.thresholds_from_sensitivity([3.0, 0.5], 0.0), [0, 0])


@pytest.mark.parametrize("budget", [-0.001, float("nan"), float("inf")])
def test_thresholds_reject_bad_budget(budget):
    with pytest.raises(UserInputError, match="gate budget"):
        gating.thresholds_from_sensitivity([1.0], budget)


@pytest.mark.parametrize("sensitivity", [0.0, -2.0, float("nan")])
def test_thresholds_reject_bad_sensitivity(sensitivity):
    with pytest.raises(UserInputError, match=f"layer 1"):
        gating.thresholds_from_sensitivity([1.0, sensitivity], 0.005)
