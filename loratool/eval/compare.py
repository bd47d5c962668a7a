"""`loratool eval A B C ...`: several TARGETs side by side on the same held-out rows (base -> SFT -> RL).

Reads like the comparison: resolve every TARGET and refuse what cannot be compared before anything loads;
decide the rows (`--data`, else the first TARGET's validation file); then, one TARGET at a time (each
loaded, evaluated and let go before the next, so memory holds one model), build the rows with that
TARGET's own chat template and max_length, check they are the rows the first TARGET was evaluated on,
compute loss, answers and the rewards; `--compare-base` adds the base of the first fine-tune, with its
adapter switched off. The report (metrics.json, generations.jsonl, report.md) has one column per model, in
the order given, and is written in one rename. The runs' model cards are left as they are: a comparison
belongs to none of them.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool import __version__
from loratool.errors import LoratoolError
from loratool.eval.report import terminal_summary
from loratool.eval.reward_metrics import RewardInputs, eval_rewards
from loratool.eval.run import (
    METRICS,
    EvalData,
    Evaluated,
    LmEvalRuns,
    build_eval_data,
    check_data_path,
    describe_target,
    difference,
    evaluate_base,
    evaluate_model,
    generation_rows,
    harness_tasks,
    refuse_reward_model_target,
    reward_inputs_for,
    reward_record,
    with_rewards,
    write_outputs,
)
from loratool.generate.run import Sampling, answer_text
from loratool.generate.target import Target, load_target, resolve_target
from loratool.rundir.outputs import check_output, claim_output, library_versions
from loratool.train.rewards import Reward

# Names the generations rows use for their own fields: a TARGET called so is shown as NAME-2.
RESERVED = ("index", "prompt", "reference", "reference_complete")


def run_comparison(
    targets: list[str | Path],
    *,
    data: str | Path | None = None,
    compare_base: bool = False,
    max_samples: int | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    output: str | Path | None = None,
    max_length: int | None = None,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_include: str | Path | None = None,
    lm_eval_limit: int | None = None,
    rewards: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Evaluate each TARGET on the same rows and write one report with a column per model (the options
    are run_eval's)."""
    started = time.time()
    resolved = [resolve_target(t) for t in targets]
    tuned = check_targets(resolved, compare_base)
    names = column_names(resolved, compare_base)
    data_path = comparison_data(resolved, data, log)
    out = comparison_output(resolved, names, output)
    scorers = eval_rewards(rewards or [], resolved, log)
    lm_tasks = harness_tasks(lm_eval_tasks, lm_eval_include, lm_eval_limit, log)  # before any model loads
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    with claim_output(out, kind="eval", record_name=METRICS, overwrite=True, log=log) as claimed:
        done = Evaluations(data_path, sampling, scorers, LmEvalRuns(lm_tasks, 8, log), log)
        for target, name in zip(resolved, names, strict=True):
            done.add(target, name, max_samples, max_length, with_base=target is tuned)
        columns = (["base"] if tuned is not None else []) + names
        record = done.record(columns, max_samples)
        generations = done.generations(columns)
        record["wall_time_s"] = round(time.time() - started, 2)
        write_outputs(claimed, record, generations, None, log)
        for line in terminal_summary(record, generations):
            log(line)
    log(f"report written to {out}")
    done.lm_eval.raise_failure(out)
    return out


@dataclass
class Evaluations:
    """What the TARGETs evaluated so far gave: each model's numbers and answers, and the rows of the
    first, which every later TARGET must match."""

    data: Path
    sampling: Sampling
    rewards: list[Reward]
    lm_eval: LmEvalRuns
    log: Callable[[str], None]
    results: dict[str, Evaluated] = field(default_factory=dict)
    described: list[dict[str, Any]] = field(default_factory=list)
    first: tuple[str, EvalData, list[str], Any, list[str]] | None = (
        None  # name, rows, references, tokenizer, stop texts
    )
    inputs: RewardInputs | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def add(
        self, target: Target, name: str, max_samples: int | None, max_length: int | None, with_base: bool
    ) -> None:
        """Load TARGET, build the rows with its recipe, evaluate it (and its base), let it go."""
        log = self.log
        log(f"[{name}] loading {target.path}")
        loaded = load_target(target, log)
        log(f"[{name}] loaded in {loaded.load_seconds:.1f}s ({loaded.device}, {loaded.dtype})")
        rows = build_eval_data(
            target, self.data, loaded.tokenizer, max_samples=max_samples, max_length=max_length,
            context=loaded.context, stop_ids=loaded.stop_ids, stop_texts=loaded.stop_texts,
        )  # fmt: skip
        tokenizer, texts = loaded.tokenizer, loaded.stop_texts
        references = [answer_text(tokenizer, p.reference_ids, texts) for p in rows.prompts]
        if self.first is None:
            self.first = (name, rows, references, tokenizer, texts)
            log(f"evaluating on {rows.description}")
            self.inputs = reward_inputs_for(target, self.data, rows, loaded, self.rewards, log)
        else:
            same_rows(self.first[0], self.first[2], name, references, self.data)
        batch = target.recipe.training.per_device_eval_batch_size if target.recipe else 8
        self.lm_eval.batch = batch
        fold = target.kind == "run"
        self.results[name] = evaluate_model(loaded, rows, self.sampling, batch, log, label=name, fold=fold)
        self.lm_eval.run(loaded.model, loaded.tokenizer, name)
        if with_base:
            self.results["base"] = evaluate_base(
                target, loaded, rows, self.sampling, batch, log, self.lm_eval
            )
        template = rows.details["chat_template_sha256"]
        self.described.append({"name": name, **describe_target(target), "chat_template_sha256": template})
        self.settings = loaded_settings(loaded)
        release(loaded)

    def record(self, columns: list[str], max_samples: int | None) -> dict[str, Any]:
        """metrics.json of a comparison: what `loratool eval TARGET` writes, with `targets` and `columns`."""
        assert self.first is not None
        models = {label: with_rewards(self.results[label], self.rewards, self.inputs) for label in columns}
        sampling = self.sampling
        return {
            "loratool_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": self.described[0],
            "targets": self.described,
            "columns": columns,
            "data": self.first[1].details,
            "settings": {
                "max_new_tokens": sampling.max_new_tokens,
                "decoding": "greedy" if sampling.greedy else "sampling",
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "seed": sampling.seed,
                "max_samples": max_samples,
                **self.settings,
            },
            "models": models,
            "rewards": reward_record(self.rewards),
            "difference": difference(models, columns[0], columns[-1]) if len(columns) == 2 else None,
            "lm_eval": self.lm_eval.record(),
            "versions": library_versions(
                "torch", "transformers", "peft", "rouge-score", "sacrebleu", "lm-eval"
            ),
        }

    def generations(self, columns: list[str]) -> list[dict[str, Any]]:
        """generations.jsonl: each row's prompt (as the first TARGET renders it), reference, every answer."""
        assert self.first is not None
        _, rows, _, tokenizer, texts = self.first
        return generation_rows(rows, tokenizer, {c: self.results[c].answers for c in columns}, texts)


# --- before anything loads -----------------------------------------------------------------------------


def check_targets(targets: list[Target], compare_base: bool) -> Target | None:
    """Refuse what cannot be compared; returns the fine-tune whose base --compare-base adds (the first
    run or merged model), else None."""
    for target in targets:
        refuse_reward_model_target(target, hint_several=True)
    seen: dict[Path, Target] = {}
    for target in targets:
        if target.path in seen:
            raise LoratoolError(
                f"{target.path} is given twice",
                hint="name each TARGET once: they are evaluated in that order",
            )
        seen[target.path] = target
    if not compare_base:
        return None
    if any(t.kind == "base" for t in targets):
        given = next(t for t in targets if t.kind == "base")
        raise LoratoolError(
            f"--compare-base: {given.path} is a base model, already one of the TARGETs",
            hint="drop --compare-base (the base is evaluated as a TARGET), or leave the base out of TARGETs",
        )
    tuned = targets[0]
    fingerprint = base_fingerprint(tuned)
    for other in targets[1:]:
        theirs = base_fingerprint(other)
        if fingerprint and theirs and theirs != fingerprint:
            raise LoratoolError(
                f"--compare-base: {other.name} was trained on another base than {tuned.name} (base weights "
                "fingerprints differ), so there is no one base to show beside them",
                hint="drop --compare-base and give the base model as a TARGET of its own, or compare runs "
                "of one base",
            )
    return tuned


def base_fingerprint(target: Target) -> str | None:
    if target.kind == "run" and target.run is not None:
        return target.run.base_model.fingerprint
    if target.kind == "merged" and target.merge is not None:
        return target.merge.base_model.fingerprint
    return None


def column_names(targets: list[Target], compare_base: bool) -> list[str]:
    """Each TARGET's name as the user calls it (its directory's), made unique: two runs both called
    `run` in different folders become `run` and `run-2`."""
    taken = set(RESERVED) | ({"base"} if compare_base else set())
    names = []
    for target in targets:
        name, n = target.name, 2
        while name in taken:
            name, n = f"{target.name}-{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def comparison_data(targets: list[Target], data: str | Path | None, log: Callable[[str], None]) -> Path:
    """--data, else the validation file of the first TARGET whose recipe has exactly one (every TARGET
    must be evaluated on the same rows, so a fraction split off one run's training rows will not do)."""
    if data is not None:
        path = check_data_path(data)
        assert path is not None
        return path
    for target in targets:
        validation = target.recipe.data.validation if target.recipe is not None else None
        if (
            target.recipe is None
            or target.recipe.stage in ("grpo", "rloo")
            or not isinstance(validation, list)
        ):
            continue
        (source, *more) = validation
        if more or source.columns or source.format not in ("auto",) or not Path(source.path).is_file():
            continue
        path = Path(source.path).resolve()
        log(f"held-out rows: {target.name}'s validation file {path} (pass --data to choose others)")
        return path
    raise LoratoolError(
        "several TARGETs are compared on one file of held-out rows, and none of them has a validation file "
        "to use",
        hint="pass --data FILE with prompts and their answers (alpaca, prompt_completion or messages rows; "
        "rows none of the runs trained on)",
    )


def comparison_output(targets: list[Target], names: list[str], output: str | Path | None) -> Path:
    """--output, else ./eval-A-vs-B-vs-C in the current directory (no run's own folder: the comparison
    belongs to none of them)."""
    if output is not None:
        out = Path(output).expanduser().absolute()
    else:
        joined = "-vs-".join(n.replace("/", "--") for n in names)
        out = Path.cwd().absolute() / (
            f"eval-{joined}" if len(joined) <= 120 else f"eval-{len(names)}-targets"
        )
    for target in targets:
        if out.resolve() == target.path or out.resolve() in target.path.parents:
            raise LoratoolError(
                f"--output {out} would replace TARGET {target.path}", hint="choose another directory"
            )
    check_output(out, kind="eval", record_name=METRICS, overwrite=True, option="--output")
    return out


# --- while evaluating ----------------------------------------------------------------------------------


def same_rows(first: str, theirs: list[str], name: str, ours: list[str], data: Path) -> None:
    """Every TARGET must answer the same rows: a max_length that drops other rows makes the numbers
    incomparable."""
    if len(ours) == len(theirs) and all(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True)):
        return
    raise LoratoolError(
        f"{name} keeps {len(ours)} rows of {data} and {first} keeps {len(theirs)}"
        + ("" if len(ours) != len(theirs) else " with other answers")
        + ": their recipes build the rows differently (data.max_length, truncation or chat template)",
        hint="pass --max-length N (long enough for every row) so that every TARGET is evaluated on the same rows",
    )


def release(loaded: Any) -> None:
    """Let the model go before the next TARGET loads."""
    loaded.model = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def loaded_settings(loaded: Any) -> dict[str, Any]:
    return {
        "device": loaded.device,
        "dtype": loaded.dtype,
        "quantized_base": loaded.quantized,
        "stop_token_ids": loaded.stop_ids,
        "stop_texts": loaded.stop_texts,
    }
