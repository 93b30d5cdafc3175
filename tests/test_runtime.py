"""Offloading runtime tests: exactness against the resident path, LRU slots, donation."""

import jax
import numpy as np
import pytest

from adapmoe_jax.ckpt.expert_store import ExpertStore
from adapmoe_jax.errors import UserInputError
from adapmoe_jax.model import transformer
from adapmoe_jax.policies import replacement
from adapmoe_jax.runtime import engine as engine_lib
from adapmoe_jax import simulate

from model_oracle import greedy_decode, routed_model

PROMPT = [1, 17, 40, 9, 88, 3, 51]
NUM_TOKENS = 12
# Offloaded decoding runs each layer as its own jitted call, and the resident path
# runs one scan. XLA may fuse reductions differently, so logits may differ in the
# last float32 bits. Tokens must be identical.
LOGIT_ATOL = 1e-6


@pytest.fixture(scope="module")
def model():
    config, params = routed_model()
    nonexpert, experts = transformer.split_expert_params(params)
    store = ExpertStore.from_arrays(*(np.asarray(experts[k]) for k in ("w1", "w3", "w2")))
    resident = engine_lib.ResidentEngine(config, params)
    tokens, logits = greedy_decode(resident, PROMPT, NUM_TOKENS)
    return config, params, nonexpert, store, tokens, logits


@pytest.mark.parametrize("cache_size", [0, 8, 32, 64, 256])
def test_offloaded_equals_resident(model, cache_size):
    config, _, nonexpert, store, ref_tokens, ref_logits = model
    assert config.num_experts_total == 256
    engine = engine_lib.build_engine(config, nonexpert, store, cache_size)
    tokens, logits = greedy_decode(engine, PROMPT, NUM_TOKENS)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    if cache_size < 256:
        assert isinstance(engine, engine_lib.OffloadedEngine)
        assert engine.stats.loads.sum() > 0


@pytest.mark.parametrize("prefetch_count", [0, 1, 2])
def test_prefetch_never_changes_tokens(model, prefetch_count):
    config, _, nonexpert, store, ref_tokens, ref_logits = model
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, cache_size=64,
                                        prefetch_count=prefetch_count)
    tokens, logits = greedy_decode(engine, PROMPT, NUM_TOKENS)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    if prefetch_count:
        assert engine.stats.prefetches_issued.sum() > 0
    else:
        assert engine.stats.prefetches_issued.sum() == 0


def test_uneven_allocation_and_staging(model):
    config, _, nonexpert, store, ref_tokens, ref_logits = model
    # Layers with 0 and 1 slots must stage the experts that do not fit.
    slots = [0, 1, 8, 2] * 8
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, slots_per_layer=slots)
    tokens, logits = greedy_decode(engine, PROMPT, NUM_TOKENS)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    # A layer with all 8 experts cached loads each at most once.
    assert engine.stats.loads[2] <= 8


def test_gated_offloaded_equals_gated_resident(model):
    config, params, nonexpert, store, _, _ = model
    gate = engine_lib.GateSettings(thresholds=(0.45,) * config.num_hidden_layers,
                                   gate_prefill=True)
    resident = engine_lib.ResidentEngine(config, params, gate)
    ref_tokens, ref_logits = greedy_decode(resident, PROMPT, NUM_TOKENS)
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, cache_size=32, gate=gate)
    tokens, logits = greedy_decode(engine, PROMPT, NUM_TOKENS)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    summary = engine.stats.summary()
    assert summary["single_expert_ratio"] > 0
    assert summary["experts_per_token"] < 2


def test_gated_step_does_not_load_dropped_expert(model):
    config, _, nonexpert, store, _, _ = model
    # A threshold above 0.5 always leaves one expert with k = 2.
    gate = engine_lib.GateSettings(thresholds=(0.6,) * config.num_hidden_layers,
                                   gate_prefill=True)
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, cache_size=0, gate=gate,
                                        prefetch_count=0)
    logits = engine.start(PROMPT, 32)
    prompt_loads = engine.stats.loads.sum()
    prompt_uses = engine.stats.expert_uses.sum()
    for _ in range(4):
        logits = engine.step(int(np.argmax(logits)))
    # With no cache and no prefetch, every expert a decode step uses is one load.
    decode_loads = engine.stats.loads.sum() - prompt_loads
    decode_uses = engine.stats.expert_uses.sum() - prompt_uses
    assert decode_loads == decode_uses
    assert engine.stats.summary()["experts_per_token"] == 1.0


def test_cache_buffers_are_updated_in_place(model):
    config, _, nonexpert, store, _, _ = model
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, cache_size=64,
                                        prefetch_count=1)
    engine.start(PROMPT, 32)
    pointers = [cache.slots_CP.unsafe_buffer_pointer() for cache in engine.caches]
    for token in (5, 6, 7, 8):
        engine.step(token)
    assert engine.stats.loads.sum() > 0
    after = [cache.slots_CP.unsafe_buffer_pointer() for cache in engine.caches]
    assert after == pointers


def test_device_expert_bytes_scale_with_cache(model):
    config, _, nonexpert, store, _, _ = model
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, cache_size=64)
    assert engine.device_expert_bytes() == 64 * store.expert_nbytes


@pytest.mark.parametrize("prefetch_count", [0, 1])
def test_runtime_loads_equal_simulator_on_trace(model, prefetch_count):
    config, _, nonexpert, store, _, _ = model
    engine = engine_lib.OffloadedEngine(config, nonexpert, store, cache_size=48,
                                        prefetch_count=prefetch_count)
    engine.trace = engine_lib.TraceRecorder()
    # A one-token prompt is served like a decode step, so every step is traced.
    greedy_decode(engine, [1], 20)
    trace = engine.trace.to_trace()
    assert trace.experts.shape == (21, config.num_hidden_layers, 2)
    result = simulate.simulate_lru(trace, engine.slots_per_layer, config.num_local_experts,
                                   prefetch_count=prefetch_count)
    assert result.on_demand_loads == engine.stats.loads.sum()
    assert result.prefetch_copies == engine.stats.prefetches_issued.sum()
    assert result.prefetch_hits == engine.stats.prefetches_used.sum()


def test_negative_cache_size_is_rejected(model):
    config, _, nonexpert, store, _, _ = model
    with pytest.raises(UserInputError, match="0 to 256"):
        engine_lib.build_engine(config, nonexpert, store, -1)


def test_cache_size_above_total_is_resident(model):
    config, _, nonexpert, store, _, _ = model
    engine = engine_lib.build_engine(config, nonexpert, store, 10_000)
    assert isinstance(engine, engine_lib.ResidentEngine)
