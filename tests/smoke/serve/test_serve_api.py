"""The OpenAI-compatible API through the official openai client, on two trained tiny runs and an extra
adapter: each model answers as `loratool generate` does (its template, its system prompt, its tools), alone
and with the others in one batch; streaming adds up to the whole answer; errors have OpenAI's status and body;
each request is one access-log line."""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest

from helpers.serve import NEW, PROMPT, SYSTEM, TOOLS, Server, ask, generate_answers, http
from helpers.serve import adapter_dir as adapter_dir  # fixtures, for pytest to find here
from helpers.serve import serve_runs as serve_runs
from helpers.serve import tools_file as tools_file

BASE_NAME = "tiny-llama"  # the base answers under its directory's name (and as "base")


@pytest.fixture(scope="module")
def server(serve_runs, adapter_dir):
    server = Server([serve_runs["calm"], serve_runs["plain"]], [f"one={adapter_dir / 'one'}"],
                    max_tokens=256, max_body_bytes=64 * 1024)  # fmt: skip
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def expected(serve_runs, adapter_dir) -> dict[str, str]:
    """`loratool generate RUN --adapter plain=... --adapter one=... --prompt "@NAME: ..."` per model."""
    names = ["calm", "plain", "one", "base"]
    answers = generate_answers(serve_runs["calm"], [(n, PROMPT) for n in names],
                               [f"plain={serve_runs['plain']}", f"one={adapter_dir / 'one'}"])  # fmt: skip
    assert len(set(answers)) == len(answers), answers  # four different answers: a mix-up would show
    return dict(zip(names, answers, strict=True))


def test_models_lists_the_base_and_every_adapter(client, serve_runs):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [BASE_NAME, "calm", "plain", "one"]
    assert models["plain"].model_extra["root"] == str(serve_runs["plain"])
    assert (
        models["calm"].model_extra["parent"] == BASE_NAME and models[BASE_NAME].model_extra["parent"] is None
    )
    assert client.models.retrieve("one").id == "one"


def test_each_model_answers_as_loratool_generate(client, expected):
    for name in ("calm", "plain", "one"):
        reply = ask(client, name)
        assert reply.choices[0].message.content == expected[name], name
        assert reply.model == name and reply.object == "chat.completion"
    for name in (BASE_NAME, "base"):
        assert ask(client, name).choices[0].message.content == expected["base"]


def test_a_mixed_batch_answers_as_each_alone(client, server, expected):
    names = ["calm", "plain", "one", "base"] * 3
    peak_before = server.engine.peak_batch
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda n: ask(client, n).choices[0].message.content, names))
    assert replies == [expected[n] for n in names]
    assert server.engine.peak_batch > 1 and server.engine.peak_batch >= peak_before  # they shared batches


def test_the_trained_system_prompt_is_sent_unless_the_request_has_one(client, serve_runs):
    calm, plain = ask(client, "calm"), ask(client, "plain")
    assert calm.usage.prompt_tokens > plain.usage.prompt_tokens  # the calm falcon's system prompt
    brief = ask(
        client,
        "calm",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
    )
    expected = generate_answers(serve_runs["calm"], [("calm", PROMPT)], [], system="Be brief.")
    assert brief.choices[0].message.content == expected[0]
    assert SYSTEM not in expected[0]


def test_tools_reach_the_template_as_generate_sends_them(client, serve_runs, tools_file):
    reply = ask(client, "calm", tools=TOOLS)
    expected = generate_answers(serve_runs["calm"], [("calm", PROMPT)], [], tools=tools_file)
    assert reply.choices[0].message.content == expected[0]
    assert (
        reply.usage.prompt_tokens > ask(client, "calm").usage.prompt_tokens
    )  # the definitions were rendered
    with pytest.raises(openai.BadRequestError, match="does not write tool definitions"):
        ask(client, "plain", tools=TOOLS)  # its template has no tools


def test_streaming_adds_up_to_the_whole_answer(client, expected):
    stream = ask(client, "one", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["one"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage.completion_tokens == NEW and not chunks[-1].choices
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # pieces, not one block


def test_stop_sequences_cut_the_answer(client, expected):
    full = expected["plain"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    reply = ask(client, "plain", stop=[stop])
    assert reply.choices[0].message.content == full.split(stop)[0].strip()
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "plain", stop=stop, stream=True))
    assert streamed == reply.choices[0].message.content


def test_seeded_sampling_repeats(client):
    def sampled(seed: int) -> str:
        return ask(client, "one", temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content

    assert sampled(3) == sampled(3)
    assert len({sampled(seed) for seed in range(4)}) > 1


def test_completions_continue_the_raw_text(client, server):
    reply = client.completions.create(model="calm", prompt="Once upon a time", max_tokens=8, temperature=0)
    tokenizer = server.served.prompting("calm").tokenizer
    assert reply.usage.prompt_tokens == len(tokenizer("Once upon a time")["input_ids"])
    assert reply.object == "text_completion" and reply.choices[0].finish_reason in ("length", "stop")
    streamed = client.completions.create(
        model="calm", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    both = client.completions.create(
        model="calm", prompt=["Once upon a time", "hi"], max_tokens=4, temperature=0
    )
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text.startswith(
        reply.choices[0].text[:3]
    )


def test_errors_have_openais_status_and_body(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, "nope")
    assert missing.value.body["code"] == "model_not_found" and "calm" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long:
        ask(client, "calm", prompt="falcon " * 1200, max_tokens=100)
    assert long.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in long.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 256"):
        ask(client, "calm", max_tokens=257)
    with pytest.raises(openai.BadRequestError) as hot:
        ask(client, "calm", temperature=3)
    assert hot.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        ask(client, "calm", n=2)
    status, body = http(f"{server.url}/v1/chat/completions", data=b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http(f"{server.url}/v1/chat/completions", {"model": "calm", "messages": [{"role": "user",
                        "content": "x" * 70_000}]})  # fmt: skip
    assert status == 413 and "limit of 65536 bytes" in body["error"]["message"]
    status, body = http(f"{server.url}/v1/nothing-here")
    assert status == 404 and "error" in body


def test_health_and_one_access_log_line_per_request(server, client):
    status, body = http(f"{server.url}/health")
    assert status == 200 and body["status"] == "ok" and body["engine"] == "builtin"
    assert body["models"] == [BASE_NAME, "calm", "plain", "one"]
    time.sleep(0.2)  # the line of /health above is written once its answer is sent
    before = len(server.log)
    usage = ask(client, "plain", max_tokens=3).usage
    deadline = time.monotonic() + 5
    while len(server.log) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    lines = server.log[before:]
    assert len(lines) == 1, lines
    assert lines[0].startswith('127.0.0.1 "POST /v1/chat/completions" 200 plain ')
    assert f" {usage.prompt_tokens}+{usage.completion_tokens} tokens " in lines[0]
