"""Train the embedded default model: Mixtral in miniature on the prepared corpus.

Run scripts/prepare_corpus.py first. Training is deterministic under --seed
(each step's batch is drawn from a generator seeded by (seed, step)) and resumes
from the newest orbax checkpoint in --workdir. The same command runs on a GPU
when JAX finds one; the CPU recipe is the reference.

  python scripts/train_default_model.py --corpus_dir=runs/corpus \
      --workdir=runs/train --export_dir=adapmoe_jax/default_model
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from adapmoe_jax import config as config_lib
from adapmoe_jax.model import layers
from adapmoe_jax.model import transformer

SOURCES = ("tinystories", "shakespeare", "kjv")
DOC_SEPARATOR = "\n<|endoftext|>\n"

_CORPUS_DIR = flags.DEFINE_string("corpus_dir", "runs/corpus",
                                  "Output folder of prepare_corpus.py.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/train", "Checkpoints, token cache and logs.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None,
                                  "If set, write the trained model here in HF format.")
_STEPS = flags.DEFINE_integer("steps", 1200, "Optimizer steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay.")
_AUX_LOSS_COEF = flags.DEFINE_float("aux_loss_coef", 0.02,
                                    "Weight of the router load-balancing loss.")
_SOURCE_WEIGHTS = flags.DEFINE_list("source_weights", ["0.5", "0.25", "0.25"],
                                    "Sampling weights of tinystories, shakespeare, kjv.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialisation and batch sampling.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between log lines.")
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", 32768,
                                    "Validation tokens scored per source at the end.")
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False,
                                 "Skip training; export the newest checkpoint.")


def load_tokens(corpus_dir: str, split: str, cache_dir: str) -> dict[str, np.ndarray]:
    """Tokenize each source once: <s> document </s> per document, concatenated."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(corpus_dir, "tokenizer.json"))
    eos_id = tokenizer.token_to_id("</s>")
    os.makedirs(cache_dir, exist_ok=True)
    tokens = {}
    for source in SOURCES:
        cache_path = os.path.join(cache_dir, f"{split}-{source}.npy")
        if os.path.exists(cache_path):
            tokens[source] = np.load(cache_path)
            continue
        with open(os.path.join(corpus_dir, split, f"{source}.txt"), encoding="utf-8") as f:
            docs = f.read().strip().split(DOC_SEPARATOR)
        encoded = tokenizer.encode_batch(docs)
        ids = np.concatenate([np.array(e.ids + [eos_id], np.int32) for e in encoded])
        np.save(cache_path, ids)
        tokens[source] = ids
    return tokens


def sample_batch(tokens: dict[str, np.ndarray], weights: np.ndarray, seed: int, step: int,
                 batch_size: int, seq_len: int) -> np.ndarray:
    """Draw [B, seq_len + 1] windows; a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    sources = rng.choice(len(SOURCES), size=batch_size, p=weights)
    rows = []
    for index in sources:
        ids = tokens[SOURCES[index]]
        start = rng.integers(0, len(ids) - seq_len - 1)
        rows.append(ids[start:start + seq_len + 1])
    return np.stack(rows)


def loss_fn(params, config, tokens_BT, aux_coef):
    logits_BTV, _, routing = transformer.forward(params, config, tokens_BT[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()
    num_experts = config.num_local_experts
    logits_LXE = routing.router_logits.reshape(config.num_hidden_layers, -1, num_experts)
    experts_LXK = routing.experts.reshape(config.num_hidden_layers, -1,
                                          config.num_experts_per_tok)
    aux = jnp.mean(jax.vmap(layers.load_balancing_loss)(logits_LXE, experts_LXK))
    return ce + aux_coef * aux, (ce, aux)


def make_optimizer(steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=_LEARNING_RATE.value, warmup_steps=min(_WARMUP_STEPS.value, steps // 2),
        decay_steps=max(steps, 1), end_value=_LEARNING_RATE.value * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.95, weight_decay=_WEIGHT_DECAY.value))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(config, optimizer, params, opt_state, tokens_BT, aux_coef):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (ce, aux)), grads = grad_fn(params, config, tokens_BT, aux_coef)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "ce": ce, "aux": aux}


@functools.partial(jax.jit, static_argnums=(0,))
def eval_step(config, params, tokens_BT):
    logits_BTV, _, routing = transformer.forward(params, config, tokens_BT[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:])
    return nll, routing.experts


def evaluate(config, params, tokens, seq_len, max_tokens):
    """Return per-source validation perplexity and per-layer expert token shares."""
    report = {}
    counts_LE = np.zeros((config.num_hidden_layers, config.num_local_experts))
    for source in SOURCES:
        ids = tokens[source][:max_tokens + 1]
        usable = (len(ids) - 1) // seq_len * seq_len
        inputs = np.stack([ids[i:i + seq_len + 1] for i in range(0, usable, seq_len)])
        nlls = []
        for row in inputs:
            nll, experts = eval_step(config, params, jnp.asarray(row[None]))
            nlls.append(np.asarray(nll))
            experts = np.asarray(experts).reshape(config.num_hidden_layers, -1)
            for layer in range(config.num_hidden_layers):
                counts_LE[layer] += np.bincount(experts[layer], minlength=config.num_local_experts)
        mean_nll = float(np.mean(np.concatenate(nlls, axis=None)))
        report[source] = {"tokens": int(usable), "nll": mean_nll,
                          "perplexity": float(np.exp(mean_nll))}
    shares = counts_LE / counts_LE.sum(axis=1, keepdims=True)
    report["expert_share_min"] = float(shares.min())
    report["expert_share_max"] = float(shares.max())
    report["expert_share"] = shares.round(4).tolist()
    return report


def export(config, params, export_dir, corpus_dir):
    """Write the model in HF Mixtral format, atomically, keeping an existing NOTICE.md."""
    from adapmoe_jax.ckpt.loading import save_hf_checkpoint

    tmp_dir = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    save_hf_checkpoint(config, jax.device_get(params), tmp_dir)
    shutil.copy(os.path.join(corpus_dir, "tokenizer.json"), tmp_dir)
    with open(os.path.join(tmp_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                   "add_eos_token": False, "model_max_length": config.max_position_embeddings},
                  f, indent=2)
    with open(os.path.join(tmp_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": config.bos_token_id,
                   "eos_token_id": list(config.eos_token_id)[0]}, f, indent=2)
    notice = os.path.join(export_dir, "NOTICE.md")
    if os.path.exists(notice):
        shutil.copy(notice, tmp_dir)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp_dir, export_dir)
    logging.info("exported the model to %s", export_dir)


def main(argv):
    del argv
    config = config_lib.MINI_MIXTRAL
    steps = _STEPS.value
    weights = np.array([float(w) for w in _SOURCE_WEIGHTS.value])
    weights = weights / weights.sum()
    counts = transformer.param_counts(config)
    logging.info("devices %s; parameters: %d experts, %d other", jax.devices(),
                 counts["experts"], counts["other"])

    train_tokens = load_tokens(_CORPUS_DIR.value, "train", os.path.join(_WORKDIR.value, "tokens"))
    logging.info("training tokens per source: %s",
                 {k: len(v) for k, v in train_tokens.items()})

    optimizer = make_optimizer(steps)
    params = transformer.init_params(config, seed=_SEED.value)
    opt_state = optimizer.init(params)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(_WORKDIR.value, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start_step = 0
    if manager.latest_step() is not None:
        start_step = manager.latest_step()
        restored = manager.restore(start_step, args=ocp.args.StandardRestore(
            {"params": params, "opt_state": opt_state}))
        params, opt_state = restored["params"], restored["opt_state"]
        logging.info("resumed from step %d", start_step)

    started = time.time()
    step = start_step
    while step < steps and not _EXPORT_ONLY.value:
        batch = sample_batch(train_tokens, weights, _SEED.value, step, _BATCH_SIZE.value,
                             _SEQ_LEN.value)
        params, opt_state, metrics = train_step(config, optimizer, params, opt_state,
                                                jnp.asarray(batch), _AUX_LOSS_COEF.value)
        step += 1
        if step % _LOG_EVERY.value == 0 or step == steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            elapsed = time.time() - started
            rate = (step - start_step) * _BATCH_SIZE.value * _SEQ_LEN.value / elapsed
            eta_min = (steps - step) * _BATCH_SIZE.value * _SEQ_LEN.value / rate / 60
            logging.info("step %d/%d loss %.4f ce %.4f aux %.4f | %.0f tokens/s, "
                         "%.1f min elapsed, %.1f min left", step, steps, metrics["loss"],
                         metrics["ce"], metrics["aux"], rate, elapsed / 60, eta_min)
        if step % _CHECKPOINT_EVERY.value == 0 or step == steps:
            manager.save(step, args=ocp.args.StandardSave(
                {"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()
    train_minutes = (time.time() - started) / 60

    valid_tokens = load_tokens(_CORPUS_DIR.value, "valid", os.path.join(_WORKDIR.value, "tokens"))
    report = evaluate(config, params, valid_tokens, _SEQ_LEN.value, _EVAL_TOKENS.value)
    report.update(steps=step, train_tokens_seen=step * _BATCH_SIZE.value * _SEQ_LEN.value,
                  wall_minutes_this_run=round(train_minutes, 2), parameters=counts,
                  devices=str(jax.devices()))
    with open(os.path.join(_WORKDIR.value, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    logging.info("validation: %s", {s: round(report[s]["perplexity"], 2) for s in SOURCES})
    logging.info("expert token share per layer: min %.3f, max %.3f",
                 report["expert_share_min"], report["expert_share_max"])
    if _EXPORT_DIR.value:
        export(config, params, _EXPORT_DIR.value, _CORPUS_DIR.value)


if __name__ == "__main__":
    app.run(main)
