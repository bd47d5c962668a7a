"""The resume contract: `--resume` continues the same training, or refuses.

The new resolved recipe, the data, the base weights, the tokenizer with its chat template and the number
of processes are compared with what the run recorded. Any difference that changes what is trained is
refused, listing every differing key with its old and new value. Only the keys in MAY_CHANGE may differ:
they extend the run or change how it is watched, not what it learns. What changed, and at which step, is
recorded in run.json's "resumes".
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.model.fingerprint import fingerprint_matches
from loratool.recipe import Recipe, recipe_to_dict
from loratool.rundir.metrics import trim_metrics
from loratool.rundir.outputs import remove_entry
from loratool.rundir.records import ADAPTER_FILES, STAGING, RunDir, RunRecord, checkpoint_problem, read_run
from loratool.train.elastic import elastic_launch

# Keys that may change on resume: how long to train (to extend a finished run) and how it is logged,
# evaluated, checkpointed and reported. Everything else changes what the adapter learns.
MAY_CHANGE = (
    "training.max_steps",
    "training.num_train_epochs",
    "training.logging_steps",
    "training.logging_first_step",
    "training.eval_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.report_to",
    "training.early_stopping_patience",
    "training.early_stopping_threshold",
    "training.disable_tqdm",
    "training.dataloader_num_workers",
    "training.ddp_timeout",  # how long a process waits for the others: not what the run learns
)
# Compared by content below rather than by the path written in the recipe: the same file reached from
# another working directory, or the run's own recipe.yaml, must not count as a change.
COMPARED_BY_CONTENT = ("base_model", "training.output_dir", "data.chat_template")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"training.learning_rate": 1e-4, "data.train.0.path": ...} from a nested recipe mapping."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}{index}."))
        return flat
    return {prefix.rstrip("."): value}


def _is_source_path(key: str) -> bool:
    parts = key.split(".")
    return (
        len(parts) == 4 and parts[0] == "data" and parts[1] in ("train", "validation") and parts[3] == "path"
    )


def check_resume(
    record: RunRecord,
    new_recipe: dict[str, Any],
    *,
    data: dict[str, Any],
    base_fingerprint_matches: bool | None,
    base_fingerprint: str | None,
    tokenizer_sha256: str | None,
    world_size: int,
    effective_batch_size: int,
) -> dict[str, list[Any]]:
    """The allowed changes ({key: [old, new]}); raises LoratoolError listing every refused difference."""
    old_recipe = record.recipe_dict()
    if old_recipe is None:
        raise LoratoolError(
            f"--resume: {record.path} has no readable recipe.yaml to compare with",
            hint="start a new run instead (--overwrite, or another training.output_dir)",
        )
    old, new = flatten(old_recipe), flatten(new_recipe)
    refused: list[str] = []
    allowed: dict[str, list[Any]] = {}
    for key in sorted(set(old) | set(new)):
        if key in COMPARED_BY_CONTENT or _is_source_path(key):
            continue
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key in MAY_CHANGE:
            allowed[key] = [before, after]
        else:
            refused.append(f"{key}: {before!r} -> {after!r}")
    refused += _data_differences(record.data, data)
    if base_fingerprint_matches is False:
        refused.append(
            f"base model weights: fingerprint {_short(record.base_model.fingerprint)} -> {_short(base_fingerprint)}"
        )
    if record.tokenizer_sha256 and tokenizer_sha256 and record.tokenizer_sha256 != tokenizer_sha256:
        refused.append(
            f"tokenizer / chat template: sha256 {record.tokenizer_sha256[:12]}… -> {tokenizer_sha256[:12]}…"
        )
    if record.world_size is not None and record.world_size != world_size:
        # Another number of processes changes the global batch and which rows each step sees, and the
        # checkpoint's data order and RNG states belong to the old layout: refused rather than guessed.
        refused.append(f"processes (world size): {record.world_size} -> {world_size}")
    elif record.effective_batch_size is not None and record.effective_batch_size != effective_batch_size:
        refused.append(f"effective batch size: {record.effective_batch_size} -> {effective_batch_size}")
    if refused:
        lines = "\n".join(f"  - {line}" for line in refused)
        raise LoratoolError(
            f"--resume: this would not continue the same training in {record.path}; what differs from the "
            f"run's record:\n{lines}",
            hint="resume with the run's own recipe (loratool train "
            f"{record.path / 'recipe.yaml'} --resume); only these may change: {', '.join(MAY_CHANGE)}. "
            "To train differently, start a new run (another training.output_dir, or --overwrite)",
        )
    return allowed


def _data_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The data sources' content (sha256 or hub fingerprint) and the chat template, split by split; the
    same content under another path is the same data."""
    problems = []
    for split in ("train", "validation"):
        before = (old.get(split) or {}).get("sources") or []
        after = (new.get(split) or {}).get("sources") or []
        if [_content(s) for s in before] != [_content(s) for s in after]:
            problems.append(f"data.{split}: {_describe(before)} -> {_describe(after)}")
    if old.get("chat_template_sha256") != new.get("chat_template_sha256"):
        problems.append(
            f"chat template: {old.get('chat_template')!r} -> {new.get('chat_template')!r} (different content)"
        )
    return problems


def _content(source: dict[str, Any]) -> str:
    fingerprint = source.get("fingerprint") or {}
    if isinstance(fingerprint, dict):
        return str(fingerprint.get("sha256") or {k: v for k, v in fingerprint.items() if k != "path"})
    return str(fingerprint)


def _describe(sources: list[dict[str, Any]]) -> str:
    shown = [f"{s.get('path')} (content {_content(s)[:12]}…)" for s in sources]
    return "[" + ", ".join(shown) + "]" if shown else "none"


def _short(fingerprint: str | None) -> str:
    return f"{fingerprint[:24]}…" if fingerprint else "none"


def tokenizer_sha256(tokenizer: Any) -> str:
    """A fingerprint of what tokenization and the chat template do: the tokenizer's full definition
    (vocabulary, merges, normalizer, special tokens) and the template text."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(repr(template).encode())
    return digest.hexdigest()


# --- continuing the run directory ---------------------------------------------------------------------


def resume_point(
    recipe: Recipe, run: RunDir, new: RunRecord, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and what the resume changes (run.json "resumes" entry), or a
    LoratoolError listing every difference between the run's record and `new` that would make it a
    different training (check_resume)."""
    record = read_run(run.path)
    assert record is not None  # RunDir.prepare refused anything else
    checkpoint, skipped = run.latest_checkpoint()
    assert checkpoint is not None
    base = new.base_model
    matches = None
    if record.base_model.fingerprint and base.resolved_path:
        matches = fingerprint_matches(Path(base.resolved_path), record.base_model.fingerprint)
    changes = check_resume(
        record,
        recipe_to_dict(recipe),
        data=new.data,
        base_fingerprint_matches=matches,
        base_fingerprint=base.fingerprint,
        tokenizer_sha256=new.tokenizer_sha256,
        world_size=new.world_size,
        effective_batch_size=new.effective_batch_size,
    )
    problems = {path: checkpoint_problem(path) or "" for path in skipped}
    incomplete = [p for p, why in problems.items() if why.startswith("incomplete")]
    if incomplete:
        log(
            f"note: skipping incomplete checkpoint{'s' if len(incomplete) > 1 else ''} "
            f"{', '.join(p.name for p in incomplete)} (interrupted while saving)"
        )
    for path, why in problems.items():
        if path not in incomplete:
            log(f"note: skipping checkpoint {path.name}: {why}")
    log(f"resuming from {checkpoint.name}")
    for key, (before, after) in changes.items():
        log(f"  {key}: {before!r} -> {after!r}")
    entry = {
        "from_checkpoint": checkpoint.name,
        "step": int(checkpoint.name.split("-")[-1]),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changed": changes,
        "skipped_incomplete_checkpoints": [p.name for p in skipped],
        "command": sys.argv,
    }
    launch = elastic_launch()
    if launch is not None and launch["restart"]:
        entry["elastic_restart"] = launch["restart"]  # torchrun restarted the group after a failure
    return checkpoint, entry


def continue_run(run: RunDir, new: RunRecord, entry: dict[str, Any], log: Callable[[str], None]) -> RunRecord:
    """Make the run directory ready to continue from entry's checkpoint: the finished adapter (if any)
    is superseded, incomplete checkpoints go, metrics.jsonl keeps only the steps up to the checkpoint, and
    run.json records this resume next to the earlier ones."""
    for name in (*ADAPTER_FILES, STAGING):
        path = run.path / name
        if path.is_symlink() or path.exists():
            remove_entry(path)
    run.remove_incomplete_checkpoints()
    dropped = trim_metrics(run.metrics, entry["step"])
    if dropped:
        log(
            f"metrics.jsonl: dropped {dropped} line(s) logged after {entry['from_checkpoint']} (retrained now)"
        )
    record = read_run(run.path)
    assert record is not None
    continued = replace(
        new,
        started_at=record.started_at or new.started_at,
        resumes=[*record.resumes, entry],
        status="running",
    )
    run.write_manifest(continued)
    return continued
