"""The map from Hugging Face Mixtral tensor names to this package's parameter layout.

Two HF layouts exist for the expert weights:

* `per_expert`: every published Mixtral checkpoint, and what transformers 5.25
  `save_pretrained` writes (it converts its fused modules back on save). Per layer L
  and expert E: `model.layers.L.block_sparse_moe.experts.E.w1.weight` [F, D] (gate),
  `.w3.weight` [F, D] (up), `.w2.weight` [D, F] (down), and the router
  `model.layers.L.block_sparse_moe.gate.weight` [E, D].
* `fused`: the in-memory layout of transformers 5 (`MixtralExperts` in
  transformers 5.25 `models/mixtral/modeling_mixtral.py`), found in a raw
  `state_dict` dump. Per layer: `model.layers.L.mlp.experts.gate_up_proj`
  [E, 2F, D], gate rows first then up rows (`conversion_mapping.py` concatenates w1
  then w3 on dim 1), `model.layers.L.mlp.experts.down_proj` [E, D, F], and the router
  `model.layers.L.mlp.gate.weight` [E, D].

HF stores linear weights as [out, in]; this package stores them as [in, out] (see
WORKSPACE.md), so every projection is transposed on the way in.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from adapmoe_jax.ckpt import expert_store
from adapmoe_jax.ckpt.safetensors_io import SafetensorsCheckpoint
from adapmoe_jax.config import MixtralConfig
from adapmoe_jax.errors import UserInputError

PER_EXPERT = "per_expert"
FUSED = "fused"

_LAYER_PREFIX = "model.layers.{layer}."
_MOE_MODULE = {PER_EXPERT: "block_sparse_moe", FUSED: "mlp"}

# Buffers some old checkpoints saved; they are recomputed, never loaded.
_IGNORED_NAME = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and the parameter it becomes.

    Attributes:
      key: our parameter key, "/"-separated ("embed", "layers/q_proj").
      hf_name: the HF name. Per-layer names omit the "model.layers.{layer}." prefix,
        per-expert names contain "{expert}", and "{moe}" is the layout's MoE module
        ("block_sparse_moe" or "mlp").
      hf_dims: the HF shape as dimension letters from `dimension_sizes`.
      transpose: whether our array is the HF array with its last two axes swapped.
    """

    key: str
    hf_name: str
    hf_dims: tuple[str, ...]
    transpose: bool


_GLOBAL_SPECS = (
    TensorSpec("embed", "model.embed_tokens.weight", ("V", "D"), False),
    TensorSpec("final_norm", "model.norm.weight", ("D",), False),
    TensorSpec("lm_head", "lm_head.weight", ("V", "D"), True),
)

_LAYER_SPECS = (
    TensorSpec("layers/input_norm", "input_layernorm.weight", ("D",), False),
    TensorSpec("layers/post_attention_norm", "post_attention_layernorm.weight",
               ("D",), False),
    TensorSpec("layers/q_proj", "self_attn.q_proj.weight", ("NH", "D"), True),
    TensorSpec("layers/k_proj", "self_attn.k_proj.weight", ("GH", "D"), True),
    TensorSpec("layers/v_proj", "self_attn.v_proj.weight", ("GH", "D"), True),
    TensorSpec("layers/o_proj", "self_attn.o_proj.weight", ("D", "NH"), True),
    TensorSpec("layers/router", "{moe}.gate.weight", ("E", "D"), True),
)

_PER_EXPERT_SPECS = (
    TensorSpec("layers/w1", "block_sparse_moe.experts.{expert}.w1.weight", ("F", "D"), True),
    TensorSpec("layers/w3", "block_sparse_moe.experts.{expert}.w3.weight", ("F", "D"), True),
    TensorSpec("layers/w2", "block_sparse_moe.experts.{expert}.w2.weight", ("D", "F"), True),
)

_FUSED_SPECS = (
    TensorSpec("layers/w1+w3", "mlp.experts.gate_up_proj", ("E", "2F", "D"), True),
    TensorSpec("layers/w2", "mlp.experts.down_proj", ("E", "D", "F"), True),
)


@dataclasses.dataclass(frozen=True)
class Target:
    """The destination of one concrete HF tensor.

    `layer` is None for global tensors, and `expert` is None except for per-expert
    tensors. `spec.key` names our parameter, and "layers/w1+w3" is the fused
    gate_up_proj.
    """

    spec: TensorSpec
    layer: int | None
    expert: int | None

    @property
    def is_expert(self) -> bool:
        return self.spec.key.startswith(("layers/w1", "layers/w3", "layers/w2"))


def dimension_sizes(config: MixtralConfig) -> dict[str, int]:
    """Map each dimension letter used in `TensorSpec.hf_dims` to its size."""
    return {
        "V": config.vocab_size,
        "D": config.hidden_size,
        "F": config.intermediate_size,
        "2F": 2 * config.intermediate_size,
        "E": config.num_local_experts,
        "NH": config.num_attention_heads * config.head_dim,
        "GH": config.num_key_value_heads * config.head_dim,
    }


def detect_layout(names: list[str], source: str) -> str:
    """Return PER_EXPERT or FUSED from the tensor names of a checkpoint at `source`."""
    has_fused = any(".mlp.experts.gate_up_proj" in name for name in names)
    has_per_expert = any(".block_sparse_moe.experts." in name for name in names)
    if has_fused and has_per_expert:
        raise UserInputError(
            f"checkpoint {source} mixes per-expert (block_sparse_moe.experts.E.w1) and "
            "fused (mlp.experts.gate_up_proj) expert tensors; use one layout")
    if has_fused:
        return FUSED
    if has_per_expert:
        return PER_EXPERT
    raise UserInputError(
        f"no Mixtral expert tensors in checkpoint {source}: expected "
        "model.layers.L.block_sparse_moe.experts.E.w1.weight or "
        "model.layers.L.mlp.experts.gate_up_proj")


def tensor_targets(config: MixtralConfig, layout: str) -> dict[str, Target]:
    """Return {HF name: Target} for every tensor a checkpoint of `layout` must have.

    `lm_head.weight` is left out when the config ties the embeddings.
    """
    targets = {}
    for spec in _GLOBAL_SPECS:
        if spec.key == "lm_head" and config.tie_word_embeddings:
            continue
        targets[spec.hf_name] = Target(spec, None, None)

    moe = _MOE_MODULE[layout]
    expert_specs = _PER_EXPERT_SPECS if layout == PER_EXPERT else _FUSED_SPECS
    for layer in range(config.num_hidden_layers):
        prefix = _LAYER_PREFIX.format(layer=layer)
        for spec in _LAYER_SPECS:
            targets[prefix + spec.hf_name.format(moe=moe)] = Target(spec, layer, None)
        for spec in expert_specs:
            if "{expert}" not in spec.hf_name:
                targets[prefix + spec.hf_name] = Target(spec, layer, None)
                continue
            for expert in range(config.num_local_experts):
                name = prefix + spec.hf_name.format(expert=expert)
                targets[name] = Target(spec, layer, expert)
    return targets


def hf_shape(config: MixtralConfig, spec: TensorSpec) -> tuple[int, ...]:
    sizes = dimension_sizes(config)
    return tuple(sizes[letter] for letter in spec.hf_dims)


def check_tensors(config: MixtralConfig, layout: str,
                  shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise UserInputError unless `shapes` has exactly the expected tensors and shapes.

    `shapes` maps each HF name in the checkpoint to its shape. Extra tensors are
    rejected, except `lm_head.weight` in a tied checkpoint and rotary `inv_freq`
    buffers, which are ignored.
    """
    targets = tensor_targets(config, layout)
    for name, target in targets.items():
        if name not in shapes:
            raise UserInputError(
                f"tensor {name} missing from checkpoint {source}; the checkpoint is "
                "incomplete or does not match its config.json")
        expected = hf_shape(config, target.spec)
        if tuple(shapes[name]) != expected:
            raise UserInputError(
                f"tensor {name} in {source} has shape {list(shapes[name])}, expected "
                f"{list(expected)} from config.json; check that config.json belongs "
                "to this checkpoint")
    for name in shapes:
        if name in targets or _is_ignored(name, config):
            continue
        raise UserInputError(
            f"unexpected tensor {name} in checkpoint {source}; adapmoe_jax does not "
            "implement it, so this is not a plain Mixtral checkpoint")


def _is_ignored(name: str, config: MixtralConfig) -> bool:
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    return bool(_IGNORED_NAME.match(name))


def nonexpert_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Return {our key: our shape} for the non-expert params (see WORKSPACE.md)."""
    shapes = {}
    for spec in _GLOBAL_SPECS:
        if spec.key == "lm_head" and config.tie_word_embeddings:
            continue
        shapes[spec.key] = _our_shape(hf_shape(config, spec), spec.transpose)
    for spec in _LAYER_SPECS:
        shape = _our_shape(hf_shape(config, spec), spec.transpose)
        shapes[spec.key] = (config.num_hidden_layers, *shape)
    return shapes


def _our_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2]) if transpose else shape


def to_ours(spec: TensorSpec, array_hf: np.ndarray) -> np.ndarray:
    """Return a non-expert HF tensor in our orientation (a view, not a copy)."""
    return np.swapaxes(array_hf, -1, -2) if spec.transpose else array_hf


def expert_pieces(target: Target, array_hf: np.ndarray,
                  config: MixtralConfig) -> Iterator[tuple[int, str, np.ndarray]]:
    """Yield (expert, part, array) for an expert tensor, part "w1", "w3" or "w2".

    Arrays are views in our orientation: w1 and w3 [D, F], w2 [F, D]. A per-expert
    tensor yields one piece, a fused tensor one or two pieces per expert.
    """
    key = target.spec.key
    if target.expert is not None:
        yield target.expert, key.removeprefix("layers/"), array_hf.T
        return
    num_ff = config.intermediate_size
    for expert in range(config.num_local_experts):
        if key == "layers/w1+w3":
            yield expert, "w1", array_hf[expert, :num_ff].T
            yield expert, "w3", array_hf[expert, num_ff:].T
        else:
            yield expert, "w2", array_hf[expert].T


def per_expert_hf_tensors(config: MixtralConfig,
                          params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) in the per-expert layout for full params.

    `params` is the nested dict of WORKSPACE.md with `layers/w1`, `layers/w3` and
    `layers/w2` stacked in. Arrays come back as numpy arrays in HF orientation.
    """
    layers = params["layers"]
    for name, target in tensor_targets(config, PER_EXPERT).items():
        spec = target.spec
        if target.layer is None:
            array = np.asarray(params[spec.key])
        elif target.expert is None:
            array = np.asarray(layers[spec.key.removeprefix("layers/")][target.layer])
        else:
            part = spec.key.removeprefix("layers/")
            array = np.asarray(layers[part][target.layer, target.expert])
        yield name, np.swapaxes(array, -1, -2) if spec.transpose else array


# --- Streaming a checkpoint shard by shard -----------------------------------

@dataclasses.dataclass(frozen=True)
class HfCheckpoint:
    """An opened and validated HF Mixtral checkpoint directory."""

    directory: str
    config: MixtralConfig
    tensors: SafetensorsCheckpoint
    layout: str


@dataclasses.dataclass(frozen=True)
class ShardProgress:
    """Tensor counts of one shard that `read_shards` finished, number `index` of `count`."""

    index: int
    count: int
    shard_name: str
    expert_tensors: int
    other_tensors: int


# Receives (layer, expert, part, array) with part "w1", "w3" or "w2".
ExpertSink = Callable[[int, int, str, np.ndarray], None]


def open_checkpoint(directory: str, dtype: str | None = None) -> HfCheckpoint:
    """Read config.json and every shard header, and check names and shapes.

    Only headers are read, so this is fast even for a large checkpoint and fails
    before any output is written. `dtype` overrides the config's dtype, which is
    the dtype the params will be cast to.
    """
    config = MixtralConfig.from_json_file(os.path.join(directory, "config.json"),
                                          dtype=dtype)
    tensors = SafetensorsCheckpoint(directory)
    layout = detect_layout(tensors.names(), directory)
    check_tensors(config, layout, tensors.shapes(), directory)
    return HfCheckpoint(directory, config, tensors, layout)


def read_shards(checkpoint: HfCheckpoint, write_expert: ExpertSink,
                on_shard: Callable[[ShardProgress], None] | None = None) -> dict:
    """Read every shard once, in order, and return the non-expert params.

    Expert pieces go to `write_expert` in our orientation. The non-expert params
    come back as the nested numpy dict of WORKSPACE.md in the config's dtype. Each
    shard is unmapped before the next one is read, so the peak host memory is about
    one shard plus the non-expert params. `on_shard` runs after each shard.
    """
    config = checkpoint.config
    tensors = checkpoint.tensors
    dtype = expert_store.dtype_from_name(config.dtype)
    nonexpert = {key: np.empty(shape, dtype)
                 for key, shape in nonexpert_shapes(config).items()}
    targets = tensor_targets(config, checkpoint.layout)
    shard_names = tensors.shard_names

    for index, shard_name in enumerate(shard_names, start=1):
        expert_count = other_count = 0
        for name in tensors.names_in_shard(shard_name):
            target = targets.get(name)
            if target is None:
                continue
            array_hf = tensors.get(name)
            if target.is_expert:
                for expert, part, piece in expert_pieces(target, array_hf, config):
                    write_expert(target.layer, expert, part, piece)
                expert_count += 1
            else:
                _store_nonexpert(nonexpert, target, array_hf)
                other_count += 1
        tensors.close_shard(shard_name)
        if on_shard is not None:
            on_shard(ShardProgress(index, len(shard_names), shard_name,
                                   expert_count, other_count))
    return nest_params(nonexpert)


def _store_nonexpert(nonexpert: dict[str, np.ndarray], target: Target,
                     array_hf: np.ndarray) -> None:
    """Copy one tensor into its (layer slot of the) preallocated param, casting it."""
    destination = nonexpert[target.spec.key]
    if target.layer is not None:
        destination = destination[target.layer]
    destination[...] = to_ours(target.spec, array_hf)


def nest_params(flat: Mapping[str, object]) -> dict:
    """Turn {"layers/q_proj": x, "embed": y} into {"layers": {"q_proj": x}, "embed": y}."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested
