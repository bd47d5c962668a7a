"""Every output directory loratool writes, and the rules that keep them safe: one module for all commands.

- Ownership. Each output carries a record file (run.json, merge.json, combine.json, export.json, eval's
  metrics.json) holding a marker, `"loratool_output": {"kind": ..., "format": 1}`, and `"files"`: the
  top-level names loratool wrote there. A directory is loratool's only when its record carries the marker
  of the expected kind, and `--overwrite` removes only the listed names — a file or folder that loratool
  did not write is never deleted, whatever the directory is called or what else is in it. Symbolic links
  are removed as links, never followed.
- One writer. A command holds an exclusive lock on its output for its whole life (`.NAME.lock` beside it,
  an flock that the kernel releases when the process dies, even under kill -9). A second writer is refused
  with the holder's pid, host, command and start time; a lock whose holder died is taken over.
  The lock file also lists the partial directories its holder made (`Output.partial`): the command that
  takes over a dead holder's lock removes those, and only those, so a killed command leaves nothing behind
  for good.
- Never looks complete early. merge, combine, export and eval write into `<output>.partial-XXXX` beside the
  output and rename it into place as the last step; a result that fails verification is renamed
  `<output>.failed-verification`. An output that appeared while we worked is not replaced.
- Records are written atomically (temporary file, fsync, rename).
- Room first. A command checks the free disk space for what it is about to write before it writes
  anything (`check_free_space`).

Each record has one typed owner in the package of the command that writes it (run.json:
rundir/records.py, merge.json: merge/record.py, export.json: export/record.py); this module only knows
their names, markers and file lists.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError

MARKER = "loratool_output"
FORMAT = 1
# The record file of each kind of output. Other commands' outputs can live inside a run directory (merge's
# `merged/`, export's `merged-gguf/`, eval's `eval/`): they are derived from it, not foreign to it.
RECORD_OF_KIND = {
    "run": "run.json",
    "merge": "merge.json",
    "combine": "combine.json",
    "export": "export.json",
    "eval": "metrics.json",
}


# --- records -------------------------------------------------------------------------------------------


def marker(kind: str) -> dict[str, Any]:
    """The marker that makes a record loratool's own."""
    return {"kind": kind, "format": FORMAT}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (config.json, generation_config.json, ...); {} when missing, unreadable or not an
    object, so that callers ask for keys and decide what an absent one means."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """Write JSON to `path` so that a reader sees the old or the new content, never half a file; on
    failure (a full disk) nothing is left behind but the old file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(value, indent=2, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def owned_record(folder: Path, record_name: str, kind: str) -> dict[str, Any] | None:
    """The record of a loratool output of `kind` in `folder`, or None when it is not one."""
    record = read_json(folder / record_name)
    mark = record.get(MARKER)
    if isinstance(mark, dict) and mark.get("kind") == kind and isinstance(record.get("files"), list):
        return record
    return None


def read_record(folder: Path, kind: str) -> dict[str, Any] | None:
    """The record of the loratool `kind` output in `folder`, as a plain object, or None. Records with a
    typed owner are read through it instead: run.json through rundir.records.read_run, merge.json through
    merge.record.MergeRecord, export.json through export.record.ExportRecord."""
    return owned_record(folder, RECORD_OF_KIND[kind], kind)


def known_fields(cls: type, value: Any) -> dict[str, Any]:
    """The keys of a record's JSON object that are fields of the dataclass `cls` (its `raw` excepted):
    a key another loratool version wrote is left out, and a value that is not an object gives {}."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return {k: v for k, v in value.items() if k in names} if isinstance(value, dict) else {}


def write_record(folder: Path, record_name: str, record: dict[str, Any], *, kind: str) -> None:
    """Write `record` as `folder/record_name`, marked as loratool's and listing every name in `folder`
    (all written by the command that calls this, into its partial directory)."""
    files = sorted({p.name for p in folder.iterdir() if not p.name.startswith(f".{record_name}.tmp")})
    full = {MARKER: marker(kind), **record, "files": sorted({*files, record_name})}
    write_json_atomic(folder / record_name, full)


def _owned_entries(folder: Path, record: dict[str, Any]) -> list[Path]:
    """The listed names that are safe to remove: plain names inside `folder`, nothing that climbs out."""
    entries = []
    for name in record.get("files", []):
        if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or "\\" in name:
            continue
        path = folder / name
        if path.is_symlink() or path.exists():
            entries.append(path)
    return entries


def remove_entry(path: Path) -> None:
    """Remove one file, link or directory tree; a link is removed itself, never what it points to."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def derived_output(path: Path) -> tuple[str, str] | None:
    """(kind, record name) when `path` is a directory holding a loratool output of any kind."""
    if path.is_symlink() or not path.is_dir():
        return None
    for kind, record_name in RECORD_OF_KIND.items():
        if owned_record(path, record_name, kind) is not None:
            return kind, record_name
    return None


def remove_owned(
    folder: Path, record_name: str, kind: str, log: Callable[[str], None], *, derived: bool = True
) -> list[str]:
    """Remove what a loratool output of `kind` wrote in `folder` (its record last) and, with `derived`, the
    loratool outputs made from it inside it (each only what it wrote); then the folder itself when that
    leaves it empty. Prints what it removes and what it keeps; returns the names kept."""
    record = owned_record(folder, record_name, kind)
    if record is None:
        return sorted(p.name for p in folder.iterdir())
    owned = _owned_entries(folder, record)
    listed = {p.name for p in owned}
    if derived:
        for path in sorted(folder.iterdir()):
            found = derived_output(path) if path.name not in listed else None
            if found is not None:
                log(f"removing {path.name}/, a `loratool {found[0]}` output made from the previous {kind}")
                remove_owned(path, found[1], found[0], log)
    owned.sort(key=lambda p: p.name == record_name)  # the record last: an interruption leaves it findable
    for path in owned:
        remove_entry(path)
    kept = sorted(p.name for p in folder.iterdir())
    if owned:
        log(f"removed the previous {kind} output in {folder}: {', '.join(sorted(listed))}")
    if kept:
        log(f"kept in {folder} (not written by loratool): {', '.join(kept)}")
    elif kind != "run":
        folder.rmdir()
    return kept


def foreign_entries(folder: Path, record: dict[str, Any]) -> list[str]:
    """Names in `folder` that its record does not list and that are not loratool outputs derived from it
    (files the user or another tool put there)."""
    listed = set(record.get("files", []))
    return sorted(
        p.name + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in folder.iterdir()
        if p.name not in listed and derived_output(p) is None and not _is_lock_file(p)
    )


# --- disk space ----------------------------------------------------------------------------------------

FREE_SPACE_MARGIN = 64 * 2**20  # bytes kept free beyond an estimate (file-system overhead, the record)


def check_free_space(folder: Path, needed: int, *, what: str, hint: str, detail: str = "") -> None:
    """Refuse, before anything is written, an output of about `needed` bytes that the disk holding
    `folder` cannot take with FREE_SPACE_MARGIN to spare. `folder` need not exist yet (its nearest
    existing parent is asked); `what` names the output in the message ("the merged model")."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed + FREE_SPACE_MARGIN:
        raise LoratoolError(
            f"not enough disk space in {folder}: {what} needs about {_size(needed)}{detail}, and "
            f"{_size(free)} is free",
            hint=hint,
        )


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --- locks ---------------------------------------------------------------------------------------------


def _is_lock_file(path: Path) -> bool:
    """A lock of an output beside this one (`.merged.lock` while a merge writes into a run directory)."""
    return path.name.startswith(".") and path.name.endswith(".lock") and path.is_file()


# What `tempfile.mkdtemp` appends to `<output>.partial-` (`Output.partial`): 8 of [a-z0-9_].
PARTIAL_SUFFIX = r"\.partial-[a-z0-9_]{8}"


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


@contextmanager
def output_lock(output: Path, command: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the exclusive lock on `output` for the duration; refuse if another process holds it."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LoratoolError(
                f"{output} is being written by another loratool process ({_describe_holder(path)})",
                hint="wait for it to finish (or stop it), or choose another output directory",
            ) from None
        # The file may have been unlinked by the previous holder between our open and our lock: then we
        # locked a dead inode, and must try again on the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_holder(fd)
    if previous and previous.get("pid") and previous.get("pid") != os.getpid():
        log(
            f"note: took over the lock on {output} left by {_holder_text(previous)}, which is no longer running"
        )
        removed = _remove_partials(output, previous)
        if removed:
            log(f"note: removed what that command left unfinished: {', '.join(removed)}")
    _note_unrecorded_partials(output, log)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    _write_holder(fd, holder)
    try:
        yield
    finally:
        # What the command did not rename into place or clean up itself (an interrupt between creating a
        # partial directory and the `try` that removes it), then the lock file. Unlink while still holding
        # the lock, so that nobody can lock this inode after we let go.
        _remove_partials(output, _read_holder(fd))
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _is_partial_name(output: Path, name: Any) -> bool:
    """Whether `name` is one `Output.partial` gives the partial directories of `output`."""
    return isinstance(name, str) and re.fullmatch(re.escape(output.name) + PARTIAL_SUFFIX, name) is not None


def _record_partial(output: Path, partial: Path) -> None:
    """Add `partial` to the partial directories the lock on `output` lists, when this process holds it
    (an Output checked without its lock, `check_output` on its own, records nothing)."""
    try:
        fd = os.open(lock_path(output), os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        holder = _read_holder(fd)
        if holder.get("pid") == os.getpid():
            partials = [n for n in holder.get("partials", []) if isinstance(n, str)]
            _write_holder(fd, {**holder, "partials": [*partials, partial.name]})
    finally:
        os.close(fd)


def _remove_partials(output: Path, holder: dict[str, Any]) -> list[str]:
    """Remove the partial directories of `output` that the lock `holder` lists: only names of the form
    `Output.partial` gives, beside `output`, that are directories (never a link or a file); returns them."""
    removed = []
    listed = holder.get("partials")
    for name in listed if isinstance(listed, list) else []:
        path = output.with_name(name) if _is_partial_name(output, name) else None
        if path is not None and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{name}/")
    return removed


def _note_unrecorded_partials(output: Path, log: Callable[[str], None]) -> None:
    """Partial directories of `output` that no lock lists (left by an older loratool, or with a lock file
    deleted by hand): nothing writes them now, since we hold the lock, but they are only named like ours,
    so they are pointed out and kept."""
    if not output.parent.is_dir():
        return
    found = sorted(p.name for p in output.parent.iterdir() if _is_partial_name(output, p.name))
    if found:
        log(
            f"note: {', '.join(found)} beside {output} look left by an interrupted loratool command; they are "
            "not recorded as loratool's, so they are kept: delete them if nothing of yours is in them"
        )


def lock_holder(output: Path) -> dict[str, Any] | None:
    """Who holds the lock on `output` as its lock file says (pid, host, command, started); None when there is
    no lock file. Read only: another machine's process can check which process writes a shared directory."""
    try:
        fd = os.open(lock_path(output), os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe_holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "holder unknown"
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    return _holder_text(holder) if holder else "holder unknown"


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, "
        f"started {holder.get('started')}"
    )


def command_line() -> str:
    """How this process was started, for lock holders and records."""
    name = Path(sys.argv[0]).name if sys.argv else "loratool"
    if name in ("__main__.py", "-m", "-c", ""):
        name = "loratool"
    return " ".join([name, *sys.argv[1:]])[:300]


# --- outputs written in a partial directory and renamed into place --------------------------------------


@dataclass
class Output:
    """An output directory a command is about to write, checked and locked by `claim_output`."""

    path: Path
    kind: str
    record_name: str
    replaces: bool  # an earlier output of this kind was there when we started (and --overwrite was given)

    def partial(self) -> Path:
        """A new, empty `<output>.partial-XXXX` directory beside the output."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{self.path.name}.partial-", dir=self.path.parent))
        _record_partial(self.path, partial)  # at once: a command killed from here on leaves it listed
        umask = os.umask(0)  # mkdtemp makes the directory private (0700); the output should not be
        os.umask(umask)
        partial.chmod(0o777 & ~umask)
        return partial

    def place(self, partial: Path, record: dict[str, Any], log: Callable[[str], None]) -> None:
        """The last step: write the record into `partial`, then make it the output (removing what the
        earlier output of this kind wrote, and only that)."""
        write_record(partial, self.record_name, record, kind=self.kind)
        if self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
            self.path.rmdir()  # an empty directory is replaced whether or not it was there at the start
        if self.path.is_symlink() or self.path.exists():
            if not self.replaces:
                raise LoratoolError(
                    f"{self.path} appeared while this command was running; it was not replaced",
                    hint=f"the new result is in {partial}; move it where you want it",
                )
            else:
                kept = [n for n in remove_owned(self.path, self.record_name, self.kind, log)
                        if not _is_lock_file(self.path / n)]  # fmt: skip
                if kept:
                    raise LoratoolError(
                        f"{self.path} now holds files loratool did not write ({', '.join(kept)})",
                        hint=f"the new result is in {partial}; move those files away and rename it",
                    )
        os.replace(partial, self.path)

    def keep_failed(self, partial: Path, record: dict[str, Any]) -> Path:
        """Rename a result that failed verification so that its name says so. An earlier failed result of
        this kind is replaced; anything else under that name is left alone and a numbered name is used."""
        write_record(partial, self.record_name, record, kind=self.kind)
        failed = self.path.with_name(f"{self.path.name}.failed-verification")
        if failed.is_dir() and not failed.is_symlink() and owned_record(failed, self.record_name, self.kind):
            remove_owned(failed, self.record_name, self.kind, lambda _: None)
        number = 1
        while failed.is_symlink() or failed.exists():
            number += 1
            failed = self.path.with_name(f"{self.path.name}.failed-verification-{number}")
        os.replace(partial, failed)
        return failed


def check_output(path: Path, *, kind: str, record_name: str, overwrite: bool, option: str) -> Output:
    """Refuse an output directory that would lose anything: a file, a link, a directory that is not a
    loratool output of this kind, or one that also holds files loratool did not write. With --overwrite a
    previous output of the same kind is replaced (only what it wrote); without it, refused."""
    check_writable(path, option)
    if path.is_symlink():
        raise LoratoolError(
            f"{option} {path} is a symbolic link",
            hint=f"give the directory it points to ({path.resolve()}) or a new directory",
        )
    if path.exists() and not path.is_dir():
        raise LoratoolError(f"{option} {path} is a file", hint="choose a directory (new or empty)")
    if not path.exists() or not any(path.iterdir()):
        return Output(path, kind, record_name, replaces=False)
    record = owned_record(path, record_name, kind)
    if record is None:
        raise LoratoolError(
            f"{option} {path} is not empty and is not the output of `loratool {kind}` (no loratool "
            f"{record_name} there)",
            hint=f"choose a new or empty directory with {option} (loratool never deletes files it did not "
            "write)",
        )
    if not overwrite:
        raise LoratoolError(
            f"output directory {path} already exists",
            hint=f"pass --overwrite to replace it, or choose another {option}",
        )
    foreign = foreign_entries(path, record)
    if foreign:
        raise LoratoolError(
            f"--overwrite: {path} also holds files loratool did not write: {', '.join(foreign)}",
            hint="move them out of the directory (loratool never deletes files it did not write), or choose "
            f"another {option}",
        )
    return Output(path, kind, record_name, replaces=True)


@contextmanager
def claim_output(
    path: Path,
    *,
    kind: str,
    record_name: str,
    overwrite: bool,
    option: str = "--output",
    log: Callable[[str], None] = print,
) -> Iterator[Output]:
    """Lock `path` for this command and check it (see check_output); the lock is held until the block ends."""
    with output_lock(path, command_line(), log):
        yield check_output(path, kind=kind, record_name=record_name, overwrite=overwrite, option=option)


NAME_MAX = 255  # bytes in one file name, on every common Linux and macOS file system


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, an output that cannot be written: a name longer than file systems allow,
    or a place (the directory, or its nearest existing parent) on a read-only file system or without
    write permission. Found here rather than after the data and the model have loaded."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise LoratoolError(
                f"{what} {path}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long; file systems "
                f"allow {NAME_MAX}",
                hint="choose a shorter output directory name",
            )
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return  # a file where a directory is wanted: the caller says so
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise LoratoolError(
            f"{what} {path}: {existing} {why}",
            hint="choose an output directory on a writable disk",
        )


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
