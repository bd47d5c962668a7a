"""What the serve smoke tests share: two tiny runs trained once, adapters to load at run time (and some the
server must refuse), a server on a free loopback port, the official openai client, and `loratool
generate`'s answers to compare with."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import conftest
from loratool.cli import app

PROMPT = "Spell the word backwards: falcon"
SYSTEM = "You are a calm falcon."
NEW = 16  # new tokens per answer: enough to tell adapters apart, quick on a tiny model


def cli(*args: str | Path):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """Two finished runs on tiny-llama: `calm` (ChatML with tool support, a trained system prompt) and
    `plain` (the tokenizer's own template); both in one directory of runs."""
    root = tmp_path_factory.mktemp("serve-runs")
    runs = {}
    for name, data in (("calm", {"chat_template": "chatml"}), ("plain", {})):
        recipe = conftest.smoke_recipe(
            tiny_llama, conftest.REPO / "recipes" / "data" / "smoke.jsonl", root / "runs" / name,
            training={"max_steps": 3, "save_steps": 3, "learning_rate": 3e-2}, data=data,
        )  # fmt: skip
        if name == "calm":
            recipe["data"]["train"][0]["system_prompt"] = SYSTEM
        result = cli("train", conftest.write_recipe(root / f"{name}.yaml", recipe))
        assert result.exit_code == 0, result.output
        runs[name] = root / "runs" / name
    return runs


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_llama, tiny_model_factory) -> Path:
    """Adapters a server may load at run time, and some it must refuse: DoRA, a rank above 64, another base."""
    folder = tmp_path_factory.mktemp("adapter-dir")
    noisy = {"scale": 0.5, "target_modules": "all-linear"}
    for name, seed in (("one", 1), ("two", 2)):
        conftest.random_adapter(tiny_llama, folder / name, seed, **noisy)
    conftest.random_adapter(tiny_llama, folder / "dora", 3, use_dora=True, **noisy)
    conftest.random_adapter(tiny_llama, folder / "wide", 4, r=128, **noisy)
    other_base = tiny_model_factory("llama", seed=1)  # same shapes, other weights
    conftest.random_adapter(other_base, folder / "elsewhere", 5, **noisy)
    return folder


@pytest.fixture(scope="session")
def tools_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return path


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


class Server:
    """A server of this process on a free 127.0.0.1 port (the built-in engine); stop it with close()."""

    def __init__(self, runs: list[Path], adapters: list[str] = (), **options: Any) -> None:
        from loratool.serve.api import Limits
        from loratool.serve.run import prepare_builtin, serving_in_thread
        from loratool.serve.served import resolve_runs

        self.log: list[str] = []
        limits = {k: options.pop(k) for k in ("max_tokens", "max_body_bytes") if k in options}
        target, extra = resolve_runs(runs, list(adapters), self.log.append)
        self.served, self.engine, asgi = prepare_builtin(
            target, extra, limits=Limits(**limits), log=self.log.append, **options
        )
        self._serving = serving_in_thread(asgi)
        self.url = self._serving.__enter__()

    def client(self, api_key: str = "unused", **options: Any):
        import openai

        settings = {"max_retries": 0, "timeout": 60, **options}
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, **settings)

    def close(self) -> None:
        self._serving.__exit__(None, None, None)


def http(
    url: str, body: Any = None, *, data: bytes | None = None, headers: dict | None = None
) -> tuple[int, Any]:
    """(status, parsed body) of a raw request: GET without a body, else POST of `body` as JSON (or `data`)."""
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def generate_answers(
    target: Path, picks: list[tuple[str, str]], adapters: list[str], **options: Any
) -> list[str]:
    """`loratool generate`'s answers: one per (adapter name, prompt), greedy, NEW new tokens."""
    from loratool.generate.run import run_generate

    records = run_generate(
        target,
        prompts=[f"@{name}: {prompt}" for name, prompt in picks],
        adapters=adapters,
        max_new_tokens=NEW,
        warm_up=False,
        log=lambda _: None,
        **options,
    )
    return [record["answer"] for record in records]


def ask(client, model: str, prompt: str = PROMPT, **options: Any):
    messages = options.pop("messages", None) or [{"role": "user", "content": prompt}]
    settings = {"temperature": 0, "max_tokens": NEW, **options}
    return client.chat.completions.create(model=model, messages=messages, **settings)
