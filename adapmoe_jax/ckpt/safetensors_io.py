"""Read and write safetensors files with numpy, bfloat16 included, without torch.

The safetensors numpy API has no bfloat16, so this module parses the format itself.
A file is an 8-byte little-endian header length n, then n bytes of JSON mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, then the data. The
offsets are in bytes, relative to the first byte after the header. Tensors are
C-ordered and little-endian. An optional "__metadata__" entry maps strings to strings.

Reading is lazy: each file is memory-mapped, and `get` returns a read-only view, so
only the pages a caller touches are read from disk.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from adapmoe_jax.errors import UserInputError

INDEX_FILENAME = "model.safetensors.index.json"

_HEADER_LENGTH_BYTES = 8
# A header larger than this is a corrupt length field, not a real header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class TensorInfo:
    """The header entry of one tensor: dtype, shape and byte range in the data section."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...],
                 begin: int, end: int):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


class SafetensorsFile:
    """One safetensors file, memory-mapped for lazy per-tensor reads.

    The header is parsed and checked against the file size when the file is opened,
    so a truncated file raises UserInputError here and not on first access.
    """

    def __init__(self, path: str):
        self.path = path
        self.metadata, self._infos, data_start = _read_header(path)
        self._data_start = data_start
        self._buffer: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise UserInputError(
                f"tensor {name} not found in {self.path}; the file is incomplete or "
                "belongs to another checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def get(self, name: str) -> np.ndarray:
        """Return tensor `name` as a read-only array view of the mapped file."""
        info = self.info(name)
        if self._buffer is None:
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + info.begin
        raw = self._buffer[start:self._data_start + info.end]
        return np.asarray(raw).view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Drop the memory map. Views returned by `get` keep the mapping alive until freed."""
        self._buffer = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read_header(path: str) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
    """Parse and validate the header, and return (metadata, infos, data start offset)."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(_HEADER_LENGTH_BYTES)
            if len(prefix) < _HEADER_LENGTH_BYTES:
                raise _truncated(path, f"it has only {file_size} bytes")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > min(_MAX_HEADER_BYTES, file_size - _HEADER_LENGTH_BYTES):
                raise _truncated(
                    path, f"its header length {header_length} exceeds the file size "
                    f"{file_size}")
            header_bytes = f.read(header_length)
    except OSError as e:
        raise UserInputError(
            f"cannot read {path}: {e.strerror}; check that the file exists and is "
            "readable") from None

    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(
            f"invalid safetensors header in {path}: {e}; download the file again") from None
    if not isinstance(header, dict):
        raise UserInputError(
            f"invalid safetensors header in {path}: not a JSON object; download the "
            "file again")

    metadata = header.pop("__metadata__", None) or {}
    data_start = _HEADER_LENGTH_BYTES + header_length
    data_size = file_size - data_start
    infos = {name: _parse_entry(path, name, entry, data_size)
             for name, entry in header.items()}
    return metadata, infos, data_start


def _parse_entry(path: str, name: str, entry, data_size: int) -> TensorInfo:
    """Validate one header entry against the size of the data section."""
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UserInputError(
            f"invalid safetensors header entry for {name} in {path}: {entry!r}; "
            "download the file again") from None
    expected_bytes = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != expected_bytes:
        raise UserInputError(
            f"invalid data_offsets {[begin, end]} for {name} in {path}: a "
            f"{list(shape)} {entry['dtype']} tensor has {expected_bytes} bytes; "
            "download the file again")
    if end > data_size:
        raise _truncated(
            path, f"tensor {name} ends at data byte {end} but the file has only "
            f"{data_size} data bytes")
    return TensorInfo(name, dtype, shape, begin, end)


def _truncated(path: str, detail: str) -> UserInputError:
    return UserInputError(
        f"truncated safetensors file {path}: {detail}; download the file again")


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: one `model.safetensors` or shards.

    A sharded checkpoint is read through `model.safetensors.index.json`, whose
    "weight_map" maps each tensor name to its shard's file name. Without an index the
    directory must contain exactly one `*.safetensors` file. Opening checks that every
    shard exists and that every tensor the index names is in its shard.
    A shard is memory-mapped on its first `get` and unmapped by `close_shard` or
    `close`.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.weight_map = _read_weight_map(directory)
        self._files: dict[str, SafetensorsFile] = {}
        self._check_shards()

    @property
    def shard_names(self) -> list[str]:
        """The shard file names, sorted."""
        return sorted(set(self.weight_map.values()))

    def names(self) -> list[str]:
        return list(self.weight_map)

    def names_in_shard(self, shard_name: str) -> list[str]:
        return [name for name, shard in self.weight_map.items() if shard == shard_name]

    def shard(self, shard_name: str) -> SafetensorsFile:
        """Return the opened shard file, opening it on first use."""
        if shard_name not in self._files:
            self._files[shard_name] = SafetensorsFile(
                os.path.join(self.directory, shard_name))
        return self._files[shard_name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shard(self._shard_of(name)).shape(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return every tensor's shape, read from the headers only."""
        return {name: self.shape(name) for name in self.weight_map}

    def get(self, name: str) -> np.ndarray:
        return self.shard(self._shard_of(name)).get(name)

    def close_shard(self, shard_name: str) -> None:
        """Unmap a shard, so that its pages no longer count in this process's RSS."""
        shard = self._files.pop(shard_name, None)
        if shard is not None:
            shard.close()

    def close(self) -> None:
        for shard_name in list(self._files):
            self.close_shard(shard_name)

    def _shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise UserInputError(
                f"tensor {name} not found in checkpoint {self.directory}; check that "
                "it is a complete Mixtral checkpoint") from None

    def _check_shards(self) -> None:
        for shard_name in self.shard_names:
            path = os.path.join(self.directory, shard_name)
            if not os.path.isfile(path):
                raise UserInputError(
                    f"missing shard {path}, named in {INDEX_FILENAME}; download it "
                    "into the checkpoint directory")
        for shard_name in self.shard_names:
            shard = self.shard(shard_name)
            for name in self.names_in_shard(shard_name):
                if name not in shard:
                    raise UserInputError(
                        f"tensor {name} not found in {shard.path}, though "
                        f"{INDEX_FILENAME} maps it there; download the shard again")


def _read_weight_map(directory: str) -> dict[str, str]:
    """Return {tensor name: shard file name} from the index or the single file."""
    try:
        entries = os.listdir(directory)
    except OSError as e:
        raise UserInputError(
            f"cannot read checkpoint directory {directory}: {e.strerror}; pass an "
            "existing, readable directory") from None

    if INDEX_FILENAME in entries:
        return _read_index(os.path.join(directory, INDEX_FILENAME))

    files = sorted(e for e in entries if e.endswith(".safetensors"))
    if len(files) != 1:
        found = f"{len(files)} .safetensors files" if files else "no .safetensors file"
        raise UserInputError(
            f"{found} and no {INDEX_FILENAME} in {directory}; pass a directory with "
            "one model.safetensors or an index with its shards")
    shard = SafetensorsFile(os.path.join(directory, files[0]))
    return {name: files[0] for name in shard.keys()}


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"invalid JSON in {path}: {e}; download it again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise UserInputError(
            f"invalid {path}: expected a \"weight_map\" object mapping tensor names to "
            "shard file names; download it again")
    for shard_name in set(weight_map.values()):
        if os.path.basename(shard_name) != shard_name:
            raise UserInputError(
                f"invalid shard name {shard_name!r} in {path}: shards must be plain "
                "file names in the checkpoint directory")
    return weight_map


# --- Writing -----------------------------------------------------------------

def dtype_name(dtype: np.dtype) -> str:
    """Return the safetensors dtype name ("BF16", "F32", ...) of a numpy dtype."""
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise UserInputError(
            f"dtype {np.dtype(dtype)} has no safetensors equivalent; cast the tensor "
            "to float32 or bfloat16") from None


def save_file(path: str, tensors: Mapping[str, np.ndarray],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to a safetensors file at `path`, in name order.

    Arrays may be any array type numpy can convert, jax arrays included; bfloat16
    arrays keep their dtype. The header is padded with spaces to a multiple of 8 bytes
    so that every tensor's data starts 8-byte aligned, as the safetensors library does.
    """
    arrays = {name: np.asarray(tensors[name]) for name in sorted(tensors)}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in arrays.items():
        header[name] = {"dtype": dtype_name(array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes

    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in arrays.values():
            f.write(_as_bytes(array))


def _as_bytes(array: np.ndarray) -> np.ndarray:
    """Return the array's data as a flat little-endian uint8 array."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8)


def write_index(directory: str, weight_map: Mapping[str, str],
                total_size: int) -> None:
    """Write `model.safetensors.index.json` for shards already in `directory`."""
    index = {"metadata": {"total_size": int(total_size)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILENAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")

