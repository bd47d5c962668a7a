"""`loratool eval`: held-out loss, perplexity and generation metrics of a fine-tune and of its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loratool.cli.application import reports_errors, start_libraries


@reports_errors
def eval_(
    targets: Annotated[
        list[Path],
        typer.Argument(
            help="A `loratool train` run directory, a merged checkpoint, or a base model (directory or "
            ".gguf file). Several are compared side by side on the same rows (e.g. base, SFT run, RL run).",
            show_default=False,
            metavar="TARGET",
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Evaluate on this file (any format `train` reads; preference pairs and KTO's judged rows "
            "by their chosen answers) instead of the run's validation split.",
            show_default=False,
        ),
    ] = None,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also evaluate the base model without the adapter.")
    ] = False,
    max_samples: Annotated[
        int | None,
        typer.Option(
            "--max-samples",
            help="Evaluate at most N rows (the first N of --data, in file order). lm-eval tasks are not "
            "limited by it: see --lm-eval-limit.",
            show_default=False,
            min=1,
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length",
            help="Longest row in tokens (default: the run's data.max_length; for a base model, 2048 or its "
            "context); longer rows are cut or dropped as data.truncation says.",
            show_default=False,
            min=1,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest generated answer, in tokens.", min=1)
    ] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0 is greedy decoding (the default).", min=0.0)
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling (temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Report directory. Default: TARGET/eval (for a base model: ./eval-NAME; for several "
            "TARGETs: ./eval-A-vs-B-...).",
            show_default=False,
        ),
    ] = None,
    lm_eval_tasks: Annotated[
        str | None,
        typer.Option(
            "--lm-eval-tasks",
            metavar="TASK,TASK",
            help="Also run these lm-evaluation-harness tasks (names, or paths of task YAML files) on the "
            "loaded model, and on the base with --compare-base (needs the lm-eval extra and the tasks' "
            "datasets). Checked before any model loads.",
            show_default=False,
        ),
    ] = None,
    lm_eval_include: Annotated[
        Path | None,
        typer.Option(
            "--lm-eval-include",
            help="A folder of your own lm-eval task YAML files, so --lm-eval-tasks can name them.",
            show_default=False,
        ),
    ] = None,
    rewards: Annotated[
        list[str] | None,
        typer.Option(
            "--reward",
            metavar="SPEC",
            help="Also score the answers with this reward, as an RL run does: exact_match=COLUMN, "
            "number=COLUMN, regex=PATTERN, valid_json, length=TOKENS, function=file.py:name, model=REWARD_RUN, "
            "or a YAML mapping of a recipe reward ('{number: answer, tolerance: 0.5}'). Repeatable. A GRPO or "
            "RLOO run's own rewards are scored without it.",
            show_default=False,
        ),
    ] = None,
    lm_eval_limit: Annotated[
        int | None,
        typer.Option(
            "--lm-eval-limit",
            help="Run at most N examples of each lm-eval task (default: all of them).",
            show_default=False,
            min=1,
        ),
    ] = None,
) -> None:
    """Held-out loss, perplexity and generation metrics of a fine-tune (and of its base, side by side), or
    of several models side by side on the same rows."""
    start_libraries()
    from loratool.eval import run_comparison, run_eval  # deferred: evaluating loads torch and transformers

    several = len(targets) > 1
    (run_comparison if several else run_eval)(
        targets if several else targets[0],
        data=data,
        compare_base=compare_base,
        max_samples=max_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        output=output,
        max_length=max_length,
        lm_eval_tasks=[t.strip() for t in lm_eval_tasks.split(",") if t.strip()] if lm_eval_tasks else None,
        lm_eval_include=lm_eval_include,
        lm_eval_limit=lm_eval_limit,
        rewards=rewards,
        log=typer.echo,
    )
