"""What a killed command leaves beside its output: the partial directories its lock lists are removed by
the command that takes the lock over, and nothing else is — not a file beside them, not a folder only
named like them, not what a forged lock names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from loratool.rundir.outputs import claim_output, lock_path

# A merge killed with -9 halfway through writing its partial directory (the kernel frees the flock; the
# lock file and the partial directory stay).
KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from loratool.rundir.outputs import claim_output
with claim_output(Path(sys.argv[1]), kind="merge", record_name="merge.json", overwrite=False) as out:
    partial = out.partial()
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    print(partial, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_mid_write(output: Path) -> Path:
    """The partial directory of a command killed while it wrote `output`."""
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(output)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return Path(proc.stdout.strip())


def claim(output: Path, said: list[str]):
    return claim_output(output, kind="merge", record_name="merge.json", overwrite=False, log=said.append)


def test_the_rerun_removes_what_the_killed_command_left_and_nothing_else(tmp_path):
    output = tmp_path / "merged"
    partial = killed_mid_write(output)
    assert partial.is_dir() and partial.name.startswith("merged.partial-")
    assert partial.name in json.loads(lock_path(output).read_text())["partials"]
    notes = tmp_path / "notes.txt"  # the user's, beside it
    notes.write_text("mine")
    look_alike = tmp_path / "merged.partial-abcdefgh"  # named like a partial, but no lock lists it
    look_alike.mkdir()
    (look_alike / "keep.txt").write_text("mine too")

    said: list[str] = []
    with claim(output, said) as out:
        assert not partial.exists()
        assert not out.replaces
    text = "\n".join(said)
    assert "took over the lock" in text
    assert f"removed what that command left unfinished: {partial.name}/" in text
    assert "merged.partial-abcdefgh" in text and "they are kept" in text
    assert notes.read_text() == "mine" and (look_alike / "keep.txt").read_text() == "mine too"
    assert not lock_path(output).exists()
    # The next command finds nothing to take over or remove.
    again: list[str] = []
    with claim(output, again):
        pass
    assert not any("took over" in line or "removed" in line for line in again)


def test_a_forged_lock_removes_nothing_it_does_not_name_as_a_partial(tmp_path):
    output = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    other = tmp_path / "other.partial-abcdefgh"  # a partial directory of another output
    other.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "merged.partial-linklink").symlink_to(target)  # a link, never followed or removed
    holder = {"pid": int(dead.stdout), "host": "h", "command": "loratool merge", "started": "then"}
    forged = ["../precious", "precious", "other.partial-abcdefgh", "merged.partial-linklink", 7]
    lock_path(output).write_text(json.dumps({**holder, "partials": forged}))

    said: list[str] = []
    with claim(output, said):
        pass
    assert "took over the lock" in said[0]
    assert not any("removed" in line for line in said)
    assert precious.is_dir() and other.is_dir() and target.is_dir()
    assert (tmp_path / "merged.partial-linklink").is_symlink()


def test_a_partial_never_renamed_goes_with_the_lock(tmp_path):
    """Interrupted between making its partial directory and the `try` that would remove it, a command
    still leaves nothing: releasing the lock removes the partial directories it lists."""
    output = tmp_path / "merged"
    made: list[Path] = []
    try:
        with claim(output, []) as out:
            made.append(out.partial())
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert made and not made[0].exists()
    assert sorted(os.listdir(tmp_path)) == []
