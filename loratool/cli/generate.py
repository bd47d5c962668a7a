"""`loratool generate` and `chat`: answer prompts with a fine-tuned model, or talk to it."""

from __future__ import annotations

from typing import Annotated

import typer

from loratool.cli.application import quiet_libraries, reports_errors
from loratool.cli.options import MaxNewTokensOption, TargetArgument, ToolsOption, TopPOption


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
    max_new_tokens: MaxNewTokensOption = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy.", min=0.0)] = 0.0,
    top_p: TopPOption = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message.", show_default=False)
    ] = None,
    tools: ToolsOption = None,
) -> None:
    """Answer prompts with the fine-tuned model, through its chat template."""
    quiet_libraries()
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
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter", metavar="[NAME=]DIR", help="Another adapter (repeatable).", show_default=False
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOption = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    top_p: TopPOption = 1.0,
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
