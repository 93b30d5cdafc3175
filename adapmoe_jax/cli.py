"""Shared pieces of the command-line tools: error reporting, default model and profile."""

from __future__ import annotations

import importlib.resources
import logging as std_logging
import os
import sys
from typing import Callable, Sequence

from absl import app, flags

from adapmoe_jax.errors import UserInputError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = os.path.join(_PACKAGE_DIR, "default_model")
DEFAULT_PROFILE_NAME = "mini-mixtral.json"


def run(main: Callable[[Sequence[str]], None]) -> None:
    """Run an absl `main`, reporting bad input as one `error:` line and exit status 2."""

    def guarded_main(argv: Sequence[str]) -> None:
        try:
            main(argv)
        except UserInputError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    # JAX logs its search for accelerator plugins at INFO; it is noise for a user.
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    # Parse once here so that a bad or missing flag is one error line with status 2,
    # like other bad input. absl's own report is a FATAL line, usage text and status 1.
    app.define_help_flags()
    try:
        flags.FLAGS(sys.argv)
    except flags.Error as error:
        print(f"error: {error}; run with --help to list the flags", file=sys.stderr)
        sys.exit(2)
    app.run(guarded_main)


def resolve_checkpoint(path: str | None) -> str:
    """Return the checkpoint directory to load: `path`, or the embedded default model."""
    if path:
        if not os.path.isdir(path):
            raise UserInputError(
                f"checkpoint directory not found: {path}; pass --checkpoint=DIR with a "
                "Hugging Face Mixtral directory or the output of adapmoe_jax.convert")
        return path
    if not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        raise UserInputError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall "
            "adapmoe_jax or pass --checkpoint=DIR")
    return DEFAULT_MODEL_DIR


def shipped_profile(name: str) -> str | None:
    """Return the path of a shipped model profile in configs/, or None if it is missing.

    configs/ installs as the namespace package `adapmoe_jax.configs`, whose
    `files()` is a MultiplexedPath; joining a name gives a real file path.
    """
    try:
        installed = importlib.resources.files("adapmoe_jax.configs").joinpath(name)
        if installed.is_file():
            return str(installed)
    except ModuleNotFoundError:
        pass
    in_repository = os.path.join(os.path.dirname(_PACKAGE_DIR), "configs", name)
    return in_repository if os.path.isfile(in_repository) else None


def default_profile_path(checkpoint_dir: str) -> str | None:
    """Return the shipped profile for `checkpoint_dir`, or None when none applies.

    Only the embedded default model has a profile found without --profile.
    """
    if os.path.realpath(checkpoint_dir) == os.path.realpath(DEFAULT_MODEL_DIR):
        return shipped_profile(DEFAULT_PROFILE_NAME)
    return None


def read_text_file(path: str) -> str:
    """Read a UTF-8 text file, raising UserInputError for a missing or non-UTF-8 file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserInputError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise UserInputError(f"--text_file={path} is a directory; pass a text file") from None
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{path} is not UTF-8 text (invalid byte at offset {error.start}); convert it "
            "to UTF-8 first") from None


def resolve_profile(profile_path: str | None, checkpoint_dir: str, config):
    """Load the profile from `profile_path` or the checkpoint's shipped one; None if neither.

    Raises UserInputError when the profile does not match the model's shape.
    """
    from adapmoe_jax import profiles

    path = profile_path or default_profile_path(checkpoint_dir)
    if path is None:
        return None
    profile = profiles.load_profile(path)
    profiles.check_matches(profile, config.num_hidden_layers, config.num_local_experts)
    return profile


def gate_thresholds(adapgate: bool, gate_budget: float | None,
                    naive_threshold: float | None, profile, num_layers: int):
    """Return per-layer gate thresholds as a tuple, or None when gating is off.

    `naive_threshold` applies one threshold to every layer. Otherwise the
    thresholds are sqrt(gate_budget / S_l) from the profile's sensitivities, at
    the profile's own budget when `gate_budget` is None.
    """
    if gate_budget is not None and gate_budget < 0:
        raise UserInputError(f"invalid --gate_budget={gate_budget}; use 0 or more")
    if naive_threshold is not None and naive_threshold < 0:
        raise UserInputError(f"invalid --naive_threshold={naive_threshold}; use 0 or more")
    if not adapgate:
        return None
    if naive_threshold is not None:
        return (float(naive_threshold),) * num_layers
    if profile is None:
        raise UserInputError(
            "--adapgate needs layer sensitivities and no profile was found; make one with "
            "`python -m adapmoe_jax.calibrate --checkpoint=DIR --text_file=FILE "
            "--output=PROFILE.json` and pass --profile=PROFILE.json, or pass "
            "--naive_threshold=X")
    return tuple(float(t) for t in profile.gate_thresholds(gate_budget))
