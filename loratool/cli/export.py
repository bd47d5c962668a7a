"""`loratool export`: write a model where it runs, as a GGUF file or a merged HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from loratool.cli.application import reports_errors, start_libraries
from loratool.rundir.signals import terminate_as_interrupt


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
        Literal["gguf", "gguf-lora", "hf"],
        typer.Option(
            "--format",
            help="gguf: one file for llama.cpp / Ollama; gguf-lora: a run's adapter alone, for llama.cpp "
            "--lora / Ollama ADAPTER on the base's GGUF (f16 or f32); hf: a merged HF checkpoint.",
        ),
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
            "SOURCE-gguf next to SOURCE. gguf-lora: <name>.lora.<outtype>.gguf, export.json, Modelfile; "
            "default SOURCE-gguf-lora. hf: the merged checkpoint; default SOURCE/merged. For a checkpoint "
            "RUN/checkpoints/checkpoint-N the defaults sit outside the checkpoints (save_total_limit may delete "
            "them): RUN-checkpoint-N-gguf (-gguf-lora) next to RUN, and RUN/merged-checkpoint-N.",
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
            help="Run directories only: the base to merge into (default: the one run.json recorded); "
            "gguf-lora: the base whose architecture the adapter is written for, and the Modelfile's FROM.",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Load the export back and compare its logits.")
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Run directories only: export even onto a base that differs, or from an unsealed checkpoint.",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous export.")] = False,
) -> None:
    """Write a model where it runs: a GGUF file (llama.cpp, Ollama) or a merged HF checkpoint."""
    start_libraries()
    from loratool.export import run_export  # deferred: exporting loads torch and transformers

    with terminate_as_interrupt():  # SIGTERM stops it like Ctrl-C: partial output removed, lock released
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
