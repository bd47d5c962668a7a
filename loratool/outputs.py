"""Writing an output directory so that it never looks complete before it is: merge, combine and export.

Each writes into `<output>.partial-XXXX` beside the output, then renames it into place as the last step.
A result that fails its verification is renamed `<output>.failed-verification` instead. The record file
(merge.json, combine.json, export.json) is what marks a directory as loratool's own, so that only those are
ever replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def make_partial(output: Path) -> Path:
    """A new, empty `<output>.partial-XXXX` directory beside `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)  # mkdtemp makes the directory private (0700); the output should not be
    os.umask(umask)
    partial.chmod(0o777 & ~umask)
    return partial


def move_into_place(partial: Path, output: Path) -> None:
    """The last step: the partial directory becomes the output (a previous output is replaced)."""
    if output.exists():
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink()
    os.replace(partial, output)


def keep_failed(partial: Path, output: Path, record_name: str) -> Path:
    """Rename a result that failed verification so that its name says so. An earlier failed result (it has
    `record_name`) is replaced; anything else under that name is left alone and a numbered name is used."""
    failed = output.with_name(f"{output.name}.failed-verification")
    if failed.exists() and (failed / record_name).is_file():
        shutil.rmtree(failed)
    number = 1
    while failed.exists():
        number += 1
        failed = output.with_name(f"{output.name}.failed-verification-{number}")
    os.replace(partial, failed)
    return failed


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (run.json, merge.json, config.json, ...); {} when missing, unreadable or not an
    object, so that callers ask for keys and decide what an absent one means."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def write_record(folder: Path, record_name: str, record: dict[str, Any]) -> None:
    (folder / record_name).write_text(json.dumps(record, indent=2, default=str) + "\n")


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the named distributions (None for one that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
