"""A Hugging Face safetensors checkpoint on disk, read and written one tensor at a time.

`loratool merge` never holds a whole model: it walks the base checkpoint shard by shard, tensor by tensor,
and writes each output tensor to its output shard as soon as it is merged. Three details keep the peak
memory at about two copies of the largest merged tensor, rather than a shard:

- Reading: `safe_open` checks each shard and gives names, dtypes and shapes. Tensor data is then read
  with plain file reads at the offsets in the shard's header, not through safe_open's memory map: every
  page of a mapped file that is touched stays resident (and counts in the process RSS) until the file is
  closed, so reading a shard through one handle ends up with the whole shard resident, and `get_tensor`
  holds the mapped pages and its own copy at the same time.
- Tensors the merge leaves as they are (norms, often the embeddings and output head — the largest tensors
  of most models) are copied byte for byte in 16 MiB chunks, never becoming tensors at all.
- Writing: a safetensors header lists every tensor's offsets, and all of them are known before any data
  is written (shapes from the base headers, dtypes from the output dtype), so the header goes first and
  each tensor's bytes are appended as they are produced (`ShardWriter`). `safetensors.torch.save_file`
  would need the whole shard in memory.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# safetensors dtype -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip
# The dtype names of `--dtype` and config.json, as safetensors spells them.
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_CHUNK = 16 * 2**20  # bytes per read/write when copying an unchanged tensor


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class Shard:
    path: Path
    tensors: list[TensorInfo]  # in file order
    metadata: dict[str, str]
    data_start: int  # byte where tensor data begins (8 + header length)
    offsets: dict[str, tuple[int, int]]  # name -> (begin, end), relative to data_start


@dataclass(frozen=True)
class Checkpoint:
    """The weights of a model directory: its shards (one for an unsharded checkpoint) and their headers."""

    path: Path
    shards: list[Shard]
    index: dict[str, Any] | None  # model.safetensors.index.json, when sharded

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for shard in self.shards for t in shard.tensors}


def open_checkpoint(model_dir: Path) -> Checkpoint:
    """Read the headers of every safetensors shard of `model_dir` (no tensor data is read)."""
    index_path = model_dir / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        files = list(dict.fromkeys(index["weight_map"].values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise LoratoolError(
                f"{model_dir} is incomplete: {INDEX} lists {len(files)} shard(s) and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing",
                hint="download the checkpoint again (all shards)",
            )
        return Checkpoint(model_dir, [read_shard(model_dir / f) for f in files], index)
    if (model_dir / SINGLE).is_file():
        return Checkpoint(model_dir, [read_shard(model_dir / SINGLE)], None)
    present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    pickles = [n for n in present if n.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        raise LoratoolError(
            f"{model_dir} has weights only in pickle files ({', '.join(pickles[:4])}), which loratool does "
            "not load: unpickling can run arbitrary code",
            hint="convert the checkpoint once to safetensors (load it yourself, then "
            "save_pretrained(dir, safe_serialization=True)) and pass that directory as --base",
        )
    raise LoratoolError(
        f"{model_dir} holds no {SINGLE} or {INDEX} (it has: {', '.join(present) or 'nothing'})",
        hint="pass --base a Hugging Face model directory with safetensors weights",
    )


def read_shard(path: Path) -> Shard:
    """A shard's header: safe_open validates the file and lists its tensors; the byte offsets, which
    safe_open does not expose, come from the header itself (8-byte length, then JSON)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = [
            TensorInfo(name, f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
            for name in f.offset_keys()
        ]
    with path.open("rb") as fh:
        length = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(length))
    offsets = {t.name: tuple(header[t.name]["data_offsets"]) for t in tensors}
    return Shard(path, tensors, metadata, 8 + length, offsets)  # type: ignore[arg-type]


def read_tensor(shard: Shard, info: TensorInfo) -> torch.Tensor:
    """One tensor, read into memory it owns (a single copy; see the module docstring)."""
    import torch

    begin, end = shard.offsets[info.name]
    buffer = bytearray(end - begin)
    with shard.path.open("rb") as fh:
        fh.seek(shard.data_start + begin)
        if fh.readinto(buffer) != len(buffer):
            raise LoratoolError(f"{shard.path} is truncated (reading {info.name})", hint="download it again")
    dtype = getattr(torch, DTYPES[info.dtype][0])
    if not buffer:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)  # shares the buffer: no second copy


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[safetensors_dtype][0])


class ShardWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time, in order.

    The header (names, dtypes, shapes, byte offsets) is written first; `write` appends each tensor's
    bytes and checks it is the one expected next, with the promised dtype and shape.
    """

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header so data starts 8-byte aligned
        self.path = path
        self.expected = list(tensors)
        self.written = 0
        self.data_bytes = offset
        self._file: BinaryIO = path.open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        self._check(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            self._file.write(flat.view(torch.uint8).numpy().data)

    def copy(self, source: Shard, info: TensorInfo) -> None:
        """Append a tensor unchanged, straight from the base shard's bytes."""
        self._check(info.name, DTYPES[info.dtype][0], info.shape)
        begin, end = source.offsets[info.name]
        with source.path.open("rb") as fh:
            fh.seek(source.data_start + begin)
            remaining = end - begin
            while remaining:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise LoratoolError(
                        f"{source.path} is truncated (reading {info.name})", hint="download it again"
                    )
                self._file.write(chunk)
                remaining -= len(chunk)

    def _check(self, name: str, torch_dtype_name: str, shape: tuple[int, ...]) -> None:
        want = self.expected[self.written]
        if name != want.name or shape != want.shape or torch_dtype_name != DTYPES[want.dtype][0]:
            raise RuntimeError(  # a loratool bug, not a user error
                f"{self.path.name}: expected {want}, got {name} {torch_dtype_name} {shape}"
            )
        self.written += 1

    def close(self) -> None:
        self._file.close()
        if self.written != len(self.expected):
            raise RuntimeError(f"{self.path.name}: {self.written} of {len(self.expected)} tensors written")


def shard_bytes(tensors: list[TensorInfo]) -> int:
    return sum(t.nbytes for t in tensors)


CONFIG = "config.json"


def read_config(model_dir: Path) -> dict[str, Any]:
    """The model's config.json, as a dict; a LoratoolError naming the file when it is missing, unreadable
    or not a JSON object. Whether a directory is a model at all is asked with `(dir / CONFIG).is_file()`."""
    path = model_dir / CONFIG
    if not path.is_file():
        raise LoratoolError(
            f"{model_dir} has no {CONFIG}: it is not a Hugging Face model directory",
            hint=f"pass a model directory ({CONFIG} + *.safetensors)",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LoratoolError(f"cannot read {path}: {exc}", hint="check the file's permissions") from None
    except json.JSONDecodeError as exc:
        raise LoratoolError(
            f"{path} is not valid JSON ({exc})", hint="restore the file (download the model again)"
        ) from None
    if not isinstance(config, dict):
        raise LoratoolError(
            f"{path} is not a JSON object", hint="restore the file (download the model again)"
        )
    return config


def checkpoint_dtype(model_dir: Path, checkpoint: Checkpoint) -> str:
    """The base's own dtype: config.json's `dtype` (`torch_dtype` before transformers 5), else the dtype
    most of its floating-point tensors are stored in."""
    config = read_config(model_dir)
    named = config.get("dtype") or config.get("torch_dtype")
    if named in SAFETENSORS_DTYPE:
        return named
    counts: dict[str, int] = {}
    for shard in checkpoint.shards:
        for t in shard.tensors:
            if t.dtype in FLOAT_DTYPES:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
    stored = max(counts, key=lambda k: counts[k], default="F32")
    return {v: k for k, v in SAFETENSORS_DTYPE.items()}[stored]
