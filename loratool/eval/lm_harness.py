"""`loratool eval --lm-eval-tasks`: lm-evaluation-harness tasks on the model eval already holds.

The task specs are checked, and the tasks loaded (their datasets read or downloaded), before any model
loads: an unknown task or a hub-only dataset on an offline machine fails in seconds, not after the loss
and generation pass. A task is a registered name (lm-eval's own, or one from a folder given with
`--lm-eval-include`) or the path of a task YAML file. The numbers are exactly lm-eval's own: HFLM is
handed the loaded model (with the adapter; under `--compare-base`, with the adapter switched off too).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError

SKIPPED_METRIC_PARTS = ("stderr", "alias", "samples")


@dataclass
class HarnessTasks:
    """The checked task specs and the lm-eval TaskManager that resolves them."""

    specs: list[str]
    include: Path | None
    limit: int | None
    manager: Any

    def settings(self) -> dict[str, Any]:
        return {
            "tasks": self.specs,
            "include": str(self.include) if self.include else None,
            "limit": self.limit,
        }


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LoratoolError(
            "--lm-eval-tasks needs lm-evaluation-harness, which is not installed",
            hint="pip install 'loratool[lm-eval]' (its tasks download their datasets: run once online, or "
            "point HF_DATASETS_CACHE at a cache that has them)",
        ) from None


def prepare_tasks(
    specs: list[str], include: Path | None, limit: int | None, log: Callable[[str], None] = print
) -> HarnessTasks:
    """Check every spec and load its tasks, before any model loads; a LoratoolError names each problem."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include is not None and not include.exists():
        raise LoratoolError(
            f"--lm-eval-include: not found: {include}", hint="give a folder of lm-eval task YAML files"
        )
    manager = TaskManager(include_path=str(include) if include else None)
    known = set(manager.all_tasks)
    unknown = [s for s in specs if s not in known and not _is_task_file(s)]
    if unknown:
        lines = []
        for spec in unknown:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3, cutoff=0.6)
            lines.append(f"{spec}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f"lm-eval's own tasks or {include}" if include else "lm-eval's own tasks"
        raise LoratoolError(
            f"--lm-eval-tasks: unknown task(s), not among {where} nor a task YAML file: {'; '.join(lines)}",
            hint="`lm_eval ls tasks` lists the registered names; a custom task is the path of its YAML file, "
            "or its name with --lm-eval-include FOLDER (the folder holding its YAML)",
        )
    log(f"lm-evaluation-harness: loading {', '.join(specs)}")
    for spec in specs:
        try:
            manager.load([spec])
        except Exception as exc:  # lm-eval and datasets raise many kinds: a dataset offline, a bad YAML
            raise LoratoolError(
                f"--lm-eval-tasks: task '{spec}' cannot be loaded: {_first_line(exc)}",
                hint="its dataset must be readable: on a machine without network it must be in the "
                "Hugging Face cache with HF_HUB_OFFLINE=1 set (run it once online), or the task's YAML "
                "must point at local files (dataset_path: json, dataset_kwargs: {data_files: ...})",
            ) from None
    return HarnessTasks(specs, include, limit, manager)


def _is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).expanduser().is_file()


def run_tasks(
    model: Any, tokenizer: Any, tasks: HarnessTasks, batch: int, log: Callable[[str], None], label: str
) -> dict[str, Any]:
    """lm-eval's `results` for the model in memory (HFLM accepts a model object)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    log(f"  {label}: lm-evaluation-harness {', '.join(tasks.specs)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
    results = simple_evaluate(model=lm, tasks=tasks.specs, limit=tasks.limit, task_manager=tasks.manager)
    return json.loads(json.dumps((results or {}).get("results", {}), default=str))


def metric_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Model names and one row per (task, metric): `task metric`, then each model's value."""
    harness = record.get("lm_eval") or {}
    models = harness.get("models") or {}
    names = [n for n in ("base", "tuned") if n in models]
    rows: list[list[str]] = []
    seen: list[tuple[str, str]] = []
    for name in names:
        for task, metrics in models[name].items():
            for key, value in metrics.items():
                if isinstance(value, int | float) and not any(p in key for p in SKIPPED_METRIC_PARTS):
                    if (task, key) not in seen:
                        seen.append((task, key))
    for task, key in seen:
        values = []
        for name in names:
            value = models[name].get(task, {}).get(key)
            stderr = models[name].get(task, {}).get(key.replace(",", "_stderr,", 1))
            text = "–" if not isinstance(value, int | float) else f"{value:.4f}"
            if isinstance(stderr, int | float):
                text += f" ± {stderr:.4f}"
            values.append(text)
        rows.append([f"{task} {key.removesuffix(',none')}", *values])
    return names, rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"
