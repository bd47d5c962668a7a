"""A local `.gguf` file as the base model: dequantized once into a plain Hugging Face checkpoint, cached.

Training, merging and evaluation all want a directory of safetensors weights (LoRA trains on float
weights, merge streams them, PEFT loads on them). transformers can read a GGUF file (`gguf_file=`) and
dequantizes every tensor, but a model loaded that way refuses `save_pretrained`. So the first run that
names a .gguf base converts it: load it through transformers, copy the weights into a fresh model built
from the same config, save model + tokenizer as a normal checkpoint, and every later run (and `merge`,
`eval`, `generate`, through `loratool.model.load`) reads that checkpoint.

    $LORATOOL_CACHE (else $XDG_CACHE_HOME/loratool, else ~/.cache/loratool)
      gguf/<first 16 hex of the file's sha256>/   config.json, model.safetensors, tokenizer files,
                                                  generation_config.json, gguf_source.json (written last)
      gguf/hashes/<key>.json                      a file's sha256, reused while its size and mtime hold

Keyed by content, not name: a renamed or copied file reuses the conversion, a re-downloaded different
file does not. The conversion is built in a hidden temporary directory and renamed into place, under a
file lock, so an interrupted run never leaves a directory that looks complete and concurrent runs do the
work once.

Saved dtype: the GGUF file does not say what precision the model was trained in, and a dequantized
4-bit weight (scale * q + min) is exact only in float32. Models up to 2B parameters are saved in float32
(exact; 540 MB for a 135M model); larger ones in bfloat16, which halves the disk and RAM of a 7B model
(14 GB instead of 28 GB) at a rounding error far below the quantization error already in the file.
`model.dtype` still decides the precision training loads it in.

Where the file came from: llama.cpp's converter (gguf-py `metadata.py`) writes the source model's hub page
as general.source.repo_url / general.source.url (older versions: general.source.huggingface.repository),
and general.repo_url / general.url when the converter was told the model's own. `gguf_hub_id` reads those
(run.json's `gguf.hub_id`), so that a shared adapter names a base someone else can download; the name
keys (general.name, general.basename, general.organization) are titles and fragments, not ids, and
general.base_model.N.* names the model this one was fine-tuned from, not the one converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.model.cache import cache_root
from loratool.model.fingerprint import file_sha256
from loratool.progress import Heartbeat

GGUF_MAGIC = b"GGUF"
SOURCE_RECORD = "gguf_source.json"  # written last inside the conversion: its presence means complete
FLOAT32_LIMIT = 2_000_000_000  # parameters; above this the conversion is saved in bfloat16
_DISK_MARGIN = 256 * 2**20  # bytes kept free beyond the estimate (tokenizer, config, file-system slack)
# The keys that may name the hub repository a GGUF file was converted from, the source's own first.
HUB_KEYS = (
    "general.source.repo_url",
    "general.source.url",
    "general.source.huggingface.repository",
    "general.repo_url",
    "general.url",
)
_HUB_REPO = re.compile(r"([A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)")
_HUB_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/" + _HUB_REPO.pattern + "/?")
QUIET_READER = False  # set by the CLI (not under LORATOOL_DEBUG): no tqdm bar from transformers' GGUF reader


@contextmanager
def gguf_reader_progress(what: str, log: Callable[[str], None], every: float = 15.0) -> Iterator[None]:
    """While transformers' GGUF reader dequantizes a file, report through `log` (progress.py's Heartbeat: a
    line with the rate and the time left every 15 s), instead of its tqdm bar, which a log file shows as
    one line at the end, or not at all once the CLI quiets the libraries: a 1B model's conversion took
    20 minutes in silence. Under LORATOOL_DEBUG the library's own bar is left."""
    if not QUIET_READER:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    def reported(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        beat = Heartbeat(what, len(items), every=every, write=log)
        for done, item in enumerate(items):
            beat.tick(done, "tensors")
            yield item

    library_bar = gguf_reader.tqdm
    gguf_reader.tqdm = reported
    try:
        yield
    finally:
        gguf_reader.tqdm = library_bar


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether a base_model names a GGUF file (by its suffix; the magic bytes are checked on use)."""
    return str(name_or_path).lower().endswith(".gguf")


def resolve_base_model(name_or_path: str, log: Callable[[str], None] = print) -> str:
    """The directory to load a base model from: for a `.gguf` file, its cached Hugging Face conversion
    (converted now if it is not cached yet); anything else (directory, hub id) is returned unchanged."""
    if not is_gguf(name_or_path):
        return name_or_path
    return str(converted_checkpoint(Path(name_or_path), log=log))


def gguf_record(gguf_file: str | Path) -> dict[str, Any]:
    """What run.json keeps about a GGUF base: the file, its sha256, its conversion, and the hub id it was
    converted from when its metadata says (None otherwise)."""
    path = check_gguf_file(Path(gguf_file))
    sha = file_sha256_cached(path)
    return {
        "file": str(path),
        "sha256": sha,
        "converted_dir": str(_conversion_dir(sha)),
        "hub_id": gguf_hub_id(path),
    }


def gguf_hub_id(gguf_file: Path) -> str | None:
    """The hub id (org/name) of the model `gguf_file` was converted from, when its metadata names one (see
    the module docstring); a repository of GGUF files is no base PEFT or vLLM can load, so it is skipped."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)  # memory-mapped: only the header is read
    except (ValueError, OSError):
        return None
    for key in HUB_KEYS:
        field = reader.get_field(key)
        value = field.contents() if field is not None else None
        # A URL must be a hub page (not a paper or a git host); only the huggingface.repository key
        # holds a bare org/name.
        pattern = _HUB_REPO if key.endswith(".huggingface.repository") else _HUB_URL
        match = pattern.fullmatch(value.strip()) if isinstance(value, str) else None
        if match and not match.group(1).lower().endswith("gguf"):
            return match.group(1)
    return None


def converted_checkpoint(gguf_file: Path, log: Callable[[str], None] = print) -> Path:
    """The cached conversion of `gguf_file`, made now (once, atomically) when missing."""
    from filelock import FileLock

    path = check_gguf_file(gguf_file)
    sha = file_sha256_cached(path)
    target = _conversion_dir(sha)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two runs started together on the same file: the second waits here and then finds the result.
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):
            return target
        if target.exists():  # not ours to guess about: a conversion dir without its record
            raise LoratoolError(
                f"{target} exists but is not a complete GGUF conversion ({SOURCE_RECORD} missing)",
                hint=f"delete {target}; the next run converts {path.name} again",
            )
        started = time.time()
        log(f"converting {path.name} to a Hugging Face checkpoint (once; cached in {target})")
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            dtype = convert_gguf(path, partial, log)
            _write_json(
                partial / SOURCE_RECORD,
                {
                    "gguf_file": str(path),
                    "sha256": sha,
                    "size": path.stat().st_size,
                    "dtype": dtype,
                    "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.time() - started, 1),
                },
            )
            os.rename(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log(f"converted in {time.time() - started:.0f}s ({dtype})")
    return target


def check_gguf_file(path: Path) -> Path:
    """The resolved path of a readable GGUF file, or a LoratoolError saying what is wrong with it."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise LoratoolError(
            f"base model not found: {path} is not a file",
            hint="set base_model to an existing .gguf file (a local path; loratool does not download GGUF "
            "files), a local model directory, or a hub id",
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise LoratoolError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}",
            hint="check that the download finished and that the file is the .gguf itself (not a wheel, "
            "zip or Git LFS pointer)",
        )
    return path


def file_sha256_cached(path: Path) -> str:
    """sha256 of a file, hashed in chunks; remembered by (path, size, mtime) so that a multi-GB file is
    hashed once, not on every run."""
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_root() / "gguf" / "hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, json.JSONDecodeError):
        pass
    sha = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        _write_json(memo, {**key, "sha256": sha})
    except OSError:  # a read-only cache only costs the re-hash next time
        pass
    return sha


def convert_gguf(gguf_file: Path, out_dir: Path, log: Callable[[str], None] = print) -> str:
    """Dequantize `gguf_file` into `out_dir` as config + safetensors + tokenizer; return the saved dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    parameters = _parameter_count(gguf_file)
    dtype = torch.float32 if parameters <= FLOAT32_LIMIT else torch.bfloat16
    _check_disk_space(out_dir, parameters * dtype.itemsize, gguf_file)
    try:
        # The reader dequantizes every tensor of the file for each of these three.
        with gguf_reader_progress(f"  reading the config and tokenizer of {name}", log):
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with gguf_reader_progress(f"  dequantizing {name}", log):
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise _cannot_dequantize(gguf_file, exc) from None
    # A fresh model from the same config, without the GGUF quantization_config that blocks saving.
    # Built on the meta device and given the loaded tensors, so the weights are never held twice.
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    del loaded
    log(f"  writing the checkpoint: {parameters:,} parameters in {str(dtype).removeprefix('torch.')}")
    model.save_pretrained(out_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)
    return str(dtype).removeprefix("torch.")


def _parameter_count(gguf_file: Path) -> int:
    """Elements in the file's tensors, read from its header (memory-mapped: no weight is loaded)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
    except (ValueError, OSError) as exc:
        raise LoratoolError(
            f"cannot read the GGUF file {gguf_file}: {_first_line(exc)}",
            hint="the file may be truncated or written by a newer GGUF version; download it again, or "
            "upgrade the gguf package",
        ) from None
    return sum(int(t.n_elements) for t in reader.tensors)


def _check_disk_space(out_dir: Path, needed: int, gguf_file: Path) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed + _DISK_MARGIN:
        raise LoratoolError(
            f"not enough disk space to convert {gguf_file.name}: the checkpoint needs about "
            f"{needed / 1e9:.1f} GB and {out_dir.parent} has {free / 1e9:.1f} GB free",
            hint="free some space, or point LORATOOL_CACHE at a disk with more room",
        )


def _cannot_dequantize(gguf_file: Path, exc: Exception) -> LoratoolError:
    message = _first_line(exc)
    if "not supported" in message or isinstance(exc, (KeyError, NotImplementedError)):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return LoratoolError(
            f"transformers cannot dequantize {gguf_file.name}: {message}",
            hint="GGUF architectures transformers reads: "
            + ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))
            + "; for another one, use the original Hugging Face checkpoint as base_model",
        )
    return LoratoolError(
        f"cannot load {gguf_file} through transformers: {message}",
        hint="check that the file is complete; LORATOOL_DEBUG=1 shows the full error",
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().strip("'\"")
    return text.splitlines()[0] if text else type(exc).__name__


def _conversion_dir(sha256: str) -> Path:
    return cache_root() / "gguf" / sha256[:16]


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_RECORD).is_file()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
