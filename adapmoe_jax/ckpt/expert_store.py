"""The host expert store: every expert's weights in one [L, E, P] array.

Each expert is one contiguous run of P = 3 * D * F elements, so moving an expert to
the device is a single transfer. Inside the run the weights follow in the order
w1 [D, F] (gate), w3 [D, F] (up), w2 [F, D] (down), each C-ordered, in the
[in, out] orientation of WORKSPACE.md.

On disk a store is two files in one directory:

* `experts.bin`: the raw [L, E, P] array in C order, native little-endian, no header.
* `experts.json`: {"format_version", "dtype", "num_layers", "num_experts",
  "hidden_size", "intermediate_size", "layout"}.

`ExpertStore.open` memory-maps `experts.bin` read-only, so host RAM holds only the
experts that have been read.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from adapmoe_jax.errors import UserInputError

EXPERTS_BIN = "experts.bin"
EXPERTS_JSON = "experts.json"
FORMAT_VERSION = 1
LAYOUT = "[L, E, P] C order; per expert w1[D,F], w3[D,F], w2[F,D]"
# The order of the three weights inside one expert's run of P elements.
EXPERT_PART_NAMES = ("w1", "w3", "w2")

_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def dtype_from_name(name: str) -> np.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise UserInputError(
            f"unsupported expert dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def dtype_to_name(dtype) -> str:
    for name, known in _DTYPES.items():
        if np.dtype(dtype) == known:
            return name
    raise UserInputError(
        f"unsupported expert dtype {np.dtype(dtype)}; use one of {sorted(_DTYPES)}")


def expert_size(hidden_size: int, intermediate_size: int) -> int:
    """P, the number of elements of one expert: 3 * D * F."""
    return 3 * hidden_size * intermediate_size


def unflatten_expert(flat_P, hidden_size: int, intermediate_size: int):
    """Split flat expert buffers into (w1 [..., D, F], w3 [..., D, F], w2 [..., F, D]).

    `flat_P` has shape [..., P] and may be a numpy or a jax array. Only slicing and
    reshapes are used, so the function works under `jax.jit` with static D and F, and
    on numpy arrays returns views.
    """
    num_d, num_f = hidden_size, intermediate_size
    block = num_d * num_f
    lead = flat_P.shape[:-1]
    if flat_P.shape[-1] != 3 * block:
        raise ValueError(
            f"flat expert buffer has {flat_P.shape[-1]} elements per expert, expected "
            f"3 * D * F = {3 * block}")
    w1 = flat_P[..., :block].reshape(*lead, num_d, num_f)
    w3 = flat_P[..., block:2 * block].reshape(*lead, num_d, num_f)
    w2 = flat_P[..., 2 * block:].reshape(*lead, num_f, num_d)
    return w1, w3, w2


class ExpertStore:
    """All expert weights of a model on the host, as one [L, E, P] array.

    The array is either in memory (`from_arrays`) or a read-only memory map of
    `experts.bin` (`open`). Every accessor returns numpy views, never copies.
    """

    def __init__(self, flat_LEP: np.ndarray, hidden_size: int, intermediate_size: int):
        if flat_LEP.ndim != 3 or flat_LEP.shape[2] != expert_size(
                hidden_size, intermediate_size):
            raise ValueError(
                f"expert array has shape {flat_LEP.shape}, expected [L, E, "
                f"{expert_size(hidden_size, intermediate_size)}]")
        self.flat_LEP = flat_LEP
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size

    # --- Construction ------------------------------------------------------

    @classmethod
    def from_arrays(cls, w1_LEDF, w3_LEDF, w2_LEFD) -> "ExpertStore":
        """Build an in-memory store by copying stacked weights into one array."""
        w1_LEDF, w3_LEDF, w2_LEFD = (np.asarray(a) for a in (w1_LEDF, w3_LEDF, w2_LEFD))
        num_layers, num_experts, num_d, num_f = w1_LEDF.shape
        if w3_LEDF.shape != w1_LEDF.shape or w2_LEFD.shape != (
                num_layers, num_experts, num_f, num_d):
            raise ValueError(
                f"expert shapes do not match: w1 {w1_LEDF.shape}, w3 {w3_LEDF.shape}, "
                f"w2 {w2_LEFD.shape}; expected w3 like w1 and w2 [L, E, F, D]")
        flat = np.concatenate(
            [a.reshape(num_layers, num_experts, -1) for a in (w1_LEDF, w3_LEDF, w2_LEFD)],
            axis=2)
        return cls(flat, num_d, num_f)

    @classmethod
    def open(cls, directory: str) -> "ExpertStore":
        """Memory-map the store saved in `directory` (read-only)."""
        meta = read_metadata(directory)
        path = os.path.join(directory, EXPERTS_BIN)
        dtype = dtype_from_name(meta["dtype"])
        shape = (meta["num_layers"], meta["num_experts"],
                 expert_size(meta["hidden_size"], meta["intermediate_size"]))
        expected_bytes = int(np.prod(shape)) * dtype.itemsize
        try:
            actual_bytes = os.path.getsize(path)
        except OSError as e:
            raise UserInputError(
                f"cannot read {path}: {e.strerror}; convert the checkpoint again") from None
        if actual_bytes != expected_bytes:
            raise UserInputError(
                f"{path} has {actual_bytes} bytes, expected {expected_bytes} for "
                f"{list(shape)} {meta['dtype']}; convert the checkpoint again")
        flat = np.memmap(path, dtype=dtype, mode="r", shape=shape)
        return cls(flat, meta["hidden_size"], meta["intermediate_size"])

    def save(self, directory: str) -> None:
        """Write `experts.bin` and `experts.json` into an existing `directory`."""
        with open(os.path.join(directory, EXPERTS_BIN), "wb") as f:
            for layer in range(self.num_layers):
                f.write(np.ascontiguousarray(self.flat_LEP[layer]).reshape(-1).view(np.uint8))
        write_metadata(directory, self.dtype, self.num_layers, self.num_experts,
                       self.hidden_size, self.intermediate_size)

    # --- Sizes -------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.flat_LEP.shape[0]

    @property
    def num_experts(self) -> int:
        return self.flat_LEP.shape[1]

    @property
    def expert_size(self) -> int:
        """P, elements per expert."""
        return self.flat_LEP.shape[2]

    @property
    def dtype(self) -> np.dtype:
        return self.flat_LEP.dtype

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert, the size of one host-to-device transfer."""
        return self.expert_size * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_nbytes

    # --- Access ------------------------------------------------------------

    def expert_flat(self, layer: int, expert: int) -> np.ndarray:
        """Return the contiguous [P] buffer of one expert."""
        return self.flat_LEP[layer, expert]

    def expert(self, layer: int, expert: int):
        """Return (w1 [D, F], w3 [D, F], w2 [F, D]) of one expert."""
        return self.unflatten(self.expert_flat(layer, expert))

    def layer_stacked(self, layer: int):
        """Return (w1 [E, D, F], w3 [E, D, F], w2 [E, F, D]) of one layer."""
        return self.unflatten(self.flat_LEP[layer])

    def all_stacked(self):
        """Return (w1 [L, E, D, F], w3 [L, E, D, F], w2 [L, E, F, D]) of all layers."""
        return self.unflatten(self.flat_LEP)

    def unflatten(self, flat_P):
        """Split [..., P] buffers with this store's D and F, as `unflatten_expert` does."""
        return unflatten_expert(flat_P, self.hidden_size, self.intermediate_size)

    def astype(self, dtype) -> "ExpertStore":
        """Return an in-memory copy cast to `dtype`, or self if it already matches."""
        if np.dtype(dtype) == self.dtype:
            return self
        return ExpertStore(np.asarray(self.flat_LEP).astype(dtype),
                           self.hidden_size, self.intermediate_size)


# --- Metadata and streaming writes ------------------------------------------

def write_metadata(directory: str, dtype, num_layers: int, num_experts: int,
                   hidden_size: int, intermediate_size: int) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype_to_name(dtype),
        "num_layers": num_layers,
        "num_experts": num_experts,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "layout": LAYOUT,
    }
    with open(os.path.join(directory, EXPERTS_JSON), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, EXPERTS_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except OSError as e:
        raise UserInputError(
            f"cannot read {path}: {e.strerror}; pass a directory written by "
            "python -m adapmoe_jax.convert") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(
            f"invalid JSON in {path}: {e}; convert the checkpoint again") from None
    if meta.get("format_version") != FORMAT_VERSION or meta.get("layout") != LAYOUT:
        raise UserInputError(
            f"{path} has format_version {meta.get('format_version')!r} and layout "
            f"{meta.get('layout')!r}; this version reads format_version "
            f"{FORMAT_VERSION}, so convert the checkpoint again")
    for key in ("num_layers", "num_experts", "hidden_size", "intermediate_size"):
        if not isinstance(meta.get(key), int) or meta[key] <= 0:
            raise UserInputError(
                f"invalid {key}={meta.get(key)!r} in {path}; convert the checkpoint again")
    return meta


class ExpertFileWriter:
    """Writes expert weights into `experts.bin` piece by piece, in any order.

    Conversion uses it to stream experts from HF shards without holding them all in
    memory: each piece goes to its final byte offset with `os.pwrite`, which does not
    keep the written pages mapped into this process. `finish` checks that every piece
    was written and then writes `experts.json`.
    """

    def __init__(self, directory: str, num_layers: int, num_experts: int,
                 hidden_size: int, intermediate_size: int, dtype):
        self.directory = directory
        self.shape = (num_layers, num_experts)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.dtype = np.dtype(dtype)
        self._written = np.zeros((num_layers, num_experts, 3), dtype=bool)
        self._fd = os.open(os.path.join(directory, EXPERTS_BIN),
                           os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        total_bytes = (num_layers * num_experts
                       * expert_size(hidden_size, intermediate_size) * self.dtype.itemsize)
        os.ftruncate(self._fd, total_bytes)

    def write(self, layer: int, expert: int, part: str, array: np.ndarray) -> None:
        """Write one piece: w1 or w3 [D, F], or w2 [F, D], cast to the store dtype."""
        num_d, num_f = self.hidden_size, self.intermediate_size
        expected = (num_f, num_d) if part == "w2" else (num_d, num_f)
        if array.shape != expected:
            raise ValueError(f"{part} has shape {array.shape}, expected {expected}")
        index = EXPERT_PART_NAMES.index(part)
        num_experts = self.shape[1]
        element_offset = ((layer * num_experts + expert) * expert_size(num_d, num_f)
                          + index * num_d * num_f)
        data = np.ascontiguousarray(array, dtype=self.dtype).reshape(-1).view(np.uint8)
        offset = element_offset * self.dtype.itemsize
        while data.size:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written
        self._written[layer, expert, index] = True

    def finish(self) -> None:
        """Close `experts.bin` and write `experts.json`, or raise if a piece is missing."""
        self.close()
        missing = np.argwhere(~self._written)
        if missing.size:
            layer, expert, index = missing[0]
            raise ValueError(
                f"expert piece {EXPERT_PART_NAMES[index]} of layer {layer} expert "
                f"{expert} was never written")
        write_metadata(self.directory, self.dtype, *self.shape,
                       self.hidden_size, self.intermediate_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

