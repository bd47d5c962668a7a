"""`loratool generate` and `chat`: answer prompts with a fine-tuned model, or talk to it."""

from __future__ import annotations

from typing import Annotated

import typer

from loratool.cli.application import reports_errors, start_libraries
from loratool.cli.options import (
    AdapterOption,
    MaxNewTokensOption,
    SystemOption,
    TargetArgument,
    TemperatureOption,
    ToolsOption,
    TopPOption,
)


@reports_errors
def generate(
    target: TargetArgument,
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
    adapter: AdapterOption = None,
    max_new_tokens: MaxNewTokensOption = 256,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    system: SystemOption = None,
    tools: ToolsOption = None,
) -> None:
    """Answer prompts with the fine-tuned model, through its chat template."""
    start_libraries()
    from loratool.generate.run import run_generate  # deferred: generating loads torch and transformers

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


@reports_errors
def chat(
    target: TargetArgument,
    adapter: AdapterOption = None,
    max_new_tokens: MaxNewTokensOption = 512,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    system: SystemOption = None,
    tools: ToolsOption = None,
) -> None:
    """Talk to the model interactively, answers streamed as they are generated."""
    start_libraries()
    from loratool.generate.run import run_chat  # deferred: loads torch and transformers

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
