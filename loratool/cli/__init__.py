"""The `loratool` command line. Thin: parse, load the recipe, call one library function, print errors.

torch and transformers are imported inside the commands, so `loratool --help` answers instantly.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from loratool import __version__
from loratool.errors import LoratoolError

app = typer.Typer(
    help="Fine-tune causal language models with LoRA and QLoRA from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])
# --tools, shared by generate and chat.
ToolsOption = Annotated[
    Path | None,
    typer.Option(
        "--tools",
        metavar="FILE",
        help="A JSON list of tool definitions, rendered by the chat template as in training.",
        show_default=False,
    ),
]
INTERNAL_ERROR = (
    3  # exit codes: 0 done, 1 user-fixable error, 2 usage error, 3 internal error, 130 interrupted
)


def debug_enabled() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0", "false")


def reports_errors(command: F) -> F:
    """Map every failure to one clean message and an exit code: 1 for what the user can fix, 3 for an
    internal error, 130 for an interrupt (2, a usage error, comes from the option parser itself).
    LORATOOL_DEBUG=1 shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LoratoolError as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing that looks finished was written", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            typer.echo(
                "hint: this is probably a loratool bug; rerun with LORATOOL_DEBUG=1 for the traceback",
                err=True,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper  # type: ignore[return-value]


# (category, message regex) of library warnings that say nothing a loratool user can act on.
KNOWN_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # peft and trl still call transformers' old names for activation checkpointing (loratool's own recipe key
    # keeps the familiar name and maps it).
    (FutureWarning, r".*`(is_)?gradient_checkpointing(_enable)?` is deprecated"),
    # The trainer asks for pinned memory by default; on a CPU-only machine there is nothing to pin.
    (UserWarning, r".*'pin_memory' argument is set as true but no accelerator is found"),
)


def quiet_libraries() -> None:
    """Known library noise and info logs drown the few lines that matter; LORATOOL_DEBUG=1 brings them
    back. Only the warnings named here are hidden: any other library warning is printed (and lands in a
    run's train.log), since it may be the one that explains a bad result."""
    # --- bitsandbytes' hub-kernel warning (loratool/model/bnb_cpu.py) ---
    # On AVX512-BF16 CPUs, importing bitsandbytes (peft does, on every command) logs that it cannot load a
    # fused CPU kernel that loratool turns off anyway; not even LORATOOL_DEBUG=1 needs that line.
    from loratool.model.bnb_cpu import silence_kernel_hub_warning

    silence_kernel_hub_warning()
    # --- end of the bitsandbytes block ---
    if debug_enabled():
        return
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; the training bar is ours
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # transformers' GGUF reader draws its own tqdm bar, which disable_progress_bar() does not reach; it is
    # silenced where a GGUF file is read (importing the reader here would cost every command a second).
    from loratool.model import gguf_base

    gguf_base.QUIET_READER = True


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"loratool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Fine-tune causal language models with LoRA and QLoRA from YAML recipes."""


@app.command()
@reports_errors
def train(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe file (see recipes/).", show_default=False, metavar="RECIPE")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable; YAML values).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate the recipe, check data, tokenizer and target modules without loading weights, "
            "print the resolved recipe and exit.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous run in training.output_dir.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in training.output_dir from its last checkpoint."),
    ] = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke",
            help="Check the recipe end to end in about a minute: the same recipe on a small random model "
            "of the base's architecture (no weights downloaded), a few steps on a few rows, then merge and "
            "export, each verified. Outputs go to training.output_dir + '-smoke', marked as a smoke run.",
        ),
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Print the resolved recipe with the origin of every value (default, file:line of the "
            "recipe or a base it extends, or --set) and exit.",
        ),
    ] = False,
) -> None:
    """Fine-tune a model with LoRA / QLoRA as the recipe says; the output directory is a PEFT adapter."""
    from loratool.recipe import explain as explained
    from loratool.recipe import load_recipe, load_recipe_with_origins

    if explain or dry_run:
        loaded, origins = load_recipe_with_origins(recipe, set_ or [])
    else:
        loaded, origins = load_recipe(recipe, set_ or []), {}
    if explain:
        typer.echo(explained(loaded, origins))
        return
    quiet_libraries()
    from loratool.train.run import dry_run as check_only
    from loratool.train.run import run_train

    if smoke:
        if resume:
            raise LoratoolError(
                "--smoke and --resume: a smoke run always starts afresh", hint="drop --resume"
            )
        from loratool.smoke import run_smoke

        run_smoke(loaded, log=typer.echo)
        return
    if dry_run:
        check_only(loaded, overwrite=overwrite, resume=resume, log=typer.echo)
        typer.echo("resolved recipe:  # after each value: default, the file and line that set it, or --set")
        typer.echo(explained(loaded, origins))
        return
    run_train(loaded, overwrite=overwrite, resume=resume, log=typer.echo)


@app.command("data")
@reports_errors
def data_(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe file (see recipes/).", show_default=False, metavar="RECIPE")
    ],
    rows: Annotated[int, typer.Option("--rows", min=0, help="How many rows to show, tokenized.")] = 3,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write a self-contained HTML page (rows, checks, histogram)."),
    ] = None,
    histogram: Annotated[
        Path | None, typer.Option("--histogram", help="Also write the token-length histogram as a PNG.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key, as for train."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit with code 1 when a check warns (for CI).")
    ] = False,
) -> None:
    """Show the data as training tokenizes it: loss tokens highlighted, lengths, summary and checks."""
    from loratool.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    quiet_libraries()
    from loratool.data.inspect import format_report, inspect_data, length_histogram_png, to_html
    from loratool.model.load import load_tokenizer

    tokenizer = load_tokenizer(loaded.base_model, loaded.model, typer.echo)
    report = inspect_data(loaded, tokenizer)
    typer.echo(format_report(report, rows=rows, color=sys.stdout.isatty()))
    if histogram is not None:
        length_histogram_png(report, histogram)
        typer.echo(f"histogram written to {histogram}")
    if html is not None:
        html.write_text(to_html(report, rows=rows), encoding="utf-8")
        typer.echo(f"HTML written to {html}")
    if strict and report.findings:
        raise typer.Exit(1)


@app.command("plan")
@reports_errors
def plan_(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe file (see recipes/).", show_default=False, metavar="RECIPE")
    ],
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help="Plan for a named GPU (H100, A100-80GB, L4, RTX4090, T4, ...)."),
    ] = None,
    memory: Annotated[
        str | None, typer.Option("--memory", help="Plan for a memory budget, e.g. 24GiB (GPU formula).")
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate", help="Also run a few real steps here and compare measured with predicted."
        ),
    ] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (peak_memory_bytes, ...).")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key, as for train."),
    ] = None,
) -> None:
    """Predict peak memory by component, speed and wall time, and list conflicts, without weights."""
    from loratool.recipe import load_recipe

    if gpu and memory:
        raise LoratoolError("--gpu and --memory: give one", hint="--gpu H100, or --memory 24GiB")
    loaded = load_recipe(recipe, set_ or [])
    quiet_libraries()
    from loratool.train.plan import calibrate as measure
    from loratool.train.plan import plan_json, plan_recipe

    log = (lambda _: None) if json_ else typer.echo
    plan = plan_recipe(loaded, gpu=gpu, memory=memory, log=log)
    if calibrate:
        plan.calibration = measure(loaded, plan, log=log)
    typer.echo(plan_json(plan) if json_ else plan.format())


@app.command()
@reports_errors
def sweep(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe file (see recipes/).", show_default=False, metavar="RECIPE")
    ],
    vary: Annotated[
        list[str],
        typer.Option(
            "--vary",
            metavar="KEY=V1,V2,...",
            help="A recipe key and the values it takes, e.g. --vary lora.r=8,16,32 (YAML values; a list "
            "stays whole: [q_proj,v_proj]). Repeat it for a grid: every combination is one cell.",
            show_default=False,
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key in every cell, as for train."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="The sweep's directory, one run directory per cell inside it. Default: sweep-NAME next to "
            "the recipe's training.output_dir (out/NAME).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a previous sweep there (each cell by its own record)."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a previous sweep there: finished cells with the same recipe are kept, unfinished "
            "ones continue from their last checkpoint, the rest train.",
        ),
    ] = False,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval", help="Run `loratool eval` on each cell after it trains; its metrics join the table."
        ),
    ] = False,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="--eval on this file instead of each run's validation split (implies --eval).",
            show_default=False,
        ),
    ] = None,
    eval_max_samples: Annotated[
        int | None,
        typer.Option("--eval-max-samples", help="--eval on at most N rows (implies --eval).", min=1),
    ] = None,
    eval_max_new_tokens: Annotated[
        int | None,
        typer.Option("--eval-max-new-tokens", help="--eval's longest answer (implies --eval).", min=1),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check every cell as `train --dry-run` does (data, target modules, adapter size, plan) "
            "and exit; nothing is written.",
        ),
    ] = False,
) -> None:
    """Train a grid of recipe variants, one run per cell, and compare them in one table and plot."""
    from loratool.train.sweep import EvalOptions, run_sweep

    asked = evaluate or any(v is not None for v in (eval_data, eval_max_samples, eval_max_new_tokens))
    if dry_run:
        quiet_libraries()
    run_sweep(
        recipe,
        vary,
        sets=set_ or [],
        output=output,
        overwrite=overwrite,
        resume=resume,
        evaluate=EvalOptions(eval_data, eval_max_samples, eval_max_new_tokens) if asked else None,
        dry_run=dry_run,
        log=typer.echo,
    )


@app.command("recipe-reference")
def recipe_reference(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print it as docs/recipe-reference.md.")
    ] = False,
) -> None:
    """Print every recipe key with its default and meaning."""
    from loratool.recipe import reference, reference_markdown

    typer.echo(reference_markdown() if markdown else reference(), nl=not markdown)


@app.command("recipe-schema")
def recipe_schema() -> None:
    """Print the recipe's JSON Schema (draft 2020-12), for editors: see docs/recipe.schema.json."""
    from loratool.recipe.json_schema import schema_json

    typer.echo(schema_json(), nl=False)


@app.command()
@reports_errors
def merge(
    adapter: Annotated[
        list[Path],
        typer.Option(
            "--adapter",
            help="A finished `loratool train` run directory, or any PEFT LoRA adapter directory "
            "(adapter_config.json + adapter_model.safetensors). Repeat it to combine several adapters "
            "into one (task arithmetic) before merging.",
            show_default=False,
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="DIR_OR_HUB_ID",
            help="The base model (a directory, or a hub id already in the cache). Default: the one run.json "
            "recorded, else adapter_config.json's base_model_name_or_path (of the first adapter).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Where to write the merged model. Default: ADAPTER/merged (the combined adapter's, when "
            "combining).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        typer.Option("--dtype", help="Dtype of the merged weights; auto keeps the base checkpoint's own."),
    ] = "auto",
    qlora_base: Annotated[
        Literal["dequantized", "original"] | None,
        typer.Option(
            "--qlora-base",
            help="QLoRA adapters only: fold into the 4-bit weights as training saw them (dequantized; the "
            "default for 4-bit runs: it reproduces base + adapter as trained) or into the original 16/32-bit "
            "weights (original: the adapter never saw those, so outputs drift by the quantization error). "
            "Pass it for a QLoRA adapter from another tool.",
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            metavar="W1,W2,...",
            help="Several adapters only: one weight per --adapter, comma-separated (negative subtracts). "
            "Default: equal weights 1/n.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"] | None,
        typer.Option(
            "--method",
            help="Several adapters only: how PEFT's add_weighted_adapter combines them. linear (the default) "
            "and ties/dare_* need adapters of equal rank; cat stacks them (any ranks, exact, rank = sum); svd "
            "re-factorises the weighted sum (any ranks, approximate).",
            show_default=False,
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            help="ties / dare_linear / dare_ties only: the fraction of each update's entries kept. "
            "Default: 0.5.",
            show_default=False,
        ),
    ] = None,
    adapter_output: Annotated[
        Path | None,
        typer.Option(
            "--adapter-output",
            help="Several adapters only: where to write the combined adapter. Default: combined-METHOD next "
            "to the first adapter.",
            show_default=False,
        ),
    ] = None,
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only", help="Several adapters only: write the combined adapter, do not merge it."
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Compare the merged model with base + adapter on a few held-out rows, in float32 (loads "
            "both models, one after the other), and fail if they differ.",
        ),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Merge even if --base is not the model run.json says was trained on (or combine adapters "
            "trained on different bases).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a previous merge (or combined adapter) output."),
    ] = False,
) -> None:
    """Fold a LoRA adapter (or a combination of several) into its base model and write a standard Hugging
    Face checkpoint."""
    quiet_libraries()
    if len(adapter) > 1:
        if qlora_base is not None:
            raise LoratoolError(
                "--qlora-base: loratool does not combine QLoRA adapters",
                hint="merge them one by one: loratool merge --adapter RUN (one adapter per command)",
            )
        from loratool.merge.combine import run_combine

        run_combine(
            adapter,
            weights=_parse_weights(weights),
            method=method or "linear",
            density=density,
            base=base,
            adapter_output=adapter_output,
            adapter_only=adapter_only,
            output=output,
            dtype=dtype,
            verify=verify,
            force=force,
            overwrite=overwrite,
            log=typer.echo,
        )
        return
    combining = {
        "--weights": weights is not None,
        "--method": method is not None,
        "--density": density is not None,
        "--adapter-output": adapter_output is not None,
        "--adapter-only": adapter_only,
    }
    given = [name for name, used in combining.items() if used]
    if given:
        raise LoratoolError(
            f"{', '.join(given)}: only used when combining several adapters, and one --adapter was given",
            hint="pass --adapter once per adapter to combine, or drop those options",
        )
    from loratool.merge import run_merge

    run_merge(
        adapter[0],
        base=base,
        output=output,
        dtype=dtype,
        qlora_base=qlora_base,
        verify=verify,
        force=force,
        overwrite=overwrite,
        log=typer.echo,
    )


@app.command()
@reports_errors
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A merged checkpoint (from `loratool merge`, or any HF model directory), or a finished "
            "`loratool train` run directory (merged first).",
            show_default=False,
            metavar="SOURCE",
        ),
    ],
    format_: Annotated[
        Literal["gguf", "hf"],
        typer.Option("--format", help="gguf: one file for llama.cpp / Ollama; hf: a merged HF checkpoint."),
    ] = "gguf",
    outtype: Annotated[
        str,
        typer.Option(
            "--outtype",
            help="GGUF only: type of the 2-D weights (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0); norms "
            "stay f32, and with 4/5-bit types the embeddings and output head stay q8_0.",
        ),
    ] = "f16",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Output directory. gguf: holds <name>.<outtype>.gguf, export.json and the Modelfile; default "
            "SOURCE-gguf next to SOURCE. hf: the merged checkpoint; default SOURCE/merged.",
            show_default=False,
        ),
    ] = None,
    ollama: Annotated[
        bool,
        typer.Option(
            "--ollama", help="GGUF only: also write an Ollama Modelfile with the template and stops."
        ),
    ] = False,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="DIR_OR_HUB_ID",
            help="Run directories only: the base to merge into (default: the one run.json recorded).",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Load the export back and compare its logits.")
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Run directories only: merge even into a base that differs.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous export.")] = False,
) -> None:
    """Write a model where it runs: a GGUF file (llama.cpp, Ollama) or a merged HF checkpoint."""
    quiet_libraries()
    from loratool.export import run_export

    run_export(
        source,
        format=format_,
        outtype=outtype,
        output=output,
        ollama=ollama,
        base=base,
        verify=verify,
        force=force,
        overwrite=overwrite,
        log=typer.echo,
    )


@app.command("eval")
@reports_errors
def eval_(
    target: Annotated[
        Path,
        typer.Argument(
            help="A `loratool train` run directory, a merged checkpoint, or a base model (directory or "
            ".gguf file).",
            show_default=False,
            metavar="TARGET",
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Evaluate on this file (any format `train` reads) instead of the run's validation split.",
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
            help="Report directory. Default: TARGET/eval (for a base model: ./eval-NAME).",
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
    """Held-out loss, perplexity and generation metrics of a fine-tune (and of its base, side by side)."""
    quiet_libraries()
    from loratool.eval import run_eval

    run_eval(
        target,
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
        log=typer.echo,
    )


@app.command()
@reports_errors
def generate(
    target: Annotated[
        Path,
        typer.Argument(
            help="A run directory, a merged checkpoint, or a base model (directory or .gguf file).",
            show_default=False,
            metavar="TARGET",
        ),
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            metavar="TEXT",
            help='A user message (repeatable). "@NAME: text" answers it with adapter NAME ("@base: text": '
            "with no adapter); otherwise the first adapter answers.",
            show_default=False,
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            metavar="[NAME=]DIR",
            help="Another adapter to load on the same base (repeatable); NAME defaults to the directory "
            "name. Its base must be the loaded one.",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy.", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message.", show_default=False)
    ] = None,
    tools: ToolsOption = None,
) -> None:
    """Answer prompts with the fine-tuned model, through its chat template."""
    quiet_libraries()
    from loratool.generate.run import run_generate

    run_generate(
        target,
        prompts=prompt or [],
        adapters=adapter or [],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        system=system,
        tools=tools,
        log=typer.echo,
    )


@app.command()
@reports_errors
def chat(
    target: Annotated[
        Path,
        typer.Argument(
            help="A run directory, a merged checkpoint, or a base model (directory or .gguf file).",
            show_default=False,
            metavar="TARGET",
        ),
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter", metavar="[NAME=]DIR", help="Another adapter (repeatable).", show_default=False
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    system: Annotated[str | None, typer.Option("--system", show_default=False)] = None,
    tools: ToolsOption = None,
) -> None:
    """Talk to the model interactively, answers streamed as they are generated."""
    quiet_libraries()
    from loratool.generate.run import run_chat

    run_chat(
        target,
        adapters=adapter or [],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        system=system,
        tools=tools,
        log=typer.echo,
        write=lambda text: typer.echo(text, nl=False),
    )


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise LoratoolError(
            f"--weights {text!r} is not a comma-separated list of numbers", hint="e.g. --weights 0.7,0.3"
        ) from None


def main() -> None:
    app(prog_name="loratool")


if __name__ == "__main__":
    sys.exit(main())
