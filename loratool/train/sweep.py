"""`loratool sweep`: one recipe, a grid of overrides, one ordinary run directory per cell, one table.

    loratool sweep RECIPE --vary lora.r=8,16,32 --vary lora.use_dora=false,true

    out/sweep-NAME/
      r=8,use_dora=false/ ...   each cell a normal `loratool train` run directory (merge, eval, export work)
      sweep.json                the record: marker, status, the grid, one row per cell (the table as JSON)
      results.md, results.csv   the table: cell values, trainable parameters, peak memory, tokens/s, losses,
                                eval metrics (with --eval), and each failed cell's reason
      sweep.png                 train loss curves per cell, and the final validation loss of each cell
      sweep.log                 everything the sweep and its cells printed

Reads top to bottom like the sweep: parse the grid, check every key against the schema and every cell's
recipe (all before anything trains), claim the output directory, train each cell in turn, and write the
table and the plot after each cell (an interrupted sweep leaves them as far as it got).

Each cell trains in a fresh `loratool train` process. Peak memory is a per-process high-water mark
(ru_maxrss, and CUDA's allocator statistics), so only a fresh process gives each cell its own; a fresh
process also gives every cell the same start (no allocator cache, seed or library state left over from
the previous cell) and confines a crash (out of memory, a killed process) to its cell. The cost is a few
seconds of imports per cell.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratool import __version__
from loratool.errors import LoratoolError
from loratool.recipe import (
    Recipe,
    apply_override,
    load_recipe,
    recipe_to_dict,
    unknown_key_problems,
)
from loratool.rundir.metrics import read_metrics
from loratool.rundir.outputs import (
    MARKER,
    check_output,
    command_line,
    marker,
    output_lock,
    owned_record,
    read_record,
    remove_owned,
    write_json_atomic,
)
from loratool.rundir.records import RunDir, read_run
from loratool.rundir.signals import terminate_as_interrupt
from loratool.train.inputs import check_inputs

KIND = "sweep"
RECORD = "sweep.json"
TABLE_MD = "results.md"
TABLE_CSV = "results.csv"
PLOT = "sweep.png"
LOG = "sweep.log"
# Eval metrics shown in the table when --eval is given (keys of eval's metrics.json, models.tuned).
EVAL_METRICS = ("loss", "exact_match", "rouge_l_f1", "chrf")


# --- the grid --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One --vary: a recipe key path and the values it takes, each as written (YAML text)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its name (the run directory's), its overrides and its validated recipe."""

    name: str
    settings: tuple[tuple[str, str], ...]  # (key path, value text), one per axis
    recipe: Recipe
    run_dir: Path

    def overrides(self) -> list[str]:
        """The --set arguments that make this cell's recipe (after the sweep's own --set)."""
        return _cell_overrides(self.settings, self.run_dir)

    def values(self) -> dict[str, Any]:
        """Each varied key's value as the validated recipe holds it."""
        resolved = recipe_to_dict(self.recipe)
        return {key: _get(resolved, key) for key, _ in self.settings}


@dataclass(frozen=True)
class EvalOptions:
    """`loratool eval` after each cell: on the run's validation split, or on `data`."""

    data: Path | None = None
    max_samples: int | None = None
    max_new_tokens: int | None = None

    def arguments(self) -> list[str]:
        args = []
        if self.data is not None:
            args += ["--data", str(self.data)]
        if self.max_samples is not None:
            args += ["--max-samples", str(self.max_samples)]
        if self.max_new_tokens is not None:
            args += ["--max-new-tokens", str(self.max_new_tokens)]
        return args


def parse_vary(texts: list[str]) -> list[Axis]:
    """`--vary KEY=V1,V2,...` options as axes. Values split at top-level commas, so that YAML lists and
    mappings stay whole: `lora.target_modules=[q_proj,v_proj],all-linear` has two values."""
    if not texts:
        raise LoratoolError(
            "sweep: no --vary given", hint="e.g. --vary lora.r=8,16,32 (repeat --vary for a grid)"
        )
    axes: list[Axis] = []
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise LoratoolError(
                f"--vary {text!r}: expected KEY.PATH=VALUE,VALUE,...",
                hint="e.g. --vary lora.r=8,16,32 or --vary lora.target_modules=[q_proj,v_proj],all-linear",
            )
        parts = split_values(values)
        if any(not p for p in parts):
            raise LoratoolError(f"--vary {text!r}: an empty value", hint="remove the extra comma")
        repeated = sorted({p for p in parts if parts.count(p) > 1})
        if repeated:
            raise LoratoolError(
                f"--vary {key}: {', '.join(repeated)} listed twice", hint="give each value once"
            )
        if any(axis.key == key for axis in axes):
            raise LoratoolError(f"--vary {key} is given twice", hint="list all its values in one --vary")
        axes.append(Axis(key, tuple(parts)))
    return axes


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes."""
    parts, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def check_keys(axes: list[Axis], base: Recipe, sets: list[str]) -> None:
    """Every varied key against the recipe schema, as the recipe loader checks keys (an unknown one
    names the closest valid key), all problems in one error."""
    problems = []
    set_keys = {s.partition("=")[0].strip() for s in sets}
    for axis in axes:
        if axis.key == "training.output_dir" or axis.key.startswith("training.output_dir."):
            problems.append(
                f"--vary {axis.key}: each cell's output_dir is set by the sweep (--output DIR/CELL)"
            )
            continue
        if axis.key in set_keys:
            problems.append(f"--vary {axis.key}: also given with --set; give it in one place")
            continue
        raw = recipe_to_dict(base)
        try:
            apply_override(raw, f"{axis.key}=null")
        except LoratoolError as exc:
            problems.append(f"--vary {axis.key}: {exc.message.partition(': ')[2] or exc.message}")
            continue
        problems += [f"--vary {p}" for p in unknown_key_problems(raw, Recipe, prefix="")]
    if problems:
        raise LoratoolError(
            "\n".join(
                ["sweep: the grid names keys the recipe does not have:", *(f"  - {p}" for p in problems)]
            )
            if len(problems) > 1
            else problems[0],
            hint="`loratool recipe-reference` lists every valid key with its meaning",
        )


def plan_cells(recipe_path: Path, axes: list[Axis], sets: list[str], sweep_dir: Path) -> list[Cell]:
    """Every cell of the grid (the first --vary changes slowest), each recipe loaded and validated now,
    so that a bad value in any cell is found before the first one trains."""

    labels = _labels([axis.key for axis in axes])
    cells, problems, names, checked = [], [], set(), set()
    for combination in itertools.product(*(axis.values for axis in axes)):
        settings = tuple(zip((axis.key for axis in axes), combination, strict=True))
        name = _unique(",".join(f"{labels[k]}={_file_safe(v)}" for k, v in settings), names)
        names.add(name)
        run_dir = sweep_dir / name
        try:
            recipe = load_recipe(recipe_path, [*sets, *_cell_overrides(settings, run_dir)])
            inputs = json.dumps([recipe.base_model, recipe.model.tokenizer, recipe_to_dict(recipe)["data"]])
            if inputs not in checked:  # a varied base model or data path that is not there
                check_inputs(recipe, log=lambda _: None)
                checked.add(inputs)
        except LoratoolError as exc:
            problems.append(f"cell {name}: {_problem_lines(exc)}")
            continue
        cells.append(Cell(name, settings, recipe, run_dir))
    if problems:
        raise LoratoolError(
            f"sweep: {len(problems)} of {len(problems) + len(cells)} cells have a recipe that does not load "
            "(nothing was trained):\n" + "\n".join(f"  - {p}" for p in problems),
            hint="fix or drop those values of --vary; `loratool recipe-reference` lists each key's type",
        )
    return cells


def _cell_overrides(settings: tuple[tuple[str, str], ...], run_dir: Path) -> list[str]:
    # The output directory JSON-quoted: a name with ': ' or ' #' in it stays one YAML string.
    return [f"{k}={v}" for k, v in settings] + [f"training.output_dir={json.dumps(str(run_dir))}"]


def default_output(base: Recipe) -> Path:
    """sweep-NAME next to the recipe's training.output_dir (out/run -> out/sweep-run)."""
    output = Path(base.training.output_dir).expanduser()
    return output.with_name(f"sweep-{output.name}")


def _labels(keys: list[str]) -> dict[str, str]:
    """Each key's name in cell names: its last part (`r`), or the whole path when two would clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (short if last.count(short) == 1 else key) for key, short in zip(keys, last, strict=True)}


def _file_safe(value: str) -> str:
    """A value as part of a directory name: [q_proj, v_proj] -> q_proj_v_proj, a/b -> a_b."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", value).strip("_.")[:60] or "value"


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def _problem_lines(exc: LoratoolError) -> str:
    """A recipe error as one line: its listed problems (`  - lora.r: ...`), else its message."""
    lines = exc.message.splitlines()
    listed = [line.strip().removeprefix("- ") for line in lines[1:] if line.strip().startswith("- ")]
    return "; ".join(listed) if listed else " ".join(line.strip() for line in lines)


def _get(value: Any, key_path: str) -> Any:
    for key in key_path.split("."):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict):
            value = value.get(key)
        else:
            return None
    return value


# --- running ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What became of one cell: `status` complete / failed / skipped (finished before a --resume)."""

    status: str
    error: str | None = None
    eval_error: str | None = None


@dataclass
class SweepLog:
    """Prints to the terminal and keeps everything in sweep.log (once the directory is there)."""

    echo: Callable[[str], None]
    path: Path | None = None
    lines: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.echo(line)
        if self.path is None:
            self.lines.append(line)
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(f"{held}\n" for held in self.lines) + f"{line}\n")
        self.lines = []


def plan_sweep(
    recipe_path: Path, vary: list[str], sets: list[str], output: str | Path | None, log: Callable[[str], None]
) -> tuple[list[Axis], list[Cell], Path]:
    """The grid's axes, every cell (each recipe validated now) and the sweep directory; says what it found."""
    axes = parse_vary(vary)
    base = load_recipe(recipe_path, sets)
    check_keys(axes, base, sets)
    sweep_dir = Path(output).expanduser() if output is not None else default_output(base)
    sweep_dir = sweep_dir.absolute()
    cells = plan_cells(recipe_path, axes, sets, sweep_dir)
    grid = " x ".join(f"{axis.key} ({len(axis.values)})" for axis in axes)
    log(f"sweep: {len(cells)} cells ({grid}) of {recipe_path} -> {sweep_dir}")
    return axes, cells, sweep_dir


def new_record(
    recipe_path: Path, axes: list[Axis], sets: list[str], evaluate: EvalOptions | None, *, status: str
) -> dict[str, Any]:
    """sweep.json's content at the start (its rows come as the cells run, or are collected)."""
    return {
        "status": status,
        "loratool_version": __version__,
        "recipe": str(recipe_path.absolute()),
        "command": sys.argv,
        "command_line": command_line(),
        "vary": {axis.key: list(axis.values) for axis in axes},
        "set": sets,
        "eval": None if evaluate is None else {**evaluate.__dict__, "data": _str(evaluate.data)},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cells": [],
    }


def run_sweep(
    recipe_path: str | Path,
    vary: list[str],
    *,
    sets: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    evaluate: EvalOptions | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train every cell of the grid in turn and write the table; return the sweep directory. Raises a
    LoratoolError (exit 1) after writing the table when any cell failed."""
    recipe_path = Path(recipe_path)
    sets = list(sets or [])
    if resume and overwrite:
        raise LoratoolError("--resume and --overwrite contradict each other", hint="pass one of them")
    axes, cells, sweep_dir = plan_sweep(recipe_path, vary, sets, output, log)
    if dry_run:
        _check_sweep_dir(sweep_dir, overwrite=overwrite, resume=resume)
        _dry_run(cells, log)
        return sweep_dir

    sweep_log = SweepLog(log)
    with output_lock(sweep_dir, command_line(), log), terminate_as_interrupt():
        claim_sweep_dir(sweep_dir, overwrite=overwrite, resume=resume, log=sweep_log)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_log.path = sweep_dir / LOG
        files = {RECORD, LOG}
        record = new_record(recipe_path, axes, sets, evaluate, status="running")
        outcomes: dict[str, Outcome] = {}

        def write_results(status: str) -> None:
            record["status"] = status
            record["cells"] = [
                row(cell.name, cell.run_dir, cell.values(), outcomes.get(cell.name), evaluate is not None)
                for cell in cells
            ]
            write_tables(sweep_dir, record, axes, files)

        write_record(sweep_dir, record, files)  # first: it marks the directory as a loratool sweep
        try:
            for number, cell in enumerate(cells, 1):
                sweep_log(f"--- cell {number}/{len(cells)}: {cell.name}")
                outcomes[cell.name] = _run_cell(cell, recipe_path, sets, resume, evaluate, sweep_log)
                write_results("running")
        except BaseException as exc:
            write_results("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        failed = [
            cell for cell in cells if outcomes[cell.name].status == "failed" or outcomes[cell.name].eval_error
        ]
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_results("failed" if failed else "complete")
        for line in table_markdown(record, axes, terminal=True).splitlines():
            sweep_log(line)
        sweep_log(f"table written to {sweep_dir / TABLE_MD} (and {TABLE_CSV}, {RECORD}); plot: {PLOT}")
    if failed:
        reasons = "\n".join(
            f"  - {cell.name}: {outcomes[cell.name].error or outcomes[cell.name].eval_error}"
            for cell in failed
        )
        raise LoratoolError(
            f"sweep: {len(failed)} of {len(cells)} cells failed (the others are kept, and the table "
            f"written):\n{reasons}",
            hint=f"see each cell's run.json and train.log under {sweep_dir}; rerun with --resume to train "
            "only the cells that did not finish",
        )
    return sweep_dir


def _run_cell(
    cell: Cell,
    recipe_path: Path,
    sets: list[str],
    resume: bool,
    evaluate: EvalOptions | None,
    log: Callable[[str], None],
) -> Outcome:
    """Train one cell in a fresh process (or skip it: finished, same recipe, --resume), then evaluate it."""
    state = RunDir(cell.run_dir).state() if cell.run_dir.exists() else "new"
    previous = read_run(cell.run_dir) if state in ("finished", "unfinished") else None
    same = previous is not None and _same(previous.recipe_dict(), recipe_to_dict(cell.recipe))
    if resume and state == "finished" and same:
        log(f"{cell.name}: finished before, same recipe: kept as it is")
        outcome = Outcome("skipped")
    else:
        mode = []
        if state in ("finished", "unfinished"):
            # Only with --resume can a cell's directory hold a run here (a new or replaced sweep has none):
            # continue it from its last checkpoint, where there is one, else start it again.
            checkpoint, _ = RunDir(cell.run_dir).latest_checkpoint()
            mode = ["--resume"] if checkpoint is not None else ["--overwrite"]
        command = ["train", str(recipe_path), *_set_args([*sets, *cell.overrides()]), *mode]
        code, error = run_loratool(command, log)
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            record = read_run(cell.run_dir)
            reason = (
                error or (record.error if record else None) or f"`loratool train` exited with code {code}"
            )
            _remove_if_empty(cell.run_dir)
            log(f"{cell.name}: failed: {reason}")
            return Outcome("failed", error=reason)
        outcome = Outcome("complete")
    # A kept cell keeps its eval report too; a cell trained now is evaluated now.
    if evaluate is not None and (
        outcome.status == "complete" or read_record(cell.run_dir / "eval", "eval") is None
    ):
        code, error = run_loratool(["eval", str(cell.run_dir), *evaluate.arguments()], log)
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            outcome.eval_error = f"eval: {error or f'`loratool eval` exited with code {code}'}"
            log(f"{cell.name}: {outcome.eval_error}")
    return outcome


def run_loratool(command: list[str], log: Callable[[str], None]) -> tuple[int, str | None]:
    """Run `loratool COMMAND` in a fresh Python process, its output passed to `log` line by line; return
    its exit code and its `error:` message (with the listed lines after it), if it printed one."""
    argv = [sys.executable, "-m", "loratool", *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.strip():
                lines.append(line)
                log(f"  {line}")
        code = process.wait()
    except BaseException:
        if process.poll() is None:  # Ctrl-C reached it too; a SIGTERM to the sweep did not
            process.send_signal(signal.SIGINT)
        process.wait()
        raise
    return code, error_message(lines)


def error_message(lines: list[str]) -> str | None:
    """The `error: ...` a loratool command printed, as one line (a listed problem per `; `)."""
    start = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("error: ")), None)
    if start is None:
        return None
    text = [lines[start].removeprefix("error: ").rstrip(":")]
    for line in lines[start + 1 :]:
        if line.startswith("hint: ") or not line.startswith(" "):
            break
        text.append(line.strip().removeprefix("- "))
    return text[0] + (": " + "; ".join(text[1:]) if len(text) > 1 else "")


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Two resolved recipes are the same (compared as the YAML written to recipe.yaml reads back)."""
    return a is not None and a == yaml.safe_load(yaml.safe_dump(b, sort_keys=False, allow_unicode=True))


def _remove_if_empty(path: Path) -> None:
    """A cell that failed before its run directory had anything in it leaves no empty directory behind."""
    try:
        path.rmdir()
    except OSError:
        pass


def _check_sweep_dir(sweep_dir: Path, *, overwrite: bool, resume: bool) -> bool:
    """Whether an earlier sweep is there; refuses what the sweep may not touch (see outputs.check_output,
    whose rules --overwrite follows as every other command does)."""
    claimed = check_output(
        sweep_dir, kind=KIND, record_name=RECORD, overwrite=overwrite or resume, option="--output"
    )
    if resume and not claimed.replaces:
        raise LoratoolError(
            f"--resume: {sweep_dir} holds no sweep to resume", hint="drop --resume to start the sweep"
        )
    return claimed.replaces


def claim_sweep_dir(sweep_dir: Path, *, overwrite: bool, resume: bool, log: Callable[[str], None]) -> None:
    """Make the sweep directory ready: new, the earlier sweep kept for --resume, or (--overwrite) what the
    earlier sweep wrote removed, each cell's run by its own record; nothing loratool did not write."""
    if _check_sweep_dir(sweep_dir, overwrite=overwrite, resume=resume) and overwrite:
        remove_owned(sweep_dir, RECORD, KIND, log)


def write_tables(sweep_dir: Path, record: dict[str, Any], axes: list[Axis], files: set[str]) -> None:
    """results.md, results.csv and sweep.png from the record's rows, then sweep.json itself."""
    (sweep_dir / TABLE_MD).write_text(table_markdown(record, axes), encoding="utf-8")
    (sweep_dir / TABLE_CSV).write_text(table_csv(record, axes), encoding="utf-8")
    plot_sweep(record, axes, sweep_dir, sweep_dir / PLOT)
    files.update({TABLE_MD, TABLE_CSV, PLOT})
    write_record(sweep_dir, record, files)


def write_record(sweep_dir: Path, record: dict[str, Any], files: set[str]) -> None:
    write_json_atomic(sweep_dir / RECORD, {MARKER: marker(KIND), **record, "files": sorted(files)})


def read_sweep(sweep_dir: Path) -> dict[str, Any] | None:
    """sweep.json of the loratool sweep in `sweep_dir`, or None when it holds none."""
    return owned_record(sweep_dir, RECORD, KIND)


def _dry_run(cells: list[Cell], log: Callable[[str], None]) -> None:
    """`train --dry-run` of every cell, in this process: data, tokenizer, target modules and the
    adapter's size on a weightless model, and the plan's memory and time line. Nothing is written."""
    from loratool.train.dry_run import dry_run  # deferred: loads torch and transformers

    for number, cell in enumerate(cells, 1):
        log(f"--- cell {number}/{len(cells)}: {cell.name}")
        dry_run(cell.recipe, overwrite=True, log=lambda line: log(f"  {line}"))
    log(f"dry run: all {len(cells)} cells check out; nothing was written")


def _str(value: Path | None) -> str | None:
    return None if value is None else str(value)


# --- collecting what ran elsewhere -----------------------------------------------------------------------


def collect_sweep(sweep_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """`loratool sweep --collect DIR`: the table of a sweep whose cells ran as jobs of their own (`sweep
    --launch`), or of any sweep, read from each cell's run directory as it is now: complete, failed (with
    its reason), running (its run.json says so: whether its job is still alive only the scheduler
    knows), or not started (no run directory yet). Raises a LoratoolError after writing the table when
    a cell failed, as a sweep does."""
    sweep_dir = Path(sweep_dir).expanduser().absolute()
    record = read_sweep(sweep_dir)
    if (
        record is None
        or not isinstance(record.get("cells"), list)
        or not isinstance(record.get("vary"), dict)
    ):
        raise LoratoolError(
            f"--collect {sweep_dir}: no loratool sweep there (no readable {RECORD})",
            hint="pass the directory `loratool sweep --launch` (or `loratool sweep`) wrote",
        )
    axes = [Axis(key, tuple(values)) for key, values in record["vary"].items()]
    with output_lock(sweep_dir, command_line(), log):
        files = set(record.pop("files", None) or [])
        record.pop(MARKER, None)
        with_eval = record.get("eval") is not None
        record["cells"] = [
            _collected(row(c["cell"], sweep_dir / c["run_dir"], c["values"], None, with_eval))
            for c in record["cells"]
        ]
        counts = {status: 0 for status in ("complete", "failed", "running", "not started")}
        for cell in record["cells"]:
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
        unfinished = len(record["cells"]) - counts["complete"] - counts["failed"]
        record["status"] = "running" if unfinished else ("failed" if counts["failed"] else "complete")
        record["collected_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_tables(sweep_dir, record, axes, files)
    for line in table_markdown(record, axes, terminal=True).splitlines():
        log(line)
    log(f"collected {len(record['cells'])} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    log(f"table written to {sweep_dir / TABLE_MD} (and {TABLE_CSV}, {RECORD}); plot: {PLOT}")
    if counts["running"]:
        log("a cell whose run.json says running may also have been killed without a word (out of time, a "
            "lost node): its job's state is the scheduler's to tell (squeue, sky jobs queue)")  # fmt: skip
    failed = [cell for cell in record["cells"] if cell["status"] == "failed"]
    if failed:
        reasons = "\n".join(f"  - {cell['cell']}: {cell['error']}" for cell in failed)
        raise LoratoolError(
            f"sweep: {len(failed)} of {len(record['cells'])} cells failed (the table is written):\n{reasons}",
            hint=f"see each cell's run.json and train.log under {sweep_dir}; a cell's job continues from its "
            "last checkpoint with `--resume` added to its train line",
        )
    return sweep_dir


def _collected(cell: dict[str, Any]) -> dict[str, Any]:
    """A row as collected: no run directory yet is `not started`; a run stopped by a signal (interrupted)
    counts as failed, since nothing will continue it on its own."""
    status = cell["status"]
    if status == "pending":
        cell["status"] = "not started"
    elif status not in ("complete", "running", "failed"):
        cell["status"], cell["error"] = "failed", cell.get("error") or f"its run.json says {status}"
    return cell


# --- the table -------------------------------------------------------------------------------------------


def row(
    name: str, run_dir: Path, values: dict[str, Any], outcome: Outcome | None, with_eval: bool
) -> dict[str, Any]:
    """One row of the table, read from the cell's run.json, metrics.jsonl and eval report; without an
    outcome (a cell not run by this process), its status is what its run.json says."""

    result: dict[str, Any] = {
        "cell": name,
        "run_dir": name,
        "values": values,
        "status": "pending" if outcome is None else outcome.status,
        "error": None if outcome is None else outcome.error or outcome.eval_error,
    }
    record = read_run(run_dir)
    if outcome is not None and outcome.status == "skipped" and record is not None:
        result["status"] = "complete (kept)"
    if outcome is None and record is not None and record.status:
        result["status"] = record.status  # the cell an interruption stopped: failed, or running
        result["error"] = record.error
    if record is None or not record.complete:
        return result
    train = record.train
    peak = record.peak_memory_bytes
    kind = "cuda_allocated" if "cuda_allocated" in peak else "process_rss"
    seconds = train.get("train_seconds")
    tokens = train.get("tokens_trained")
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if _finite(r.get("loss"))]
    result.update(
        {
            "trainable_parameters": train.get("trainable_parameters"),
            "peak_memory_bytes": peak.get(kind),
            "peak_memory_kind": kind if peak else None,
            "tokens_per_second": round(tokens / seconds, 1) if tokens and seconds else None,
            "train_loss_final": losses[-1] if losses else None,  # the last logged step
            "train_loss_mean": train.get("train_loss"),  # over the whole run, as the trainer reports it
            "validation_loss": train.get("final_eval_loss"),
            "global_step": train.get("global_step"),
            "train_seconds": seconds,
            "wall_time_s": record.wall_time_s,
        }
    )
    if with_eval:
        report = read_record(run_dir / "eval", "eval")
        tuned = ((report or {}).get("models") or {}).get("tuned") or {}
        result["eval"] = {key: tuned.get(key) for key in EVAL_METRICS} if tuned else None
    return result


# (row key, header, format) of the table's number columns, after the varied keys and the status.
COLUMNS = (
    ("trainable_parameters", "trainable params", "{:,}"),
    ("peak_memory_bytes", "peak memory", "mib"),
    ("tokens_per_second", "tokens/s", "{:,.0f}"),
    ("train_loss_final", "final train loss", "{:.4f}"),
    ("validation_loss", "validation loss", "{:.4f}"),
)
EVAL_COLUMNS = (
    ("loss", "eval loss", "{:.4f}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("rouge_l_f1", "ROUGE-L", "{:.3f}"),
    ("chrf", "chrF", "{:.2f}"),
)


def table_markdown(record: dict[str, Any], axes: list[Axis], *, terminal: bool = False) -> str:
    """The table as markdown (results.md), or just the table and failures for the terminal."""
    with_eval = record.get("eval") is not None
    header = [axis.key for axis in axes] + ["status"] + [h for _, h, _ in COLUMNS]
    header += [h for _, h, _ in EVAL_COLUMNS] if with_eval else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in record["cells"]:
        values = [_scalar(cell["values"][axis.key]) for axis in axes]
        numbers = [_fmt(fmt, cell.get(key)) for key, _, fmt in COLUMNS]
        if fmt_eval := (cell.get("eval") or {}) if with_eval else None:
            numbers += [_fmt(fmt, fmt_eval.get(key)) for key, _, fmt in EVAL_COLUMNS]
        elif with_eval:
            numbers += ["–"] * len(EVAL_COLUMNS)
        lines.append("| " + " | ".join([*values, cell["status"], *numbers]) + " |")
    failed = [cell for cell in record["cells"] if cell.get("error")]
    notes = [f"- `{cell['cell']}`: {cell['error']}" for cell in failed]
    if terminal:
        return "\n".join(lines + (["", "failed:", *notes] if notes else []))
    peak = next((c["peak_memory_kind"] for c in record["cells"] if c.get("peak_memory_kind")), None)
    out = [
        f"# Sweep of `{record['recipe']}`",
        "",
        f"Status: {record['status']}. Command: `{record['command_line']}`",
        "",
        *lines,
        "",
        "Each cell is a `loratool train` run directory named after its values. Final train loss: the last "
        "logged step; validation loss: the validation split at the end of training; peak memory: "
        + ("CUDA allocated" if peak == "cuda_allocated" else "the training process's resident set")
        + "; tokens/s: tokens trained over training time.",
    ]
    if notes:
        out += ["", "## Failed cells", "", *notes]
    out += ["", f"![loss per cell]({PLOT})", ""]
    return "\n".join(out)


def table_csv(record: dict[str, Any], axes: list[Axis]) -> str:
    keys = ["trainable_parameters", "peak_memory_bytes", "peak_memory_kind", "tokens_per_second",
            "train_loss_final", "train_loss_mean", "validation_loss", "global_step", "train_seconds",
            "wall_time_s"]  # fmt: skip
    with_eval = record.get("eval") is not None
    header = ["cell", *(axis.key for axis in axes), "status", *keys]
    header += [f"eval_{key}" for key in EVAL_METRICS] if with_eval else []
    header.append("error")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for cell in record["cells"]:
        values = [_scalar(cell["values"][axis.key]) for axis in axes]
        evals = [(cell.get("eval") or {}).get(key) for key in EVAL_METRICS] if with_eval else []
        writer.writerow([cell["cell"], *values, cell["status"], *(cell.get(k) for k in keys), *evals,
                         cell.get("error") or ""])  # fmt: skip
    return out.getvalue()


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _fmt(fmt: str, value: Any) -> str:
    if not _finite(value):
        return "–"
    if fmt == "mib":
        return f"{value / 2**20:,.0f} MiB"
    return fmt.format(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- the plot --------------------------------------------------------------------------------------------


def plot_sweep(record: dict[str, Any], axes: list[Axis], sweep_dir: Path, output: Path) -> None:
    """Left: each cell's train loss against steps (validation points as markers). Right: each cell's
    final validation loss (train loss when there is no validation split); failed cells marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    cells = record["cells"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    colors = plt.get_cmap("tab10")
    for i, cell in enumerate(cells):
        rows = read_metrics(sweep_dir / cell["run_dir"] / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
        evals = [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))]
        if train:
            curves.plot(*zip(*train, strict=True), color=colors(i % 10), label=cell["cell"])
        if evals:
            curves.plot(*zip(*evals, strict=True), color=colors(i % 10), marker="o", linestyle=":")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("loss (nats per loss token)")
    curves.set_title("train loss (line), validation loss (dots)", fontsize=10)
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=7)
    validation = any(_finite(c.get("validation_loss")) for c in cells)
    key = "validation_loss" if validation else "train_loss_final"
    heights = [c.get(key) if _finite(c.get(key)) else 0.0 for c in cells]
    positions = range(len(cells))
    drawn = bars.bar(positions, heights, color=[colors(i % 10) for i in positions])
    bars.bar_label(drawn, labels=[f"{h:.4g}" if h else "" for h in heights], fontsize=7)
    for i, cell in enumerate(cells):
        if not _finite(cell.get(key)):
            bars.text(i, 0, cell["status"], ha="center", va="bottom", rotation=90, fontsize=8)
    bars.set_xticks(list(positions), [c["cell"] for c in cells], rotation=30, ha="right", fontsize=7)
    bars.set_ylabel("final validation loss" if validation else "final train loss")
    bars.set_title(f"{' x '.join(a.key for a in axes)}", fontsize=10)
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
