"""The run directory: a standard PEFT adapter directory that also describes how it was made.

    out/
      adapter_config.json, adapter_model.safetensors, README.md   the adapter (PeftModel.from_pretrained)
      tokenizer.json, tokenizer_config.json, chat_template.jinja  the tokenizer, with the template trained on
      recipe.yaml       the resolved recipe, every default filled in (re-runnable as is)
      run.json          the record: status, versions, base model + fingerprint, data, hardware, resumes...
      train.log         everything the run printed, library warnings included
      metrics.jsonl     one line per logged step (loss, learning rate, eval loss, ...)
      loss_curve.png    training and validation loss against optimizer steps
      checkpoints/      trainer checkpoints, for --resume
      traceback.txt     only after a failure: the full traceback

This module owns run.json: train writes it through RunDir, and every other command reads it through
`read_run` (a typed RunRecord; `RunRecord.from_dict` for the record train is still building, as the model
card does), and the run's recipe through `RunRecord.recipe()` (validated) or `recipe_dict()` (as written).
`find_adapter` and `read_training_run` are how merge, export and generate find an adapter and
what its run says about it. A directory is a loratool run only when its run.json carries loratool's marker (see
outputs.py), and `--overwrite` removes only the names run.json lists as written by the run.

Crash safety: recipe.yaml and run.json ("status": "running") are written first, so the directory is known
as a loratool run from the start; the adapter and tokenizer are written to a hidden staging folder and
moved into place only when training has finished, run.json last. An interrupted run therefore never has
adapter files at its root, and its run.json says "running" or "failed".
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from loratool.adapter.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_files, is_adapter_dir
from loratool.errors import LoratoolError
from loratool.recipe import Recipe, load_recipe
from loratool.rundir.outputs import (
    MARKER,
    check_writable,
    known_fields,
    marker,
    owned_record,
    read_json,
    remove_entry,
    remove_owned,
    write_json_atomic,
)

KIND = "run"
MANIFEST = "run.json"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
LOG = "train.log"
TRACEBACK = "traceback.txt"
LOSS_CURVE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
STAGING = ".finishing"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Written into a checkpoint by the trainer callback (checkpoints.py) once everything else in it is saved:
# a checkpoint without it is incomplete (a crash or a full disk mid-save) and is never resumed from.
CHECKPOINT_SEAL = "loratool-checkpoint.json"


# --- reading: the one reader of run.json ----------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelRecord:
    """The base a run trained on (run.json "base_model")."""

    id: str | None = None
    revision: str | None = None
    resolved_path: str | None = None
    fingerprint: str | None = None
    quantization: str | None = None  # "4bit", "8bit" or None
    gguf: dict[str, Any] | None = None  # a .gguf base: its file, sha256 and conversion (absent otherwise)

    @classmethod
    def from_dict(cls, value: Any) -> BaseModelRecord:
        known = known_fields(cls, value)
        known["gguf"] = _dict_or_none(known.get("gguf"))
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """As run.json has it: `gguf` only for a .gguf base."""
        value = asdict(self)
        if self.gguf is None:
            del value["gguf"]
        return value


@dataclass(frozen=True)
class RunRecord:
    """run.json, as read back: a typed field for every key train writes (train/record.py). `raw` keeps the
    object as read, for records that copy it whole and for keys a newer loratool added."""

    path: Path
    status: str | None  # running, failed or complete
    error: str | None = None  # why a failed run stopped
    base_model: BaseModelRecord = field(default_factory=BaseModelRecord)
    data: dict[str, Any] = field(default_factory=dict)  # the data summary (data/summary.py)
    train: dict[str, Any] = field(default_factory=dict)  # the figures: steps, losses, tokens, seconds
    world_size: int | None = None
    effective_batch_size: int | None = None
    # torchrun's launch: run_id (its --rdzv-id), restart (attempts after a failure), max_restarts
    launch: dict[str, Any] | None = None
    tokenizer_sha256: str | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)  # process_rss, cuda_allocated (GPU)
    wall_time_s: float | None = None
    adapter_init: dict[str, Any] = field(default_factory=dict)  # a non-default init (lora_init.py)
    loratool_version: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)  # the libraries that trained it
    python: str | None = None
    command: list[str] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    hardware: dict[str, Any] = field(default_factory=dict)  # model/hardware.py Hardware, and the platform
    stage: str | None = None  # sft, dpo, kto, reward, ... (the recipe's method section)
    dpo: dict[str, Any] | None = None  # a DPO run: beta, loss_type, reference, init_adapter
    kto: dict[str, Any] | None = None  # a KTO run: beta, loss_type, weights, reference, init_adapter
    reward: dict[str, Any] | None = None  # a reward model: center_rewards_coefficient, head
    grpo: dict[str, Any] | None = None  # an online RL run (GRPO): its settings, rewards, reference
    rloo: dict[str, Any] | None = None  # the same for RLOO
    smoke: dict[str, Any] | None = None  # a `train --smoke` run: the base it stands in for, what changed
    adalora: dict[str, Any] | None = None  # an AdaLoRA run: its rank budget and final ranks
    memory_savers: dict[str, Any] = field(default_factory=dict)  # train/memory: each switch, why one is off
    files: list[str] = field(default_factory=list)  # the top-level names the run wrote
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: dict[str, Any], path: Path) -> RunRecord:
        """A run.json object (or the record train is still building) as a RunRecord; a value of the wrong
        type reads as absent."""
        return cls(
            path=path,
            status=record.get("status"),
            error=record.get("error"),
            base_model=BaseModelRecord.from_dict(record.get("base_model")),
            data=_dict(record.get("data")),
            train=_dict(record.get("train")),
            world_size=record.get("world_size"),
            effective_batch_size=record.get("effective_batch_size"),
            launch=_dict_or_none(record.get("launch")),
            tokenizer_sha256=record.get("tokenizer_sha256"),
            resumes=list(record.get("resumes") or []),
            peak_memory_bytes=_dict(record.get("peak_memory_bytes")),
            wall_time_s=record.get("wall_time_s"),
            adapter_init=_dict(record.get("adapter_init")),
            loratool_version=record.get("loratool_version"),
            versions=_dict(record.get("versions")),
            python=record.get("python"),
            command=list(record.get("command") or []),
            started_at=record.get("started_at"),
            finished_at=record.get("finished_at"),
            hardware=_dict(record.get("hardware")),
            stage=record.get("stage"),
            dpo=_dict_or_none(record.get("dpo")),
            kto=_dict_or_none(record.get("kto")),
            reward=_dict_or_none(record.get("reward")),
            grpo=_dict_or_none(record.get("grpo")),
            rloo=_dict_or_none(record.get("rloo")),
            smoke=_dict_or_none(record.get("smoke")),
            adalora=_dict_or_none(record.get("adalora")),
            memory_savers=_dict(record.get("memory_savers")),
            files=list(record.get("files") or []),
            raw=record,
        )

    def to_dict(self) -> dict[str, Any]:
        """The run.json object (without the ownership marker and "files", which RunDir adds): what is known
        before training first, the figures after; a section the run does not have is left out."""
        value: dict[str, Any] = {
            "loratool_version": self.loratool_version,
            "versions": self.versions,
            "python": self.python,
            "command": self.command,
            "started_at": self.started_at,
            "base_model": self.base_model.to_dict(),
            "hardware": self.hardware,
            "world_size": self.world_size,
            "effective_batch_size": self.effective_batch_size,
            "launch": self.launch,
            "tokenizer_sha256": self.tokenizer_sha256,
            "data": self.data,
            "stage": self.stage,
            "dpo": self.dpo,
            "kto": self.kto,
            "reward": self.reward,
            "grpo": self.grpo,
            "rloo": self.rloo,
            "smoke": self.smoke,
            "adapter_init": self.adapter_init,
            "memory_savers": self.memory_savers,
            "resumes": self.resumes,
            "train": self.train,
            "adalora": self.adalora,
            "peak_memory_bytes": self.peak_memory_bytes,
            "wall_time_s": self.wall_time_s,
            "finished_at": self.finished_at,
            "status": self.status,
            "error": self.error,
        }
        optional = {"launch", "dpo", "kto", "reward", "grpo", "rloo", "smoke", "adapter_init", "memory_savers", "resumes", "train", "adalora", "peak_memory_bytes",
                    "wall_time_s", "finished_at", "error"}  # fmt: skip
        return {k: v for k, v in value.items() if k not in optional or v not in (None, {}, [])}

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def recipe_dict(self) -> dict[str, Any] | None:
        """recipe.yaml exactly as the run wrote it (every default filled in), or None when missing or
        unreadable: for comparing recipes key by key (resume, sweep)."""
        try:
            value = yaml.safe_load((self.path / RECIPE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return value if isinstance(value, dict) else None

    def load_recipe(self) -> Recipe:
        """recipe.yaml, validated; a LoratoolError listing every problem when it is missing or no longer
        validates (a run of another loratool version)."""
        return load_recipe(self.path / RECIPE)

    def recipe(self, log: Callable[[str], None] | None = None) -> Recipe | None:
        """The run's recipe, validated: None when recipe.yaml is missing or unreadable, or when it no longer
        validates (then `log` gets a note saying why)."""
        if self.recipe_dict() is None:
            return None
        try:
            return self.load_recipe()
        except LoratoolError as exc:
            if log is not None:
                log(f"note: the run's recipe.yaml no longer validates ({exc.message.splitlines()[0]})")
            return None


def read_run(path: Path) -> RunRecord | None:
    """The record of the loratool run in `path`, or None when `path` holds no loratool run.json."""
    record = owned_record(path, MANIFEST, KIND)
    return RunRecord.from_dict(record, path) if record is not None else None


def has_run_record(path: Path) -> bool:
    """Whether `path` holds a run.json at all (loratool's, an older loratool's or another tool's)."""
    return (path / MANIFEST).is_file()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


# --- writing -------------------------------------------------------------------------------------------


@dataclass
class RunDir:
    path: Path
    files: set[str] = field(default_factory=set)  # top-level names this run wrote (run.json "files")
    removed_incomplete: list[str] = field(default_factory=list)  # checkpoints removed after a failure

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @classmethod
    def prepare(
        cls,
        output_dir: str | Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        dry_run: bool = False,
        log: Callable[[str], None] = print,
    ) -> RunDir:
        """Check what is already at output_dir and make it ready, refusing anything that would lose work.

        With dry_run the same checks run but nothing on disk changes."""
        given = Path(output_dir).expanduser()
        check_writable(given.absolute(), "training.output_dir")
        run = cls(given.resolve())  # a link to a directory elsewhere: the run lives where it points
        if resume and overwrite:
            raise LoratoolError("--resume and --overwrite contradict each other", hint="pass one of them")
        if run.path.exists() and not run.path.is_dir():
            raise LoratoolError(
                f"training.output_dir {given} is a file, not a directory",
                hint="set training.output_dir to a new or empty directory (e.g. --set training.output_dir=out/run2)",
            )
        state = run.state()
        if state in ("foreign", "legacy"):
            what = (
                "holds a run.json that loratool did not write (or an older loratool, without its marker)"
                if state == "legacy"
                else "is not empty and is not a loratool run directory"
            )
            raise LoratoolError(
                f"training.output_dir {run.path} {what}",
                hint="choose a new or empty directory (loratool never deletes files it did not write)",
            )
        if resume:
            checkpoint, _ = run.latest_checkpoint()
            if checkpoint is None:
                raise LoratoolError(
                    f"--resume: {run.path} has no complete checkpoint to resume from",
                    hint="drop --resume to start a new run there (add --overwrite if it holds a previous run)",
                )
            run.files = set(owned_record(run.path, MANIFEST, KIND)["files"])  # type: ignore[index]
            return run
        if state == "finished" and not overwrite:
            raise LoratoolError(
                f"training.output_dir {run.path} already holds a finished run",
                hint="pass --overwrite to replace it, --resume to continue it from its last checkpoint, or "
                "set another training.output_dir (e.g. --set training.output_dir=out/run2)",
            )
        if state == "unfinished" and not overwrite:
            checkpoint, _ = run.latest_checkpoint()
            resume_hint = f"--resume to continue from {checkpoint.name}, " if checkpoint else ""
            raise LoratoolError(
                f"training.output_dir {run.path} holds a run that did not finish",
                hint=f"pass {resume_hint}--overwrite to start over, or set another training.output_dir",
            )
        if dry_run:
            return run
        if overwrite and state in ("finished", "unfinished"):
            remove_owned(run.path, MANIFEST, KIND, log)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def state(self) -> str:
        """new (absent or empty), finished, unfinished (a loratool run that stopped early), legacy (a
        run.json without loratool's marker) or foreign."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return "new"
        if not self.path.is_dir():
            return "foreign"
        record = read_run(self.path)
        if record is None:
            return "legacy" if has_run_record(self.path) else "foreign"
        finished = record.complete and all((self.path / f).is_file() for f in ADAPTER_FILES)
        return "finished" if finished else "unfinished"

    def latest_checkpoint(self) -> tuple[Path | None, list[Path]]:
        """The newest checkpoint that can be resumed from, and the newer ones skipped: incomplete (no seal)
        or damaged since (a file the seal lists is missing or changed); `checkpoint_problem` says which."""
        found = [p for p in self.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        skipped = []
        for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
            if checkpoint_problem(path) is None:
                return path, skipped
            skipped.append(path)
        return None, skipped

    def start(self, resolved_recipe: dict[str, Any], record: RunRecord) -> None:
        self.files |= {MANIFEST, RECIPE, METRICS, LOG, CHECKPOINTS, STAGING}
        self.write_manifest(replace(record, status="running"))  # first: it marks the directory as ours
        self.write_recipe(resolved_recipe)

    def write_recipe(self, resolved_recipe: dict[str, Any]) -> None:
        tmp = self.path / f".{RECIPE}.tmp"
        tmp.write_text(yaml.safe_dump(resolved_recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
        os.replace(tmp, self.path / RECIPE)

    def write_manifest(self, record: RunRecord) -> None:
        """run.json: the record, loratool's ownership marker and the names this run wrote."""
        write_json_atomic(
            self.path / MANIFEST, {MARKER: marker(KIND), **record.to_dict(), "files": sorted(self.files)}
        )

    def fail(self, record: RunRecord, error: BaseException) -> str:
        """Record the failure: traceback.txt, and run.json "failed" with the cause. On a full disk, the
        incomplete checkpoint being written is removed first, so that there is room to say so."""
        if is_disk_full(error) or is_file_too_large(error):
            self.remove_incomplete_checkpoints()
        if isinstance(error, KeyboardInterrupt):
            reason = str(error) if str(error).startswith("terminated") else "interrupted"
        else:
            reason = f"{type(error).__name__}: {error}"
        try:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            (self.path / TRACEBACK).write_text(text, encoding="utf-8")
            self.files.add(TRACEBACK)
        except OSError:
            pass
        failed = replace(record, status="failed", error=reason[:2000])
        try:
            self.write_manifest(failed)
        except OSError:
            # Still no room (the failure did not look like a full disk): the unfinished checkpoint is
            # useless anyway, so make room with it and try once more.
            self.remove_incomplete_checkpoints()
            try:
                self.write_manifest(failed)
            except OSError:
                pass  # run.json keeps "running", which is also not "complete"
        return reason

    def remove_incomplete_checkpoints(self) -> list[str]:
        """Remove the checkpoints newer than the newest complete one (they cannot be resumed from)."""
        _, skipped = self.latest_checkpoint()
        for path in skipped:
            shutil.rmtree(path, ignore_errors=True)
        self.removed_incomplete += [p.name for p in skipped]
        return [p.name for p in skipped]

    def finish(self, write_outputs: Callable[[Path], None], record: RunRecord) -> None:
        """Write the adapter & co. into staging with `write_outputs(dir)`, then move them into place."""
        staging = self.path / STAGING
        if staging.exists() or staging.is_symlink():
            remove_entry(staging)
        staging.mkdir()
        write_outputs(staging)
        names = sorted(p.name for p in staging.iterdir())
        self.files |= set(names)
        self.write_manifest(replace(record, status="running"))  # the names are ours before they land
        # Adapter weights before their config: a directory with weights but no adapter_config.json is
        # not loadable, so no interruption point leaves something that looks like a finished adapter.
        order = [n for n in names if n not in ADAPTER_FILES] + [
            n for n in reversed(ADAPTER_FILES) if n in names
        ]
        for name in order:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        staging.rmdir()
        self.write_manifest(replace(record, status="complete"))


def is_disk_full(error: BaseException) -> bool:
    """A full disk or quota, however the library that was writing reports it (an OSError from Python, a
    RuntimeError from torch.save, a SafetensorError from safetensors)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def is_file_too_large(error: BaseException) -> bool:
    """A file-size limit hit while writing (`ulimit -f`, a file system's largest file): EFBIG, however the
    writing library reports it. Python ignores SIGXFSZ, so the write fails instead of killing the process."""
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return True
    return "File too large" in str(error)


def read_checkpoint_seal(checkpoint: Path) -> dict[str, Any]:
    """What the run's totals were when `checkpoint` was saved (see train/checkpoints.py)."""
    return read_json(checkpoint / CHECKPOINT_SEAL)


SEAL_HASH_LIMIT = 1 << 20  # files up to 1 MiB (trainer_state.json, configs) are hashed too, larger ones sized


def checkpoint_files(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Every file of a saved checkpoint with its size, and the sha256 of the small ones: the seal's list."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_SEAL):
        size = path.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= SEAL_HASH_LIMIT:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files[path.relative_to(checkpoint).as_posix()] = entry
    return files


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None: it must be sealed, and every file its seal lists
    must be there with the size (and, for small files, the content) it had when it was saved."""
    if not (checkpoint / CHECKPOINT_SEAL).is_file():
        return "incomplete (interrupted while saving)"
    listed = read_checkpoint_seal(checkpoint).get("files")
    if not isinstance(listed, dict):
        return None  # sealed by a loratool that did not list the files: nothing more to check
    for name, saved in sorted(listed.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"damaged since it was saved ({name} is missing)"
        if path.stat().st_size != saved.get("size"):
            return (
                f"damaged since it was saved ({name} is {path.stat().st_size} bytes, was {saved.get('size')})"
            )
        if saved.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != saved["sha256"]:
            return f"damaged since it was saved ({name} changed)"
    return None


# --- an adapter and the run that trained it (merge, export, generate) --------------------------------


@dataclass(frozen=True)
class TrainingRun:
    """What a loratool run directory says about the adapter; empty for an adapter from another tool. For a
    checkpoint of a run (RUN/checkpoints/checkpoint-N, or a sealed one copied elsewhere) it is the run's
    record, with the base fingerprint the checkpoint's seal carries."""

    record: RunRecord | None  # run.json, read by read_run (a checkpoint: its run's, when it is still there)
    recipe: Recipe | None  # recipe.yaml, validated (None: no run, no recipe.yaml, or it no longer validates)
    checkpoint: Path | None = None  # the adapter is this checkpoint of a loratool run
    checkpoint_problem: str | None = None  # why it is not to be trusted (unsealed, damaged)
    sealed_fingerprint: str | None = None  # the base fingerprint its seal carries

    @property
    def base(self) -> BaseModelRecord:
        base = self.record.base_model if self.record is not None else BaseModelRecord()
        # The seal names the weights this checkpoint was trained on (run.json may describe a later resume).
        return replace(base, fingerprint=self.sealed_fingerprint) if self.sealed_fingerprint else base

    @property
    def fingerprint_source(self) -> str:
        """Which record the base fingerprint comes from, as messages name it."""
        if self.checkpoint is not None and self.sealed_fingerprint:
            return f"{self.checkpoint.name}'s seal ({CHECKPOINT_SEAL})"
        return MANIFEST

    @property
    def quantization(self) -> str | None:
        return self.base.quantization

    @property
    def hardware(self) -> dict[str, Any]:
        """The hardware the run trained on (run.json), {} for an adapter from another tool."""
        return self.record.hardware if self.record is not None else {}


def find_adapter(path: Path) -> Path:
    """The adapter directory PATH names (a run directory or any PEFT adapter), or a clear error."""

    path = path.expanduser().resolve()
    if not path.is_dir():
        raise LoratoolError(
            f"adapter directory not found: {path}",
            hint="pass --adapter the output_dir of a finished `loratool train` run, or any PEFT LoRA adapter "
            f"directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})",
        )
    if is_adapter_dir(path):
        check_adapter_files(path)
        return path
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / f).is_file()]
    hint = f"pass a directory that holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
    record = read_run(path)
    if record is not None and not record.complete:
        hint = (
            f"run.json says the training run is {record.status!r}: the adapter is written only when "
            "training finishes"
        )
    elif (path / "adapter_model.bin").is_file():
        hint = "the adapter is saved as a pickle (adapter_model.bin); save it again with safetensors"
    raise LoratoolError(
        f"{path} is not a LoRA adapter directory: {' and '.join(missing)} missing "
        f"(it has: {', '.join(present) or 'nothing'})",
        hint=hint,
    )


def read_training_run(adapter_dir: Path, log: Callable[[str], None] | None = None) -> TrainingRun:
    """What the run directory around an adapter says (empty for an adapter from another tool); `log` gets
    a note when its recipe.yaml no longer validates."""
    record = read_run(adapter_dir)
    if record is not None:
        return TrainingRun(record, record.recipe(log))
    run_dir = run_of_checkpoint(adapter_dir)
    if run_dir is None and not (adapter_dir / CHECKPOINT_SEAL).is_file():
        return TrainingRun(None, None)  # an adapter from another tool (or a trainer checkpoint of one)
    record = read_run(run_dir) if run_dir is not None else None
    sealed = read_checkpoint_seal(adapter_dir).get("base_fingerprint")
    return TrainingRun(
        record,
        record.recipe(log) if record is not None else None,
        checkpoint=adapter_dir,
        checkpoint_problem=checkpoint_problem(adapter_dir),
        sealed_fingerprint=sealed if isinstance(sealed, str) and sealed else None,
    )


def run_of_checkpoint(path: Path) -> Path | None:
    """The loratool run directory `path` is a checkpoint of (RUN/checkpoints/checkpoint-N), or None."""
    if not re.fullmatch(r"checkpoint-\d+", path.name) or path.parent.name != CHECKPOINTS:
        return None
    run_dir = path.parent.parent
    return run_dir if read_run(run_dir) is not None else None
