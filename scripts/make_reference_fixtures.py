"""Build the transformers reference fixtures that the parity tests compare against.

For each tiny configuration this saves a randomly initialised
`MixtralForCausalLM` with `save_pretrained` (safetensors) under
`tests/fixtures/<name>/`, and beside it `reference.npz` with:
  prompt_ids [T]            the prompt
  prefill_logits [T, V]     logits of one forward pass over the prompt
  greedy_ids [32]           32 greedy tokens decoded with the KV cache
  decode_logits [32, V]     the logits that chose each greedy token
  full_logits [T + 31, V]   one forward pass over prompt + greedy tokens[:-1]

Needs the `reference` extra (torch, transformers). Run from the repository root:
  python scripts/make_reference_fixtures.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
NUM_DECODE_STEPS = 32
PROMPT_LEN = 12

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
             num_experts_per_tok=2, max_position_embeddings=64, rope_theta=10000.0,
             sliding_window=None, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)

CONFIGS = {
    # Four query heads per KV head, as in Mixtral-8x7B (32 / 8).
    "gqa4": dict(_BASE, num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6),
    # A window shorter than the prompt, so the mask differs from plain causal.
    "window": dict(_BASE, sliding_window=5),
    # head_dim set apart from hidden_size / num_attention_heads.
    "head_dim": dict(_BASE, head_dim=12, num_local_experts=8),
    # bfloat16 weights and activations.
    "bf16": dict(_BASE, dtype="bfloat16"),
}


def build_fixture(name: str, overrides: dict) -> None:
    import torch
    import transformers

    torch.manual_seed(sum(map(ord, name)))
    fields = dict(overrides)
    dtype_name = fields.pop("dtype", "float32")
    config = transformers.MixtralConfig(**fields)
    model = transformers.MixtralForCausalLM(config).eval()
    # Default init leaves routing near uniform; larger router weights make
    # top-k choices clear-cut so the test exercises distinct experts.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    torch_dtype = getattr(torch, dtype_name)
    model = model.to(torch_dtype)

    out_dir = os.path.join(FIXTURE_DIR, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    generator = np.random.default_rng(sum(map(ord, name)))
    prompt = generator.integers(3, config.vocab_size, size=PROMPT_LEN)
    prompt_t = torch.tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        prefill = model(prompt_t).logits[0].float().numpy()
        generated = model.generate(
            prompt_t, max_new_tokens=NUM_DECODE_STEPS, min_new_tokens=NUM_DECODE_STEPS,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0)
        greedy = generated.sequences[0, PROMPT_LEN:].numpy()
        decode_logits = torch.stack(generated.logits, 0)[:, 0].float().numpy()
        full_ids = torch.tensor(np.concatenate([prompt, greedy[:-1]])[None])
        full = model(full_ids).logits[0].float().numpy()

    np.savez_compressed(
        os.path.join(out_dir, "reference.npz"), prompt_ids=prompt.astype(np.int32),
        prefill_logits=prefill, greedy_ids=greedy.astype(np.int32),
        decode_logits=decode_logits, full_logits=full)
    with open(os.path.join(out_dir, "versions.json"), "w", encoding="utf-8") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)
        f.write("\n")
    print(f"wrote {out_dir}")


def main() -> int:
    names = sys.argv[1:] or list(CONFIGS)
    for name in names:
        build_fixture(name, CONFIGS[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
