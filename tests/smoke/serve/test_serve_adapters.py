"""Adapters loaded and unloaded while serving (vLLM's routes and bodies): one from --adapter-dir answers as
`loratool generate --adapter` does; another base, DoRA, a rank above the limit and any path outside the
directory are refused with the reason; without --adapter-dir nothing can be loaded."""

from __future__ import annotations

import openai
import pytest

from helpers.serve import PROMPT, Server, ask, generate_answers, http
from helpers.serve import adapter_dir as adapter_dir  # fixtures, for pytest to find here
from helpers.serve import serve_runs as serve_runs


@pytest.fixture(scope="module")
def server(serve_runs, adapter_dir):
    server = Server([serve_runs["plain"]], adapter_dir=adapter_dir)
    yield server
    server.close()


def load(server: Server, name: str, path: str) -> tuple[int, object]:
    return http(f"{server.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def unload(server: Server, name: str) -> tuple[int, object]:
    return http(f"{server.url}/v1/unload_lora_adapter", {"lora_name": name})


def test_an_adapter_loaded_at_run_time_answers_as_generate_then_unloads(server, serve_runs, adapter_dir):
    client = server.client()
    assert load(server, "two", "two") == (200, "Success: LoRA adapter 'two' added successfully.")
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "plain", "two"]
    expected = generate_answers(serve_runs["plain"], [("two", PROMPT), ("plain", PROMPT)],
                                [f"two={adapter_dir / 'two'}"])  # fmt: skip
    assert ask(client, "two").choices[0].message.content == expected[0]
    assert ask(client, "plain").choices[0].message.content == expected[1]  # the others are untouched
    assert load(server, "two", "one")[0] == 400  # the name is taken
    assert unload(server, "two") == (200, "Success: LoRA adapter 'two' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        ask(client, "two")
    assert unload(server, "two")[0] == 404
    assert unload(server, "tiny-llama")[0] == 400  # the base stays


def test_the_last_adapter_can_go_and_come_back(server, serve_runs, adapter_dir):
    client = server.client()
    expected = generate_answers(serve_runs["plain"], [("base", PROMPT), ("one", PROMPT)],
                                [f"one={adapter_dir / 'one'}"])  # fmt: skip
    assert unload(server, "plain")[0] == 200  # the run's own adapter, the last one on the model
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert ask(client, "base").choices[0].message.content == expected[0]  # the plain base answers
    assert load(server, "one", "one")[0] == 200
    assert ask(client, "one").choices[0].message.content == expected[1]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("dora", "DoRA"),
        ("wide", "rank 128 is above this server's limit of 64"),
        ("elsewhere", "their weights differ"),
        ("../", "outside this server's adapter directory"),
        ("/etc", "outside this server's adapter directory"),
        ("missing", "adapter directory not found"),
    ],
)
def test_adapters_the_server_cannot_serve_are_refused_with_the_reason(server, path, reason):
    status, body = load(server, "new", path)
    assert status == 400, body
    assert reason in body["error"]["message"]
    assert "new" not in [m["id"] for m in http(f"{server.url}/v1/models")[1]["data"]]


def test_without_an_adapter_dir_nothing_is_loaded(serve_runs, adapter_dir):
    server = Server([serve_runs["plain"]])
    try:
        status, body = load(server, "one", str(adapter_dir / "one"))
        assert status == 403 and "--adapter-dir" in body["error"]["message"]
    finally:
        server.close()
