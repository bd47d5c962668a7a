"""`loratool serve`, top to bottom: refuse an exposed server without a key, resolve the runs, pick the
engine, then either hand over to vLLM or load the base and adapters once and serve them with the built-in
engine behind the OpenAI-compatible API until a signal stops it.

Stopping: SIGTERM (or Ctrl+C) makes uvicorn close the listening socket and wait for open connections, and
the engine take no new jobs; whatever is still running after --shutdown-timeout seconds is cancelled (a
streamed answer ends with an error event, a whole one with 503). The process then exits 0.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError
from loratool.generate.run import BASE, plain_name
from loratool.generate.target import Target
from loratool.serve.engine import Engine
from loratool.serve.served import (
    DEFAULT_MAX_RANK,
    Served,
    base_name,
    generation_config_notes,
    load_served,
    refuse_unservable,
    resolve_runs,
)
from loratool.serve.vllm import exec_vllm, pick_engine, vllm_plan

if TYPE_CHECKING:
    from loratool.serve.api import Limits

ENGINES = ("auto", "builtin", "vllm")


def run_serve(
    runs: list[Path],
    *,
    adapters: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    insecure: bool = False,
    engine: str = "auto",
    adapter_dir: Path | None = None,
    max_lora_rank: int | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens: int = 1024,
    max_body_bytes: int = 1 << 20,
    shutdown_timeout: float = 30.0,
    threads: int | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """Serve RUNs (see the package docstring); returns when the server has stopped."""
    from loratool.serve.api import Limits  # deferred: FastAPI, only when serving

    check_exposure(host, api_key, insecure, log)
    if engine not in ENGINES:
        raise LoratoolError(
            f"--engine {engine!r}: choose one of {', '.join(ENGINES)}", hint="--engine auto picks one"
        )
    target, extra = resolve_runs(runs, adapters or [], log)
    every = {**({target.adapter_name: target.path} if target.kind == "run" else {}), **dict(extra)}
    name = base_name(target, plain_name(target))
    chosen, why = pick_engine(engine, gpu=_cuda)
    if chosen == "vllm":
        if adapter_dir is not None:
            raise LoratoolError("--adapter-dir: loading adapters at run time works with the built-in engine only "
                                "(vLLM's own loading takes any path a client names)",
                                hint="drop --adapter-dir, or serve with --engine builtin")  # fmt: skip
        try:
            plan = vllm_plan(target, every, host=host, port=port, base_name=name, max_rank=max_lora_rank,
                             api_key=api_key, log=log)  # fmt: skip
        except LoratoolError as exc:
            if engine != "auto":
                raise
            chosen, why = "builtin", f"auto: {exc.message}"
        else:
            log(f"engine: vllm ({why})")
            for note in plan.notes:
                log(note)
            log(f"models: {', '.join([name, *every])}")
            log(f"{'would run' if dry_run else 'running'}: {plan.shown}")
            if not dry_run:
                exec_vllm(plan)
            return
    rank = max_lora_rank or DEFAULT_MAX_RANK
    for adapter, folder in every.items():
        refuse_unservable(adapter, folder, rank)
    if dry_run:
        log(f"engine: builtin ({why})")
        log(f"models: {', '.join([name, *every])}")
        log(f"would serve on {_url(host, port)}/v1")
        return
    sock = listen(host, port)  # before loading: a port in use fails now, not after minutes of loading
    url = _url(host, sock.getsockname()[1])
    served, engine_, app = prepare_builtin(
        target,
        extra,
        adapter_dir=adapter_dir,
        max_rank=rank,
        max_batch=max_batch,
        max_queue=max_queue,
        limits=Limits(max_tokens=max_tokens, max_body_bytes=max_body_bytes),
        api_key=api_key,
        log=log,
        on_start=lambda: _banner(served, engine_, url, why, cpu, api_key, log),
    )
    # Before the engine thread's first operation: torch gives a new thread the count set last.
    cpu = engine_threads(threads, served.adapters.loaded.device)
    _serve_until_stopped(app, sock, engine_, shutdown_timeout)
    log("stopped")


def prepare_builtin(
    target: Target,
    extra: list[tuple[str, Path]],
    *,
    adapter_dir: Path | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    max_batch: int = 8,
    max_queue: int = 64,
    limits: Limits | None = None,
    api_key: str | None = None,
    log: Callable[[str], None] = print,
    on_start: Callable[[], None] = lambda: None,
) -> tuple[Served, Engine, Any]:
    """Load the base and adapters once; the engine over them and the app over both (served by the caller)."""
    from loratool.serve.api import Limits, build_app  # deferred: FastAPI, only when serving

    served = load_served(target, extra, max_rank=max_rank, adapter_dir=adapter_dir, log=log)
    for note in generation_config_notes(served.adapters.model):
        log(note)
    loaded = served.adapters.loaded
    tokenizer = loaded.tokenizer
    pad_id = next((int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    engine = Engine(lambda: served.adapters.model, pad_id=pad_id, context=loaded.context,
                    max_batch=max_batch, max_queue=max_queue, log=log)  # fmt: skip
    app = build_app(served, engine, limits=limits or Limits(), api_key=api_key, log=log, on_start=on_start)
    return served, engine, app


# --- CPU threads ---------------------------------------------------------------------------------------------


def engine_threads(requested: int | None, device: str) -> str:
    """Set the intra-op threads the built-in engine computes with on a CPU; return what the banner says.

    On the CPU the process does two jobs at once: the engine's forward passes, and the HTTP side
    (uvicorn's event loop, tokenizing, streaming). With a thread per core the engine's threads spin at every
    small operation's barrier while the HTTP side waits for a core: on 2 cores, 8 clients over 3 adapters got
    33.7 tokens/s with 2 threads and 43.9 with 1 (docs/benchmarks.md, "Serving"); one request at a time was
    faster with 1 as well. So the engine leaves one core to the HTTP side. A user's --threads or
    OMP_NUM_THREADS is kept; on a GPU the count is left alone."""
    import os

    import torch

    if requested is not None:
        torch.set_num_threads(requested)
        return f"{requested} CPU thread{'s' if requested > 1 else ''} (--threads)"
    if device != "cpu":
        return ""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return f"{torch.get_num_threads()} CPU threads (OMP_NUM_THREADS)"
    chosen, why = leave_a_core(torch.get_num_threads())
    torch.set_num_threads(chosen)
    return why


def leave_a_core(threads: int) -> tuple[int, str]:
    """One thread fewer than torch would use (its default is a thread per core, fewer on busy cores)."""
    chosen = max(1, threads - 1)
    left = "one core left to the HTTP side" if threads > 1 else "the only core"
    return (
        chosen,
        f"{chosen} CPU thread{'s' if chosen > 1 else ''} of {threads} ({left}; --threads N to change)",
    )


# --- safety --------------------------------------------------------------------------------------------------


def check_exposure(host: str, api_key: str | None, insecure: bool, log: Callable[[str], None]) -> None:
    """Refuse to listen beyond this machine without an API key, unless --insecure says the network is trusted."""
    if is_loopback(host) or api_key:
        return
    if insecure:
        log(f"warning: serving on {host} without an API key (--insecure): anyone who can reach it can use it")
        return
    raise LoratoolError(
        f"--host {host} makes the server reachable from other machines, and no API key is set",
        hint="set --api-key KEY (or LORATOOL_API_KEY), or pass --insecure if every machine that can reach it is "
        "trusted",
    )


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) means this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


# --- the HTTP server -----------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise LoratoolError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pick another --port (--port 0 takes a free one), or stop what is using it",
        ) from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve_until_stopped(app: Any, sock: socket.socket, engine: Any, shutdown_timeout: float) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, which also tells the engine to drain the moment a signal asks it to stop."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)  # fmt: skip
    # uvicorn raises the signal it stopped on again once it is done, to the handler in place before it
    # started: a no-op one makes SIGTERM end in a clean exit 0 instead of "killed by SIGTERM".
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def serving_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0
) -> Iterator[str]:
    """Serve `app` from a thread of this process (tests, benchmarks); yields the base URL."""
    import uvicorn

    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="loratool-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LoratoolError("the server did not start", hint="see the messages above")
        time.sleep(0.02)
    try:
        yield _url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def _banner(
    served: Served, engine: Any, url: str, why: str, cpu: str, api_key: str | None, log: Callable[[str], None]
) -> None:
    loaded = served.adapters.loaded
    log(f"serving on {url}/v1 (OpenAI-compatible; {url}/health)")
    threads = f", {cpu}" if cpu else ""
    log(f"engine: builtin ({why}) on {loaded.device}, {loaded.dtype}{threads}; up to {engine.max_batch} requests "
        f"per batch, {engine.max_queue} waiting")  # fmt: skip
    models = [f"{served.base_name} (the base)"]
    models += [
        f"{name} ({served.dirs.get(name, served.target.path)})"
        for name in served.adapters.names
        if name != BASE
    ]
    log("models: " + ", ".join(models))
    log("API key: required (Authorization: Bearer ...)" if api_key else "API key: none (this machine only)")
    if served.adapter_dir is not None:
        log(f"adapters may be loaded at run time from {served.adapter_dir} (POST /v1/load_lora_adapter)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
