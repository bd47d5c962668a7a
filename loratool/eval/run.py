"""`loratool eval`: held-out loss, perplexity and generation metrics of a fine-tune, next to its base.

Reads top to bottom like the evaluation: resolve TARGET (run, merged checkpoint or base model), decide
the data (the run's validation split, rebuilt exactly as training built it, or `--data` built the same
way), load the model, compute loss and generate answers, do the same with the adapter switched off
(`--compare-base`), and write `eval/` (metrics.json, generations.jsonl, report.md) into place in one rename.

Prompts and references come from the very rows the loss is computed on: in each row, the tokens before
the last span that carries loss are the prompt (the conversation up to the last assistant turn, rendered
by the run's chat template with the generation prompt), and that span is the reference answer.

Answers and references are compared as text without the end of turn: its special token is skipped when
decoding, and an end of turn the vocabulary spells in several tokens (ChatML's <|im_end|> on Gemma's) is
cut off as text. A reference is complete when it ends the turn — by the stop token, or by that text.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loratool import __version__
from loratool.data import build_datasets
from loratool.data.preference import build_preference_datasets, chosen_rows
from loratool.data.sources import open_source
from loratool.data.unpaired import build_unpaired_datasets, desirable_rows
from loratool.errors import LoratoolError
from loratool.eval import report as eval_report
from loratool.eval.lm_harness import HarnessTasks, failure, prepare_tasks, run_tasks
from loratool.eval.metrics import IGNORE, generation_metrics, heldout_loss
from loratool.eval.report import report_markdown
from loratool.eval.reward import run_reward_eval
from loratool.eval.reward_metrics import (
    RewardInputs,
    eval_rewards,
    reward_inputs,
    score_answers,
    with_fallbacks,
)
from loratool.generate.fold import folded
from loratool.generate.run import Sampling, answer_text, fit_to_context, generate_ids, stop_text_span
from loratool.generate.target import (
    Loaded,
    Target,
    is_reward_model,
    load_checkpoint,
    load_target,
    merged_base_dir,
    resolve_target,
)
from loratool.model import hardware
from loratool.model.bnb_cpu import four_bit_matmul
from loratool.progress import Heartbeat
from loratool.recipe import DataSection, DataSource
from loratool.rundir.model_card import write_model_card
from loratool.rundir.outputs import Output, check_output, claim_output, library_versions
from loratool.train.rewards import Reward

EVAL_DIR = "eval"
METRICS = "metrics.json"
GENERATIONS = "generations.jsonl"
REPORT = "report.md"


@dataclass(frozen=True)
class Prompt:
    """One generation probe, cut from a loss row."""

    prompt_ids: list[int]
    reference_ids: list[int]
    complete: bool  # the reference ends with a stop token (False: the row was truncated at max_length)


@dataclass(frozen=True)
class Evaluated:
    """One model's numbers on the eval data, and its answers (text, and token ids without the end of turn)."""

    numbers: dict[str, Any]
    answers: list[str]
    answer_ids: list[list[int]]


@dataclass(frozen=True)
class EvalData:
    rows: list[tuple[list[int], list[int]]]  # (input_ids, labels) as training sees them
    prompts: list[Prompt]
    description: str  # where the rows come from, in words
    details: dict[str, Any]  # the same, for metrics.json


def run_eval(
    target: str | Path,
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
    """Evaluate TARGET and write its report directory; returns that directory. When lm-evaluation-harness
    fails, the rest of the report is written (with lm-eval's error in it) and then the error is raised."""

    started = time.time()
    resolved = resolve_target(target)
    if resolved.kind == "run" and resolved.recipe is not None and resolved.recipe.reward is not None:
        if rewards:
            raise LoratoolError(
                f"--reward: {resolved.path} is a reward model, which scores answers and writes none",
                hint="drop --reward; to score a policy's answers with this reward model, evaluate the policy "
                f"with --reward model={resolved.path}",
            )
        return _reward_eval(resolved, data, output, max_samples, max_length, bool(lm_eval_tasks), log)
    refuse_reward_model_target(resolved)
    online_rl = resolved.recipe.stage if resolved.recipe is not None else None
    if data is None and online_rl in ("grpo", "rloo"):
        raise LoratoolError(
            f"{resolved.path} is a {online_rl} run: its validation rows are prompts without answers, so there is "
            "no held-out loss or reference to compare generations with",
            hint="pass --data FILE with prompts and their answers (alpaca, prompt_completion or messages rows), "
            "e.g. `loratool eval RUN --data held-out.jsonl --compare-base`",
        )
    if compare_base and resolved.kind == "base":
        raise LoratoolError(
            f"--compare-base: {resolved.path} is a base model already; there is no adapter to compare with",
            hint="drop --compare-base, or pass the run directory (or merged checkpoint) as TARGET",
        )
    data_path = check_data_path(data)
    out = output_dir(resolved, output)
    _require_data(resolved, data_path)
    scorers = eval_rewards(rewards or [], [resolved], log)
    harness = harness_tasks(lm_eval_tasks, lm_eval_include, lm_eval_limit, log)
    with claim_output(out, kind="eval", record_name=METRICS, overwrite=True, log=log) as claimed:
        sampling = Sampling(max_new_tokens, temperature, top_p, seed)

        loaded = load_target(resolved, log)
        log(f"loaded in {loaded.load_seconds:.1f}s ({loaded.device}, {loaded.dtype})")
        kernel = four_bit_matmul(loaded.model)  # now: --compare-base may let go of the model
        eval_data = build_eval_data(
            resolved,
            data_path,
            loaded.tokenizer,
            max_samples=max_samples,
            max_length=max_length,
            context=loaded.context,
            stop_ids=loaded.stop_ids,
            stop_texts=loaded.stop_texts,
        )
        log(f"evaluating on {eval_data.description}")
        batch = resolved.recipe.training.per_device_eval_batch_size if resolved.recipe else 8
        name = "base" if resolved.kind == "base" else "tuned"
        inputs = reward_inputs_for(resolved, data_path, eval_data, loaded, scorers, log)
        results = {
            name: evaluate_model(
                loaded, eval_data, sampling, batch, log, label=name, fold=resolved.kind == "run"
            )
        }
        lm_eval = LmEvalRuns(harness, batch, log)
        lm_eval.run(loaded.model, loaded.tokenizer, name)
        if compare_base:
            results["base"] = evaluate_base(
                resolved, loaded, eval_data, sampling, batch, log, lm_eval=lm_eval
            )
        models = {label: with_rewards(result, scorers, inputs) for label, result in results.items()}
        answers = {label: result.answers for label, result in results.items()}

        record = {
            "loratool_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": describe_target(resolved),
            "data": eval_data.details,
            "settings": {
                "max_new_tokens": max_new_tokens,
                "decoding": "greedy" if sampling.greedy else "sampling",
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "max_samples": max_samples,
                "device": loaded.device,
                "dtype": loaded.dtype,
                "quantized_base": loaded.quantized,
                "four_bit_matmul": kernel,  # the same on every CPU: bnb_cpu.py
                "stop_token_ids": loaded.stop_ids,
                "stop_texts": loaded.stop_texts,
            },
            "models": models,
            "rewards": reward_record(scorers),
            "difference": difference(models, "base", "tuned")
            if "tuned" in models and "base" in models
            else None,
            "trainer_final_eval_loss": resolved.run.train.get("final_eval_loss") if resolved.run else None,
            "lm_eval": lm_eval.record(),
            "versions": library_versions(
                "torch", "transformers", "peft", "rouge-score", "sacrebleu", "lm-eval"
            ),
        }
        generations = generation_rows(eval_data, loaded.tokenizer, answers, loaded.stop_texts)
        record["wall_time_s"] = round(time.time() - started, 2)
        loss_curve = resolved.run_dir / "loss_curve.png" if resolved.run_dir else None
        write_outputs(
            claimed, record, generations, loss_curve if loss_curve and loss_curve.is_file() else None, log
        )
        for line in eval_report.terminal_summary(record, generations):
            log(line)
        if resolved.kind == "run":
            _add_to_model_card(resolved, record, out)
    log(f"report written to {out}")
    lm_eval.raise_failure(out)
    return out


def _reward_eval(
    target: Target,
    data: str | Path | None,
    output: str | Path | None,
    max_samples: int | None,
    max_length: int | None,
    lm_eval: bool,
    log: Callable[[str], None],
) -> Path:
    """A reward model scores answers instead of writing them: its own evaluation (eval/reward.py), which
    always puts the starting point beside the trained model."""
    if lm_eval:
        raise LoratoolError(
            f"--lm-eval-tasks: {target.path} is a reward model (a score head), which lm-eval's generation "
            "and log-likelihood tasks cannot run",
            hint="drop --lm-eval-tasks; `loratool eval` reports the reward model's pairwise accuracy",
        )
    return run_reward_eval(
        target,
        output_dir(target, output),
        data=check_data_path(data),
        max_samples=max_samples,
        max_length=max_length,
        log=log,
    )


def harness_tasks(
    tasks: list[str] | None, include: str | Path | None, limit: int | None, log: Callable[[str], None]
) -> HarnessTasks | None:
    """The lm-eval tasks asked for, checked (before any model loads), or None."""
    if not tasks:
        return None
    return prepare_tasks(tasks, Path(include).expanduser().resolve() if include else None, limit, log)


def refuse_reward_model_target(target: Target, *, hint_several: bool = False) -> None:
    """A reward model scores answers and writes none: it is evaluated on its own (its run directory), or
    used as a reward (`--reward model=RUN`), never generated with."""
    reward_run = target.kind == "run" and target.recipe is not None and target.recipe.reward is not None
    if not reward_run and (target.kind == "run" or not is_reward_model(target)):
        return
    what = "a reward model run" if reward_run else "a sequence-classification model (a merged reward model)"
    if hint_several:
        hint = (
            f"leave it out of the TARGETs and score the others' answers with it: --reward model={target.path}"
            if reward_run
            else "leave it out of the TARGETs; its run directory can score answers: --reward model=RUN_DIR"
        )
    else:
        hint = (
            "evaluate the run directory it was merged from (`loratool eval RUN_DIR`): that reports its "
            "pairwise accuracy on held-out pairs"
        )
    raise LoratoolError(
        f"{target.path} is {what}: it scores answers and writes none, so there is nothing to generate or "
        "compute a loss with",
        hint=hint,
    )


class LmEvalRuns:
    """lm-eval on each model evaluated (tuned, and base under --compare-base); a failure is kept, not
    raised, so that the loss and generation results are still written."""

    def __init__(self, harness: HarnessTasks | None, batch: int, log: Callable[[str], None]):
        self.harness, self.batch, self.log = harness, batch, log
        self.results: dict[str, dict[str, Any]] = {}
        self.error: str | None = None

    def run(self, model: Any, tokenizer: Any, label: str) -> None:
        if self.harness is None or self.error is not None:
            return
        try:
            self.results[label] = run_tasks(model, tokenizer, self.harness, self.batch, self.log, label)
        except Exception as exc:  # whatever lm-eval raises: the other numbers must still be written
            if os.environ.get("LORATOOL_DEBUG", "") not in ("", "0", "false"):
                raise
            self.error = failure(exc)
            self.log(f"warning: lm-evaluation-harness failed on the {label} model: {self.error}")

    def raise_failure(self, out: Path) -> None:
        """After the report is written: lm-eval's failure, if it failed."""
        if self.error is not None:
            raise LoratoolError(
                f"lm-evaluation-harness failed: {self.error} (the rest of the report was written to {out})",
                hint="rerun with LORATOOL_DEBUG=1 for lm-eval's own output; check the task's YAML and dataset",
            )

    def record(self) -> dict[str, Any] | None:
        if self.harness is None:
            return None
        return {**self.harness.settings(), "models": self.results, "error": self.error}


# --- data ----------------------------------------------------------------------------------------------


def check_data_path(data: str | Path | None) -> Path | None:
    if data is None:
        return None
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise LoratoolError(
            f"--data: file not found: {path}", hint="pass a .jsonl, .json, .csv or .parquet file"
        )
    return path


def _require_data(target: Target, data: Path | None) -> None:
    """Refuse, before loading anything, an evaluation with nothing to evaluate on."""
    if data is not None:
        return
    if target.recipe is None:
        what = "a base model" if target.kind == "base" else "a merged model whose training run is not found"
        raise LoratoolError(
            f"{target.path} is {what}, so there is no validation data to evaluate on",
            hint="pass --data FILE (any format `loratool train` reads)",
        )
    if target.recipe.data.validation is None:
        raise LoratoolError(
            f"the run in {target.run_dir} has no validation data (its recipe has no data.validation)",
            hint="pass --data FILE with held-out rows (rows the run did not train on), or train with "
            "data.validation: 0.05",
        )


def build_eval_data(
    target: Target,
    data: Path | None,
    tokenizer: Any,
    *,
    max_samples: int | None = None,
    max_length: int | None = None,
    context: int | None = None,
    stop_ids: list[int] | None = None,
    stop_texts: list[str] | None = None,
) -> EvalData:
    """The rows to evaluate on, tokenized and masked exactly as training does (loratool.data). Without a
    recipe (a base model, or a merged model whose run is gone), the schema's data defaults apply, with
    max_length capped at the model's context; `max_length` replaces either. A `--data` file keeps its
    order, so `max_samples` takes its first rows."""

    recipe = target.recipe
    seed = recipe.training.seed if recipe else 0
    holds = rows_in(data) if data is not None else None
    # A DPO or KTO run's own validation split, or a --data file of pairs or of judged completions (what
    # those methods train on, whatever the run): each prompt with its chosen / desirable answer.
    preference = holds == "pairs" or (data is None and recipe is not None and recipe.dpo is not None)
    unpaired = holds == "judged" or (data is None and recipe is not None and recipe.kto is not None)
    if data is None:
        assert recipe is not None and recipe.data.validation is not None
        section = recipe.data
        if max_length is not None:
            section = section.model_copy(update={"max_length": max_length})
        try:
            if preference:  # a DPO run: its validation pairs, each prompt with its chosen answer
                built = build_preference_datasets(section, tokenizer, seed=seed)
            elif unpaired:  # a KTO run: its desirable validation completions
                built = build_unpaired_datasets(section, tokenizer, seed=seed)
            else:
                built = build_datasets(section, tokenizer, seed=seed)
        except LoratoolError as exc:
            raise LoratoolError(
                f"cannot rebuild the run's validation data from its recipe.yaml: {exc.message}",
                hint="relative data paths are read from the current directory: run from the directory "
                "training ran in, or pass --data FILE",
            ) from None
        dataset = built.validation
        assert dataset is not None
        split = built.summary.validation
        origin = split.origin if split and split.origin else "data.validation sources"
        description = f"the run's validation split ({origin})"
        details: dict[str, Any] = {"source": "validation", "origin": origin}
    else:
        if recipe is not None:
            base = recipe.data.model_dump()
        else:
            base = DataSection(train=[{"path": str(data)}]).model_dump()
            if context is not None and context < base["max_length"]:
                base["max_length"] = context
        if max_length is not None:
            base["max_length"] = max_length
        # Read as validation sources, which keep file order (training sources are shuffled); the train
        # entry only satisfies the schema and is built too (the same rows, tokenized twice).
        file = [{"path": str(data)}]
        section = DataSection.model_validate({**base, "train": file, "validation": file})
        build = (
            build_preference_datasets
            if preference
            else build_unpaired_datasets
            if unpaired
            else build_datasets
        )
        try:
            built = build(section, tokenizer, seed=seed)
        except LoratoolError as exc:
            message = exc.message.replace("data.train", f"--data {data}", 1)
            raise LoratoolError(message.replace("data.validation", f"--data {data}", 1), exc.hint) from None
        dataset = built.validation
        assert dataset is not None
        description = f"{data} (in file order)"
        details = {"source": "file", "path": str(data), "order": "file"}
    if preference:
        rows = chosen_rows(dataset)
    elif unpaired:
        rows = desirable_rows(dataset)
    else:
        rows = list(zip(dataset["input_ids"], dataset["labels"], strict=True))
    if max_samples is not None:
        rows = rows[:max_samples]
    stops = _Stops(set(stop_ids or [tokenizer.eos_token_id]), list(stop_texts or []), tokenizer)
    prompts = [_prompt_from_row(ids, labels, stops) for ids, labels in rows]
    if not section.completion_only_loss:
        prompts = _prompts_with_completion_masks(section, tokenizer, seed, len(rows), stops)
    details.update(
        rows=len(rows),
        loss_tokens=sum(len(labels) - labels.count(IGNORE) for _, labels in rows),
        max_length=section.max_length,
        completion_only_loss=section.completion_only_loss,
        chat_template_sha256=built.summary.chat_template_sha256,
        truncated_references=sum(not p.complete for p in prompts),
    )
    return EvalData(rows, prompts, f"{len(rows)} rows of {description}", details)


def rows_in(data: Path) -> str:
    """What a --data file holds, from its first readable row: "pairs" (prompt, chosen and rejected: the
    answers DPO compares), "judged" (completion and label: KTO's rows), else "rows" (a supervised format)."""
    rows, _ = open_source(DataSource(path=str(data)))
    first = next((row.data for row in rows if row.data is not None), None) or {}
    if {"chosen", "rejected"} <= first.keys():
        return "pairs"
    if {"completion", "label"} <= first.keys():
        return "judged"
    return "rows"


@dataclass(frozen=True)
class _Stops:
    """What ends a turn: stop token ids, and end-of-turn texts spelled in several tokens."""

    ids: set[int]
    texts: list[str]
    tokenizer: Any

    def ends_turn(self, reference: list[int]) -> bool:
        if any(t in self.ids for t in reference):
            return True
        return bool(self.texts) and stop_text_span(self.tokenizer, reference, self.texts) is not None


def _prompt_from_row(ids: list[int], labels: list[int], stops: _Stops) -> Prompt:
    """Prompt = the tokens before the last run of loss-carrying labels; reference = that run."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE) + 1
    start = end
    while start > 1 and labels[start - 1] != IGNORE:
        start -= 1
    reference = ids[start:end]
    return Prompt(ids[:start], reference, complete=stops.ends_turn(reference))


def _prompts_with_completion_masks(
    section: Any, tokenizer: Any, seed: int, count: int, stops: _Stops
) -> list[Prompt]:
    """With completion_only_loss off every token carries loss, so prompts cannot be told from answers in
    the loss rows: the same rows are built again with the answers masked, for generation only."""

    masked = section.model_copy(update={"completion_only_loss": True})
    built = build_datasets(masked, tokenizer, seed=seed)
    dataset = built.validation
    assert dataset is not None
    rows = list(zip(dataset["input_ids"], dataset["labels"], strict=True))[:count]
    return [_prompt_from_row(ids, labels, stops) for ids, labels in rows]


# --- evaluating one model ------------------------------------------------------------------------------


def evaluate_model(
    loaded: Loaded,
    data: EvalData,
    sampling: Sampling,
    batch: int,
    log: Callable[[str], None],
    *,
    label: str,
    fold: bool = False,
) -> Evaluated:
    """Loss on the rows and metrics of the answers generated for their prompts. `fold`: the active adapter
    is folded into the base weights while generating (loratool.generate.fold; the loss is computed
    unfolded), and unfolded again after."""
    started = time.perf_counter()
    pad = loaded.tokenizer.pad_token_id

    rows_beat = Heartbeat(f"{label}: loss", len(data.rows), write=log)
    loss = heldout_loss(
        loaded.model, data.rows, pad_id=pad, progress=lambda n: rows_beat.tick(n, unit="rows")
    )
    loss_seconds = time.perf_counter() - started
    prompts, cut = [], 0
    for p in data.prompts:
        ids, dropped = fit_to_context(p.prompt_ids, loaded.context, sampling.max_new_tokens)
        prompts.append(ids)
        cut += dropped > 0
    if cut:
        log(
            f"warning: {cut} prompt(s) were cut from the left to leave room for {sampling.max_new_tokens} new tokens"
        )
    answers_beat = Heartbeat(f"{label}: generating", len(prompts), write=log)
    texts = loaded.stop_texts
    with folded(loaded.model, quantized=loaded.quantized, log=log) if fold else nullcontext():
        new_ids = generate_ids(
            loaded.model, prompts, sampling, pad_id=pad, stop_ids=loaded.stop_ids, batch_size=batch,
            progress=lambda n: answers_beat.tick(n, unit="answers"), stop_texts=texts,
            tokenizer=loaded.tokenizer,
        )  # fmt: skip
    answers = [answer_text(loaded.tokenizer, ids, texts) for ids in new_ids]
    references = [answer_text(loaded.tokenizer, p.reference_ids, texts) for p in data.prompts]
    lengths = [_answer_length(loaded.tokenizer, ids, loaded.stop_ids, texts) for ids in new_ids]
    answer_ids = [list(ids[:n]) for ids, n in zip(new_ids, lengths, strict=True)]
    numbers = {
        "loss": loss.loss,
        "perplexity": loss.perplexity,
        "loss_tokens": loss.loss_tokens,
        "rows": loss.rows,
        **generation_metrics(answers, references, lengths),
        "prompts_cut": cut,
        "loss_seconds": round(loss_seconds, 2),
        "generation_seconds": round(time.perf_counter() - started - loss_seconds, 2),
    }
    log(
        f"  {label}: loss {loss.loss:.4f}, perplexity {loss.perplexity:.2f} (loss {loss_seconds:.1f}s, "
        f"generation {numbers['generation_seconds']:.1f}s)"
    )
    return Evaluated(numbers, answers, answer_ids)


def _answer_length(tokenizer: Any, ids: list[int], stop_ids: list[int], stop_texts: list[str]) -> int:
    """Generated tokens, the end of turn not counted (a stop token, or the tokens of a stop text)."""
    if ids and ids[-1] in stop_ids:
        return len(ids) - 1
    span = stop_text_span(tokenizer, ids, stop_texts) if stop_texts else None
    return span[0] if span else len(ids)


def evaluate_base(
    target: Target,
    loaded: Loaded,
    data: EvalData,
    sampling: Sampling,
    batch: int,
    log: Callable[[str], None],
    lm_eval: LmEvalRuns | None = None,
) -> Evaluated:
    """The same numbers without the adapter: PEFT's disable_adapter() for a run (the base is not loaded
    twice); the recorded base, loaded in place of the merged model, for a merged checkpoint. lm-eval runs
    on that same base when given."""
    if target.kind == "run":
        with loaded.model.disable_adapter():
            result = evaluate_model(loaded, data, sampling, batch, log, label="base")
            if lm_eval is not None:
                lm_eval.run(loaded.model, loaded.tokenizer, "base")
            return result

    base_dir = merged_base_dir(target)
    log(f"loading the base {base_dir}")
    hw = hardware.detect()
    loaded.model = None  # free the merged model before the base loads
    base = Loaded(**{**loaded.__dict__, "model": load_checkpoint(base_dir, hw).eval()})
    result = evaluate_model(base, data, sampling, batch, log, label="base")
    if lm_eval is not None:
        lm_eval.run(base.model, base.tokenizer, "base")
    return result


# --- writing -------------------------------------------------------------------------------------------


def output_dir(target: Target, output: str | Path | None) -> Path:
    """--output, else TARGET/eval (a base model's report goes to ./eval-NAME: its directory may be a
    read-only hub cache). What may already be there is checked by outputs.check_output: an earlier eval
    report is replaced, anything else refused."""
    if output is not None:
        out = Path(output).expanduser().absolute()
    elif target.kind == "base":
        # A hub id's name (org/name) as a directory name: eval-org--name, the hub cache's own spelling.
        out = Path.cwd().absolute() / f"eval-{target.name.replace('/', '--')}"
    else:
        out = target.path / EVAL_DIR
    if out.resolve() == target.path or out.resolve() in target.path.parents:
        raise LoratoolError(f"--output {out} would replace TARGET", hint="choose another directory")
    check_output(out, kind="eval", record_name=METRICS, overwrite=True, option="--output")
    return out


def _add_to_model_card(target: Target, record: dict[str, Any], out: Path) -> None:
    """The run's model card (its README.md) gets these numbers, so that a shared adapter says how it did."""

    rows = (record["models"].get("tuned") or {}).get("rows")
    where = f"`loratool eval`, {rows} held-out rows" if rows else "`loratool eval`"
    evaluation = {}
    for side in ("tuned", "base"):
        numbers = record["models"].get(side) or {}
        for key in ("loss", "exact_match", "rouge_l_f1", "chrf"):
            if isinstance(numbers.get(key), (int, float)):
                label = "held-out loss" if key == "loss" else key.replace("_", " ")
                evaluation[f"{label} ({side}, {where})"] = f"{numbers[key]:.4g}"
    evaluation["full report"] = (
        f"`{out.relative_to(target.path) if out.is_relative_to(target.path) else out}`"
    )
    assert target.run is not None  # a run target: resolve_target read its run.json
    recipe = target.recipe.model_dump(mode="json") if target.recipe else None
    write_model_card(target.path, recipe, target.run, evaluation)


def write_outputs(
    claimed: Output,
    record: dict[str, Any],
    generations: list[dict[str, Any]],
    loss_curve: Path | None,
    log: Callable[[str], None],
) -> None:
    """Write the three files into a partial directory, then rename it into place (an earlier report
    there is replaced, only what it wrote): a crash never leaves a report that looks complete."""

    partial = claimed.partial()
    try:
        curve = os.path.relpath(loss_curve, claimed.path) if loss_curve is not None else None
        (partial / GENERATIONS).write_text(
            "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations), encoding="utf-8"
        )
        (partial / REPORT).write_text(report_markdown(record, generations, curve), encoding="utf-8")
        claimed.place(partial, record, log)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def generation_rows(
    data: EvalData, tokenizer: Any, answers: dict[str, list[str]], stop_texts: list[str] | None = None
) -> list[dict[str, Any]]:
    rows = []
    for i, p in enumerate(data.prompts):
        row = {
            "index": i,
            "prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=False),
            "reference": answer_text(tokenizer, p.reference_ids, stop_texts),
            "reference_complete": p.complete,
        }
        for name, texts in answers.items():
            row[name] = texts[i]
        rows.append(row)
    return rows


def difference(models: dict[str, dict[str, Any]], first: str, last: str) -> dict[str, Any]:
    """`last` minus `first`, metric by metric (rewards: their means, under "rewards")."""
    a, b = models[first], models[last]
    out: dict[str, Any] = {
        k: b[k] - a[k]
        for k in ("loss", "perplexity", "exact_match", "rouge_l_f1", "bleu", "chrf", "mean_generated_tokens")
        if isinstance(b.get(k), int | float) and isinstance(a.get(k), int | float)
    }
    rewards = {
        name: b["rewards"][name]["mean"] - a["rewards"][name]["mean"]
        for name in (a.get("rewards") or {})
        if name in (b.get("rewards") or {})
    }
    if rewards:
        out["rewards"] = rewards
    return out


# --- rewards as metrics --------------------------------------------------------------------------------


def reward_inputs_for(
    target: Target,
    data: Path | None,
    eval_data: EvalData,
    loaded: Loaded,
    rewards: list[Reward],
    log: Callable[[str], None],
) -> RewardInputs | None:
    """What the rewards read for each evaluated row: the rows of --data (else of the run's validation
    files) they came from, the reference answers and the prompts as rendered."""
    if not rewards:
        return None
    tokenizer, texts = loaded.tokenizer, loaded.stop_texts
    validation = target.recipe.data.validation if target.recipe is not None else None
    files = [data] if data else [Path(s.path) for s in validation] if isinstance(validation, list) else []
    inputs = reward_inputs(
        [f for f in files if f.is_file()],
        [answer_text(tokenizer, p.reference_ids, texts) for p in eval_data.prompts],
        [p.complete for p in eval_data.prompts],
        [tokenizer.decode(p.prompt_ids, skip_special_tokens=False) for p in eval_data.prompts],
    )
    return with_fallbacks(rewards, inputs, log)


def with_rewards(result: Evaluated, rewards: list[Reward], inputs: RewardInputs | None) -> dict[str, Any]:
    """The model's numbers, with each reward's mean and spread over its answers when rewards are scored."""
    if inputs is None:
        return result.numbers
    return {**result.numbers, "rewards": score_answers(rewards, result.answers, result.answer_ids, inputs)}


def reward_record(rewards: list[Reward]) -> list[dict[str, Any]] | None:
    return [{"name": r.name, "given": r.key, "weight": r.weight} for r in rewards] or None


def describe_target(target: Target) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(target.path), "kind": target.kind}
    if target.hub_id:
        info["hub_id"] = target.hub_id  # `path` is then its snapshot in the hub cache
    if target.kind == "run" and target.run is not None:
        info["base_model"] = target.run.base_model.to_dict()
        info["adapter"] = str(target.path)
    elif target.kind == "merged" and target.merge is not None:
        info["base_model"] = asdict(target.merge.base_model)
        info["adapter"] = target.merge.adapter.path
    return info
