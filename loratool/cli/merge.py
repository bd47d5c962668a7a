"""`loratool merge`: fold one adapter into its base model, or first combine several adapters into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from loratool.cli.application import reports_errors, start_libraries
from loratool.errors import LoratoolError
from loratool.rundir.signals import terminate_as_interrupt


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
            "combining); for a checkpoint RUN/checkpoints/checkpoint-N, RUN/merged-checkpoint-N (outside the "
            "checkpoint, which save_total_limit may delete).",
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
            help="Merge even if --base is not the model run.json says was trained on, or a checkpoint that "
            "is not sealed complete (or combine adapters trained on different bases).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a previous merge (or combined adapter) output."),
    ] = False,
) -> None:
    """Fold a LoRA adapter (or a combination of several) into its base model and write a standard Hugging
    Face checkpoint."""
    start_libraries()
    if len(adapter) > 1:
        if qlora_base is not None:
            raise LoratoolError(
                "--qlora-base: loratool does not combine QLoRA adapters",
                hint="merge them one by one: loratool merge --adapter RUN (one adapter per command)",
            )
        # deferred, here and below: merging loads torch, transformers and peft
        from loratool.merge.combine import run_combine

        with terminate_as_interrupt():  # SIGTERM stops it like Ctrl-C: partial output removed, lock released
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

    with terminate_as_interrupt():
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


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise LoratoolError(
            f"--weights {text!r} is not a comma-separated list of numbers", hint="e.g. --weights 0.7,0.3"
        ) from None
