"""Model profiles: the per-layer statistics that adaptive gating and cache allocation use.

A profile is a JSON file in `configs/`, one per model:

  {"num_layers": L, "num_experts": E, "top_k": K,
   "layer_sensitivity": [L floats], "gate_budget": 0.005,
   "single_expert_ratio": [L floats] or null, "prefetch_accuracy": [L floats] or null,
   "source": "...", "notes": "..."}

`layer_sensitivity[l]` is S_l of AdapMoE, so layer l's gate threshold is
sqrt(gate_budget / S_l). `prefetch_accuracy[l]` is how often the expert
predicted for layer l from layer l-1 is one that layer l uses (0 for layer 0).
`single_expert_ratio[l]` is the share of decode tokens that use one expert at
layer l under the profile's gate budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

import numpy as np

from adapmoe_jax.errors import UserInputError
from adapmoe_jax.policies import gating

_PER_LAYER_FIELDS = ("layer_sensitivity", "single_expert_ratio", "prefetch_accuracy")
_FRACTION_FIELDS = ("single_expert_ratio", "prefetch_accuracy")


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Per-layer routing statistics of one model.

    Attributes:
      num_layers: L, decoder layers.
      num_experts: E, experts per layer.
      top_k: K, experts per token before gating.
      layer_sensitivity: [L] AdapMoE's S_l, finite and >= 0.
      gate_budget: the loss budget T of the adaptive gate, >= 0.
      single_expert_ratio: [L] fractions in [0, 1] measured at `gate_budget`,
        or None when not measured.
      prefetch_accuracy: [L] fractions in [0, 1], or None when not measured.
      source: where the numbers come from.
      notes: free text on how the numbers were measured.
    """

    num_layers: int
    num_experts: int
    top_k: int
    layer_sensitivity: tuple[float, ...]
    gate_budget: float = 0.005
    single_expert_ratio: tuple[float, ...] | None = None
    prefetch_accuracy: tuple[float, ...] | None = None
    source: str = ""
    notes: str = ""

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(
                    f"invalid profile field {name}={value!r}; use a positive integer")
        if self.top_k > self.num_experts:
            raise UserInputError(
                f"invalid profile field top_k={self.top_k}; it exceeds "
                f"num_experts={self.num_experts}")
        if (not isinstance(self.gate_budget, (int, float)) or isinstance(self.gate_budget, bool)
                or not math.isfinite(self.gate_budget) or self.gate_budget < 0):
            raise UserInputError(
                f"invalid profile field gate_budget={self.gate_budget!r}; use a finite "
                "number >= 0")
        for name in _PER_LAYER_FIELDS:
            values = getattr(self, name)
            if values is not None:
                object.__setattr__(self, name, self._checked_per_layer(name, values))

    def _checked_per_layer(self, name: str, values: Any) -> tuple[float, ...]:
        """Return `values` as a tuple of floats, or raise naming the field."""
        if not isinstance(values, (list, tuple)):
            raise UserInputError(
                f"invalid profile field {name}: expected a list of {self.num_layers} "
                f"numbers, got {type(values).__name__}")
        if len(values) != self.num_layers:
            raise UserInputError(
                f"invalid profile field {name}: it has {len(values)} values but "
                f"num_layers is {self.num_layers}; give one value per layer")
        upper = 1.0 if name in _FRACTION_FIELDS else math.inf
        for layer, value in enumerate(values):
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or not 0 <= value <= upper):
                allowed = "in [0, 1]" if upper == 1.0 else "finite and >= 0"
                raise UserInputError(
                    f"invalid profile field {name}[{layer}]={value!r}; values must be "
                    f"{allowed}")
        return tuple(float(value) for value in values)

    def gate_thresholds(self, budget: float | None = None) -> np.ndarray:
        """Return [L] float32 thresholds sqrt(budget / S_l), by default at the profile's budget."""
        if budget is None:
            budget = self.gate_budget
        return gating.thresholds_from_sensitivity(self.layer_sensitivity, budget)

    def to_json_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        for name in _PER_LAYER_FIELDS:
            if fields[name] is not None:
                fields[name] = list(fields[name])
        return fields


def profile_from_dict(data: Any, origin: str = "profile") -> ModelProfile:
    """Build a profile from its JSON dict; errors name `origin` and the field."""
    if not isinstance(data, dict):
        raise UserInputError(f"invalid profile {origin}: expected a JSON object")
    known = {field.name for field in dataclasses.fields(ModelProfile)}
    for key in data:
        if key not in known:
            raise UserInputError(
                f"invalid profile {origin}: unknown field {key!r}; known fields are "
                f"{sorted(known)}")
    for key in ("num_layers", "num_experts", "top_k", "layer_sensitivity"):
        if key not in data:
            raise UserInputError(f"invalid profile {origin}: missing field {key!r}")
    try:
        return ModelProfile(**data)
    except UserInputError as error:
        raise UserInputError(f"{origin}: {error}") from None


def load_profile(path: str) -> ModelProfile:
    """Read and validate a profile JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserInputError(
            f"profile not found: {path}; pass a profile JSON such as "
            "configs/mixtral-8x7b.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"invalid JSON in profile {path}: {error}") from None
    return profile_from_dict(data, origin=path)


def save_profile(profile: ModelProfile, path: str) -> None:
    """Write the profile as JSON; a reader sees the old file or the new one, never a part."""
    write_json_atomic(profile.to_json_dict(), path)


def write_json_atomic(data: Any, path: str) -> None:
    """Write `data` as indented JSON to a temporary file, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory,
                                     suffix=".tmp", delete=False) as f:
        tmp_path = f.name
        try:
            json.dump(data, f, indent=1)
            f.write("\n")
        except BaseException:
            f.close()
            os.remove(tmp_path)
            raise
    os.replace(tmp_path, path)


def check_matches(profile: ModelProfile, num_layers: int, num_experts: int) -> None:
    """Raise UserInputError unless the profile was made for a model of this shape."""
    if profile.num_layers != num_layers or profile.num_experts != num_experts:
        raise UserInputError(
            f"profile does not match the model: it has {profile.num_layers} layers and "
            f"{profile.num_experts} experts, the model has {num_layers} layers and "
            f"{num_experts} experts; use the profile made for this model or calibrate one")
