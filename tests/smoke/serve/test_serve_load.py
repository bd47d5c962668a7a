"""Overload and disconnects over HTTP: a full queue answers 429, a client that goes away mid-stream frees
its slot at once, and the server stays healthy for the next request."""

from __future__ import annotations

import time

import openai
import pytest

from helpers.serve import PROMPT, Server, ask, http
from helpers.serve import adapter_dir as adapter_dir  # fixtures, for pytest to find here
from helpers.serve import serve_runs as serve_runs

LONG = {"max_tokens": 1500, "extra_body": {"ignore_eos": True}}  # runs until cancelled


@pytest.fixture(scope="module")
def server(serve_runs):
    server = Server([serve_runs["plain"]], max_batch=1, max_queue=0, max_tokens=2000)
    yield server
    server.close()


def wait_idle(server: Server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http(f"{server.url}/health")
        if body["active"] == 0 and body["waiting"] == 0:
            return body
        time.sleep(0.05)
    raise AssertionError(f"the server is still busy: {body}")


def test_a_full_queue_answers_429_and_a_closed_stream_frees_its_slot(server):
    client = server.client()
    stream = ask(client, "plain", stream=True, **LONG)
    chunks = iter(stream)  # kept: a dropped iterator closes the response
    first = next(chunks)  # the request holds the one slot now
    assert first.choices[0].delta.role == "assistant"
    with pytest.raises(openai.RateLimitError) as busy:
        ask(client, "plain")
    assert busy.value.status_code == 429 and busy.value.body["code"] == "queue_full"
    stream.close()  # the client goes away mid-answer
    assert wait_idle(server)["status"] == "ok"
    assert ask(client, "plain").choices[0].message.content  # the slot is free again
    deadline = time.monotonic() + 5
    while not any("(client went away)" in line for line in server.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(
        '"POST /v1/chat/completions" 200 plain' in line and "(client went away)" in line
        for line in server.log
    )


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(server):
    import openai as sdk

    impatient = server.client(timeout=1.0)
    with pytest.raises(sdk.APITimeoutError):
        ask(impatient, "plain", **LONG)
    assert wait_idle(server)["active"] == 0
    assert ask(server.client(), "plain", prompt=PROMPT).choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow  # a few hundred requests: ~30 s on 2 CPU cores
def test_a_bounded_load_ends_with_every_request_answered_or_refused_and_the_server_idle(
    serve_runs, adapter_dir
):
    import concurrent.futures
    import random
    import resource

    server = Server([serve_runs["calm"], serve_runs["plain"]], [f"one={adapter_dir / 'one'}"],
                    max_batch=8, max_queue=8, max_tokens=64)  # fmt: skip
    try:
        client = server.client(timeout=120)
        ask(client, "calm")  # warm
        idle_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        refusals: list[int] = []

        def one(i: int) -> str:
            rng = random.Random(i)
            model = ["calm", "plain", "one", "base"][i % 4]
            for _ in range(50):  # a client that backs off and retries when the queue is full
                try:
                    if i % 5 == 0:  # a streamed answer its client abandons after a few pieces
                        chunks = iter(
                            ask(client, model, stream=True, max_tokens=64, extra_body={"ignore_eos": True})
                        )
                        for _ in range(rng.randint(1, 4)):
                            next(chunks)
                        chunks.close()
                        return "cancelled"
                    reply = ask(client, model, max_tokens=rng.randint(1, 24))
                    return "answered" if reply.choices[0].finish_reason in ("stop", "length") else "odd"
                except openai.RateLimitError:
                    refusals.append(i)
                    time.sleep(rng.uniform(0.05, 0.2))
            return "refused"

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(one, range(240)))
        assert set(outcomes) <= {"answered", "cancelled"}, (
            outcomes
        )  # each answered, or abandoned by its client
        assert outcomes.count("cancelled") == 48
        assert refusals  # 24 clients for 8 + 8 places: the bound was reached, and said so with 429
        body = wait_idle(server, timeout=30)
        assert body["status"] == "ok"
        assert server.engine._cache is None  # every row left the batch: no cache is held
        assert ask(client, "plain").choices[0].message.content  # still answering
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - idle_rss) / 1024
        assert grown_mb < 200, f"peak memory grew {grown_mb:.0f} MB under load"
    finally:
        server.close()
