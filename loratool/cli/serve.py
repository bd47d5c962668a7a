"""`loratool serve`: one base and its adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loratool.cli.application import reports_errors, start_libraries
from loratool.cli.options import AdapterOption


@reports_errors
def serve(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories on one base (each adapter is served under its run's name), or a directory "
            "of runs. The first may also be a merged model or a base model.",
            show_default=False,
            metavar="RUN",
        ),
    ],
    adapter: AdapterOption = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; beyond this machine it needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on (0: a free one).", min=0, max=65535)
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LORATOOL_API_KEY",
            help="Require `Authorization: Bearer KEY` on every route but /health.",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback --host without an API key.")
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="builtin (transformers + PEFT, batching), vllm (vLLM's own server, GPU), or auto: vLLM when "
            "it is installed and a GPU is present.",
        ),
    ] = "auto",
    adapter_dir: Annotated[
        Path | None,
        typer.Option(
            "--adapter-dir",
            help="Allow POST /v1/load_lora_adapter to load adapters from this directory (and nowhere else).",
            show_default=False,
        ),
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            "--max-lora-rank",
            min=1,
            help="Refuse adapters of a higher rank (builtin default 64; vllm: the smallest that fits).",
            show_default=False,
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Requests decoded together.")] = 8,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests that may wait; more get 429.")
    ] = 64,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="New tokens one request may ask for.")
    ] = 1024,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, help="Request body limit, in bytes.")] = 1
    << 20,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout", min=0.0, help="Seconds in-flight requests get to finish on SIGTERM."
        ),
    ] = 30.0,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads the built-in engine computes with (default on a CPU: one per core but one, "
            "which is left to the HTTP side).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Check the adapters and print what would be served (and the vLLM command)."
        ),
    ] = False,
) -> None:
    """Serve the base and every adapter behind an OpenAI-compatible API (/v1/chat/completions, ...)."""
    start_libraries()
    from loratool.serve.run import run_serve  # deferred: serving loads torch, transformers and FastAPI

    run_serve(
        runs,
        adapters=adapter or [],
        host=host,
        port=port,
        api_key=api_key,
        insecure=insecure,
        engine=engine,
        adapter_dir=adapter_dir,
        max_lora_rank=max_lora_rank,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens=max_tokens,
        max_body_bytes=max_body,
        shutdown_timeout=shutdown_timeout,
        threads=threads,
        dry_run=dry_run,
        log=typer.echo,
    )
