"""Tests for model profiles: the shipped files, validation and round trips."""

import json
import os

import numpy as np
import pytest

from adapmoe_jax import profiles
from adapmoe_jax.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SOURCE = "AdapMoE reference implementation (PKU-SEC-Lab/AdapMoE, ICCAD 2024)"


def small_profile_dict(**changes):
    data = {"num_layers": 2, "num_experts": 4, "top_k": 2,
            "layer_sensitivity": [2.0, 0.5], "gate_budget": 0.005,
            "single_expert_ratio": [0.1, 0.4], "prefetch_accuracy": [0.0, 0.8],
            "source": "test", "notes": ""}
    data.update(changes)
    return data


def write_profile(tmp_path, data):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_shipped_mixtral_8x7b_profile():
    profile = profiles.load_profile(os.path.join(CONFIGS, "mixtral-8x7b.json"))
    assert (profile.num_layers, profile.num_experts, profile.top_k) == (32, 8, 2)
    assert profile.layer_sensitivity[0] == 46.69189453125
    assert profile.prefetch_accuracy[0] == 0.0
    assert len(profile.single_expert_ratio) == 32
    assert profile.gate_budget == 0.005
    assert SOURCE in profile.source


def test_shipped_mixtral_8x22b_profile():
    profile = profiles.load_profile(os.path.join(CONFIGS, "mixtral-8x22b.json"))
    assert (profile.num_layers, profile.num_experts, profile.top_k) == (56, 8, 2)
    assert profile.layer_sensitivity[0] == 61.74471229314804
    assert profile.single_expert_ratio is None
    assert profile.prefetch_accuracy is None
    assert SOURCE in profile.source


def test_gate_thresholds_from_profile():
    profile = profiles.profile_from_dict(small_profile_dict())
    np.testing.assert_allclose(profile.gate_thresholds(), [0.05, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(profile.gate_thresholds(0.0), [0.0, 0.0])


def test_profile_round_trip(tmp_path):
    profile = profiles.profile_from_dict(small_profile_dict())
    path = str(tmp_path / "out" / "profile.json")
    profiles.save_profile(profile, path)
    assert profiles.load_profile(path) == profile
    assert os.listdir(tmp_path / "out") == ["profile.json"]


def test_profile_optional_fields_default():
    data = small_profile_dict()
    for key in ("gate_budget", "single_expert_ratio", "prefetch_accuracy", "source", "notes"):
        del data[key]
    profile = profiles.profile_from_dict(data)
    assert profile.gate_budget == 0.005
    assert profile.single_expert_ratio is None


@pytest.mark.parametrize("changes, match", [
    ({"layer_sensitivity": [1.0]}, "layer_sensitivity: it has 1 values but num_layers is 2"),
    ({"layer_sensitivity": [1.0, -0.5]}, r"layer_sensitivity\[1\]=-0.5"),
    ({"layer_sensitivity": [1.0, float("nan")]}, r"layer_sensitivity\[1\]=nan"),
    ({"layer_sensitivity": [1.0, "big"]}, r"layer_sensitivity\[1\]='big'"),
    ({"single_expert_ratio": [0.1, 1.5]}, r"single_expert_ratio\[1\]=1.5"),
    ({"prefetch_accuracy": [0.1, 0.2, 0.3]}, "prefetch_accuracy: it has 3 values"),
    ({"prefetch_accuracy": 0.5}, "prefetch_accuracy: expected a list"),
    ({"gate_budget": -0.1}, "gate_budget=-0.1"),
    ({"num_layers": 0}, "num_layers=0"),
    ({"top_k": 5}, "top_k=5"),
    ({"temperature": 1.0}, "unknown field 'temperature'"),
])
def test_bad_profile_raises_naming_field_and_file(tmp_path, changes, match):
    path = write_profile(tmp_path, small_profile_dict(**changes))
    with pytest.raises(UserInputError, match=match) as info:
        profiles.load_profile(path)
    assert path in str(info.value)


def test_profile_missing_field_raises(tmp_path):
    data = small_profile_dict()
    del data["layer_sensitivity"]
    with pytest.raises(UserInputError, match="missing field 'layer_sensitivity'"):
        profiles.load_profile(write_profile(tmp_path, data))


def test_profile_invalid_json_raises(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    with pytest.raises(UserInputError, match="invalid JSON"):
        profiles.load_profile(str(path))


def test_profile_not_found_raises(tmp_path):
    with pytest.raises(UserInputError, match="profile not found"):
        profiles.load_profile(str(tmp_path / "absent.json"))


def test_check_matches():
    profile = profiles.profile_from_dict(small_profile_dict())
    profiles.check_matches(profile, num_layers=2, num_experts=4)
    with pytest.raises(UserInputError, match="2 layers and 4 experts, the model has 3 layers"):
        profiles.check_matches(profile, num_layers=3, num_experts=4)
    with pytest.raises(UserInputError, match="the model has 2 layers and 8 experts"):
        profiles.check_matches(profile, num_layers=2, num_experts=8)
