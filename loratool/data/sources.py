"""Reading rows, each with the place it came from (`file:line`), from local files or a hub dataset.

A row that cannot be parsed (a bad JSON line, a JSON value that is not an object) does not stop the
read: it comes out as a Row with `error` set, so that the caller decides between failing with its
location and skipping it (`data.on_bad_row`).

`datasets` is imported only for hub sources, inside the function that needs it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import DataSource

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")

# "org/name" or "name": letters, digits, - _ . only, at most one slash, and no file-like extension.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")


@dataclass(frozen=True)
class Row:
    """One record of a source: its fields, or, for a row that could not be parsed, why not."""

    data: dict[str, Any] | None
    location: str  # data/train.jsonl:12, data/train.json[7], org/name[train][12]
    error: str | None = None


def read_rows(source: DataSource) -> Iterator[Row]:
    """Every row of a source, in file order, at most `source.max_rows` of them (bad rows included)."""
    return open_source(source)[0]


def open_source(source: DataSource) -> tuple[Iterator[Row], dict[str, Any]]:
    """The rows of a source and its fingerprint: sha256 of the local bytes (a directory: of all its
    files, in sorted order), or the hub id, subset, split and the `datasets` fingerprint."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        files = _directory_files(path, source.path)
        fingerprint = {"path": str(path.resolve()), "files": len(files), "sha256": _sha256(files, names=True)}
        rows = _read_directory(files, source.path)
    elif path.is_file():
        fingerprint = {"path": str(path.resolve()), "sha256": _sha256([path])}
        rows = _read_file(path, source.path)
    elif looks_like_hub_id(source.path):
        dataset = load_hub_dataset(source)
        fingerprint = {
            "hub": source.path,
            "subset": source.subset,
            "split": source.split,
            "datasets_fingerprint": getattr(dataset, "_fingerprint", None),
        }
        rows = _hub_rows(dataset, source)
    else:
        raise _missing_path_error(source.path)
    return (islice(rows, source.max_rows) if source.max_rows else rows), fingerprint


def looks_like_hub_id(path: str) -> bool:
    """`org/name` or `name`: no path prefix (./ ../ / ~), no backslash, no file extension."""
    if path.startswith(("./", "../", "/", "~", ".")) or "\\" in path:
        return False
    return bool(_HUB_ID.match(path)) and not _FILE_EXTENSION.search(path)


# ---------------------------------------------------------------------------------------------------------
# Local files: one small reader per format.
# ---------------------------------------------------------------------------------------------------------


def _read_file(path: Path, shown: str) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, shown)
    if suffix == ".json":
        return _read_json(path, shown)
    if suffix == ".csv":
        return _read_csv(path, shown)
    if suffix == ".parquet":
        return _read_parquet(path, shown)
    if suffix == ".txt":
        return _read_txt(path, shown)
    raise LoratoolError(
        f"data source {shown}: unsupported file type '{suffix or path.name}'",
        hint=f"use one of {', '.join(SUPPORTED_SUFFIXES)} (or a directory of them, or a hub dataset id)",
    )


def _read_directory(files: list[Path], shown: str) -> Iterator[Row]:
    for file in files:
        yield from _read_file(file, f"{shown.rstrip('/')}/{file.name}")


def _directory_files(path: Path, shown: str) -> list[Path]:
    """Supported files directly inside a directory, sorted by name; hidden files are left out."""
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        present = sorted(p.name for p in path.iterdir())
        raise LoratoolError(
            f"data source {shown}: the directory holds no {', '.join(SUPPORTED_SUFFIXES)} files",
            hint=f"it contains: {', '.join(present[:12])}" if present else "the directory is empty",
        )
    return files


def _read_text(path: Path, shown: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark written by Excel
    except UnicodeDecodeError as exc:
        raise LoratoolError(
            f"data source {shown}: not UTF-8 text (byte {exc.start}: {exc.reason})",
            hint="re-save the file as UTF-8",
        ) from None


def _object_row(value: Any, location: str) -> Row:
    if isinstance(value, dict):
        return Row(value, location)
    return Row(None, location, f"expected a JSON object {{...}}, got a {_json_type(value)}")


def _json_lines(text: str, shown: str) -> Iterator[Row]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows
        location = f"{shown}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row(None, location, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        yield _object_row(value, location)


def _read_jsonl(path: Path, shown: str) -> Iterator[Row]:
    yield from _json_lines(_read_text(path, shown), shown)


def _read_json(path: Path, shown: str) -> Iterator[Row]:
    """A JSON array of objects; or an object holding one list of them; or JSON Lines saved as .json."""
    text = _read_text(path, shown)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):
            # Several objects one per line: JSON Lines under a .json name. Each line is reported on its own.
            yield from _json_lines(text, shown)
            return
        raise LoratoolError(
            f"{shown}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
            hint="the file is one JSON document, so no row can be read until this is fixed "
            "(JSON Lines files, one object per line, can skip bad lines with data.on_bad_row: skip)",
        ) from None
    if isinstance(value, dict):
        lists = [(key, item) for key, item in value.items() if isinstance(item, list)]
        if len(lists) == 1:
            key, items = lists[0]
            for index, item in enumerate(items):
                yield _object_row(item, f"{shown}[{key}][{index}]")
            return
        yield Row(value, f"{shown}:1")  # a single object: one row
        return
    if not isinstance(value, list):
        raise LoratoolError(
            f"{shown}: expected a JSON array of objects, got a {_json_type(value)}",
            hint='write the rows as [{"instruction": ..., "output": ...}, ...] or as JSON Lines (.jsonl)',
        )
    for index, item in enumerate(value):
        yield _object_row(item, f"{shown}[{index}]")


def _read_csv(path: Path, shown: str) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        for number, record in enumerate(reader, start=1):
            location = f"{shown}:row {number}"
            if None in record:  # DictReader files cells beyond the header under the key None
                yield Row(None, location, "the row has more cells than the header has columns")
                continue
            yield Row(dict(record), location)


def _read_parquet(path: Path, shown: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise LoratoolError(
            f"{shown}: not a readable parquet file: {exc}", hint="re-export the file"
        ) from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield Row(record, f"{shown}[row {number}]")


def _read_txt(path: Path, shown: str) -> Iterator[Row]:
    """One document per block of lines; blocks are separated by blank lines."""
    block: list[str] = []
    start = 0
    for number, line in enumerate(_read_text(path, shown).splitlines(), start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield Row({"text": "\n".join(block)}, f"{shown}:{start}")
            block = []
    if block:
        yield Row({"text": "\n".join(block)}, f"{shown}:{start}")


# ---------------------------------------------------------------------------------------------------------
# Hub datasets
# ---------------------------------------------------------------------------------------------------------


def _hub_rows(dataset: Any, source: DataSource) -> Iterator[Row]:
    prefix = f"{source.path}{f'[{source.subset}]' if source.subset else ''}[{source.split}]"
    for index, record in enumerate(dataset):
        yield Row(dict(record), f"{prefix}[{index}]")


def load_hub_dataset(source: DataSource) -> Any:
    """`datasets.load_dataset(path, name=subset, split=split)`, with any failure as a LoratoolError."""
    import datasets

    try:
        return datasets.load_dataset(source.path, name=source.subset, split=source.split)
    except Exception as exc:  # offline, unknown id, gated, bad subset/split: all mean "not loadable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(reason) > 200:
            reason = reason[:197] + "..."
        raise LoratoolError(
            f"data source '{source.path}' is not a local file or directory, and loading it from the hub "
            f"failed: {reason}",
            hint=f"no file or directory exists at {Path(source.path).resolve()}; on a machine without "
            "network a hub dataset must be in the Hugging Face cache and HF_HUB_OFFLINE=1 set (else point "
            "data paths at local files); a gated dataset needs `hf auth login` and its terms accepted",
        ) from None


def _missing_path_error(shown: str) -> LoratoolError:
    resolved = Path(shown).expanduser().resolve()
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent == resolved.parent:
        near = sorted(
            p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith(".")
        )
        listing = ", ".join(near[:12]) + (f", ... ({len(near)} in all)" if len(near) > 12 else "")
        hint = f"{parent} contains: {listing}" if near else f"{parent} is empty"
    else:
        hint = f"{resolved.parent} does not exist either (the nearest existing directory is {parent})"
    return LoratoolError(
        f"data source not found: {resolved}",
        hint=hint
        + " (a relative data path is looked up next to the recipe file, then in the working directory)",
    )


def _sha256(files: list[Path], names: bool = False) -> str:
    digest = hashlib.sha256()
    for file in files:
        if names:
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(4 * 2**20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _json_type(value: Any) -> str:
    names = {list: "list", dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
