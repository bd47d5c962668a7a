"""Reading rows, each with the place it came from (`file:line`), from local files or a hub dataset.

A row that cannot be parsed (a bad JSON line, a JSON value that is not an object, text that is not
UTF-8 or holds a lone UTF-16 surrogate) does not stop the read: it comes out as a Row with `error` set,
so that the caller decides between failing with its location and skipping it (`data.on_bad_row`).

A path is only ever opened when it is a regular file or a directory: anything else (a FIFO, a device, a
symbolic link loop) is named for what it is, and a FIFO is never opened (that blocks until a writer comes).

`datasets` is imported only for hub sources, inside the function that needs it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError
from loratool.model.load import path_kind, shown_path

if TYPE_CHECKING:
    from loratool.recipe import DataSource

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")

# "org/name" or "name": letters, digits, - _ . only, at most one slash, and no file-like extension.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
# A JSON escape of a surrogate code point (\ud800-\udfff): a cheap test before looking inside the values.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    kind = path_kind(path)
    if kind is not None:
        raise not_a_data_file(path, kind)
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


def not_a_data_file(path: Path, kind: str, key: str = "data source") -> LoratoolError:
    """The error for a data path that exists but is `kind` (path_kind): neither a file nor a directory."""
    if "link" in kind:
        hint = f"fix the link (`ls -l {path}` shows where it points) or give the path of the file itself"
    else:
        hint = (
            "give the path of a regular file (or a directory of them): a data file is read twice, once for "
            "its fingerprint and once for its rows, which a pipe or a device cannot give; copy the data into "
            "a .jsonl file first"
        )
    return LoratoolError(f"{key} {shown_path(path)} is {kind}, not a data file or directory", hint=hint)


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


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data  # Excel writes one


def _read_text(path: Path, shown: str) -> str:
    """The whole file as text: for formats that are one document (.json) or whose rows are not lines."""
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise LoratoolError(
            f"{shown}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at column {column}: {exc.reason})",
            hint="re-save the file as UTF-8",
        ) from None


def _lines(data: bytes) -> Iterator[tuple[int, str | None, str | None]]:
    """(number, text, None) for each line, or (number, None, why) for a line that is not UTF-8. Lines end
    at \\n, \\r\\n or \\r only: str.splitlines would also cut at U+2028 and other characters that a JSON
    string may hold as they are."""
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            why = f"invalid text: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}: {exc.reason})"
            yield number, None, why


def _object_row(value: Any, location: str, escapes: bool = True) -> Row:
    """A row from one parsed JSON value; `escapes`: the text held a surrogate escape (\\udXXX), so the
    strings are looked through for a lone one."""
    if not isinstance(value, dict):
        return Row(None, location, f"expected a JSON object {{...}}, got a {_json_type(value)}")
    where = _lone_surrogate(value) if escapes else None
    if where is not None:
        field, char = where
        return Row(
            None,
            location,
            f"invalid text: a lone UTF-16 surrogate (\\u{ord(char):04x}) in {field}, which cannot be "
            "written as UTF-8 (no tokenizer can read it)",
        )
    return Row(value, location)


def _lone_surrogate(value: Any, where: str = "") -> tuple[str, str] | None:
    """(the field, the character) of the first lone surrogate in the strings of a parsed row, or None.
    JSON allows "\\ud800" without its pair; Python reads it into a str that no UTF-8 encoder accepts."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (f"field {where!r}" if where else "the row", found.group()) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and (bad := _SURROGATE.search(key)):
            return f"the key {name!r}", bad.group()
        found = _lone_surrogate(item, name)
        if found is not None:
            return found
    return None


def _json_lines(lines: Iterator[tuple[int, str | None, str | None]], shown: str) -> Iterator[Row]:
    for number, line, error in lines:
        location = f"{shown}:{number}"
        if line is None:
            yield Row(None, location, error)
            continue
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row(None, location, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        yield _object_row(value, location, escapes=bool(_SURROGATE_ESCAPE.search(line)))


def _read_jsonl(path: Path, shown: str) -> Iterator[Row]:
    yield from _json_lines(_lines(_read_bytes(path)), shown)


def _read_json(path: Path, shown: str) -> Iterator[Row]:
    """A JSON array of objects; or an object holding one list of them; or JSON Lines saved as .json."""
    text = _read_text(path, shown)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):
            # Several objects one per line: JSON Lines under a .json name. Each line is reported on its own.
            yield from _json_lines(_lines(text.encode("utf-8")), shown)
            return
        raise LoratoolError(
            f"{shown}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
            hint="the file is one JSON document, so no row can be read until this is fixed "
            "(JSON Lines files, one object per line, can skip bad lines with data.on_bad_row: skip)",
        ) from None
    escapes = bool(_SURROGATE_ESCAPE.search(text))
    if isinstance(value, dict):
        lists = [(key, item) for key, item in value.items() if isinstance(item, list)]
        if len(lists) == 1:
            key, items = lists[0]
            for index, item in enumerate(items):
                yield _object_row(item, f"{shown}[{key}][{index}]", escapes)
            return
        yield _object_row(value, f"{shown}:1", escapes)  # a single object: one row
        return
    if not isinstance(value, list):
        raise LoratoolError(
            f"{shown}: expected a JSON array of objects, got a {_json_type(value)}",
            hint='write the rows as [{"instruction": ..., "output": ...}, ...] or as JSON Lines (.jsonl)',
        )
    for index, item in enumerate(value):
        yield _object_row(item, f"{shown}[{index}]", escapes)


def _read_csv(path: Path, shown: str) -> Iterator[Row]:
    # Bytes that are not UTF-8 come through as lone surrogates (surrogateescape), so that the row holding
    # them is reported, and skipped under data.on_bad_row: skip, like any bad row.
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
    escaped = bool(_SURROGATE.search(text))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for number, record in enumerate(reader, start=1):
        location = f"{shown}:row {number}"
        if None in record:  # DictReader files cells beyond the header under the key None
            yield Row(None, location, "the row has more cells than the header has columns")
            continue
        where = _lone_surrogate(record) if escaped else None
        if where is not None:
            field, char = where
            yield Row(None, location, f"invalid text: not UTF-8 (byte {ord(char) - 0xDC00:#04x} in {field})")
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
        try:
            records: list[Any] = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the rows
            records = [_parquet_row(batch.slice(i, 1)) for i in range(batch.num_rows)]
        for record in records:
            number += 1
            if isinstance(record, UnicodeDecodeError):
                why = f"invalid text: not UTF-8 (byte {record.object[record.start]:#04x} in a string column)"
                yield Row(None, f"{shown}[row {number}]", why)
            else:
                yield Row(record, f"{shown}[row {number}]")


def _parquet_row(one_row: Any) -> dict[str, Any] | UnicodeDecodeError:
    try:
        return one_row.to_pylist()[0]
    except UnicodeDecodeError as exc:
        return exc


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
