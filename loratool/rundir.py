"""The run directory: a standard PEFT adapter directory that also describes how it was made.

    out/
      adapter_config.json, adapter_model.safetensors, README.md   the adapter (PeftModel.from_pretrained)
      tokenizer.json, tokenizer_config.json, chat_template.jinja  the tokenizer, with the template trained on
      recipe.yaml       the resolved recipe, every default filled in (re-runnable as is)
      run.json          manifest: status, versions, base model + fingerprint, data counts, hardware, time...
      metrics.jsonl     one line per logged step (loss, learning rate, eval loss, ...)
      loss_curve.png    training and validation loss against optimizer steps
      checkpoints/      trainer checkpoints, for --resume

Crash safety: recipe.yaml and run.json ("status": "running") are written first, so the directory is known
as a loratool run from the start; the adapter and tokenizer are written to a hidden staging folder and
moved into place only when training has finished, run.json last. An interrupted run therefore never has
adapter files at its root, and its run.json says "running" or "failed".
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loratool.errors import LoratoolError

MANIFEST = "run.json"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
STAGING = ".finishing"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @classmethod
    def prepare(
        cls, output_dir: str | Path, *, overwrite: bool = False, resume: bool = False, dry_run: bool = False
    ) -> RunDir:
        """Check what is already at output_dir and make it ready, refusing anything that would lose work.

        With dry_run the same checks run but nothing on disk changes."""
        run = cls(Path(output_dir).expanduser().resolve())
        state = run.state()
        if resume and overwrite:
            raise LoratoolError("--resume and --overwrite contradict each other", hint="pass one of them")
        if state == "foreign":
            raise LoratoolError(
                f"training.output_dir {run.path} is not empty and is not a loratool run directory",
                hint="choose a new or empty directory (loratool never deletes files it did not write)",
            )
        if resume:
            if run.latest_checkpoint() is None:
                raise LoratoolError(
                    f"--resume: {run.path} has no checkpoint to resume from",
                    hint="drop --resume to start a new run there (add --overwrite if it holds a previous run)",
                )
            for name in (*ADAPTER_FILES, STAGING):  # the finished adapter is superseded by the resumed run
                if not dry_run:
                    _remove(run.path / name)
            return run
        if state == "finished" and not overwrite:
            raise LoratoolError(
                f"training.output_dir {run.path} already holds a finished run",
                hint="pass --overwrite to replace it, --resume to continue it from its last checkpoint, or "
                "set another training.output_dir (e.g. --set training.output_dir=out/run2)",
            )
        if state == "unfinished" and not overwrite:
            checkpoint = run.latest_checkpoint()
            resume_hint = f"--resume to continue from {checkpoint.name}, " if checkpoint else ""
            raise LoratoolError(
                f"training.output_dir {run.path} holds a run that did not finish",
                hint=f"pass {resume_hint}--overwrite to start over, or set another training.output_dir",
            )
        if dry_run:
            return run
        if overwrite and state in ("finished", "unfinished"):
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def state(self) -> str:
        """new (absent or empty), finished, unfinished (a loratool run that stopped early) or foreign."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return "new"
        if not self.path.is_dir() or not (self.path / MANIFEST).is_file():
            return "foreign"
        finished = self.read_manifest().get("status") == "complete"
        return (
            "finished" if finished and all((self.path / f).is_file() for f in ADAPTER_FILES) else "unfinished"
        )

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def latest_checkpoint(self) -> Path | None:
        found = [p for p in self.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)

    def start(self, resolved_recipe: dict[str, Any], manifest: dict[str, Any]) -> None:
        (self.path / RECIPE).write_text(yaml.safe_dump(resolved_recipe, sort_keys=False, allow_unicode=True))
        self.write_manifest({**manifest, "status": "running"})

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(tmp, self.path / MANIFEST)

    def fail(self, manifest: dict[str, Any], error: BaseException) -> None:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        self.write_manifest({**manifest, "status": "failed", "error": reason[:2000]})

    def finish(self, write_outputs: Callable[[Path], None], manifest: dict[str, Any]) -> None:
        """Write the adapter & co. into staging with `write_outputs(dir)`, then move them into place."""
        staging = self.path / STAGING
        _remove(staging)
        staging.mkdir()
        write_outputs(staging)
        # Adapter weights before their config: a directory with weights but no adapter_config.json is
        # not loadable, so no interruption point leaves something that looks like a finished adapter.
        names = sorted(p.name for p in staging.iterdir())
        order = [n for n in names if n not in ADAPTER_FILES] + [
            n for n in reversed(ADAPTER_FILES) if n in names
        ]
        for name in order:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        staging.rmdir()
        self.write_manifest({**manifest, "status": "complete"})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
