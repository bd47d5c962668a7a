"""`loratool serve` through the real CLI: what it refuses before loading, the vLLM command it would run,
a directory of runs; and as a process: the start-up lines, the API key, SIGTERM ending in exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from helpers.serve import PROMPT, cli, http
from helpers.serve import serve_runs as serve_runs  # a fixture, for pytest to find here


def test_a_server_beyond_this_machine_without_a_key_is_refused(serve_runs):
    result = cli("serve", serve_runs["calm"], "--host", "0.0.0.0")
    assert result.exit_code == 1
    assert "reachable from other machines" in result.output and "--insecure" in result.output


def test_engine_vllm_prints_the_command_it_would_run(serve_runs):
    result = cli(
        "serve", serve_runs["calm"], serve_runs["plain"], "--engine", "vllm", "--dry-run", "--port", "8011"
    )
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("would run: "))
    assert " serve " in line and "--enable-lora" in line and "--port 8011" in line
    assert f"--lora-modules calm={serve_runs['calm']} plain={serve_runs['plain']}" in line
    assert "--max-lora-rank 8" in line  # the smoke recipes train r=8
    assert "--served-model-name tiny-llama" in line
    assert "was trained with a system prompt that vLLM does not add" in result.output  # calm's


def test_engine_vllm_refuses_runtime_loading(serve_runs, tmp_path):
    result = cli("serve", serve_runs["calm"], "--engine", "vllm", "--adapter-dir", tmp_path, "--dry-run")
    assert result.exit_code == 1 and "built-in engine only" in result.output


def test_a_directory_of_runs_serves_each_under_its_name(serve_runs):
    result = cli("serve", serve_runs["calm"].parent, "--engine", "builtin", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "models: tiny-llama, calm, plain" in result.output
    assert "engine: builtin (asked for with --engine)" in result.output


def test_a_rank_above_the_limit_is_refused_before_loading(serve_runs):
    result = cli("serve", serve_runs["calm"], "--max-lora-rank", "4", "--dry-run")
    assert result.exit_code == 1 and "rank 8 is above this server's limit of 4" in result.output


@pytest.mark.slow  # a process that loads torch and the model: ~20-40 s on 2 CPU cores
def test_the_process_prints_what_it_serves_requires_its_key_and_stops_cleanly_on_sigterm(
    serve_runs, tmp_path
):
    env = {**os.environ, "LORATOOL_API_KEY": "s3cret", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "loratool", "serve", str(serve_runs["calm"]), str(serve_runs["plain"]),
         "--port", "0", "--shutdown-timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("serving on ") for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        url = next(line for line in lines if line.startswith("serving on ")).split()[2].removesuffix("/v1")
        assert any(line.startswith("engine: builtin (auto: vLLM is not installed)") for line in lines)
        engine_line = next(line for line in lines if line.startswith("engine: builtin"))
        assert " CPU thread" in engine_line and "--threads N to change" in engine_line, engine_line
        assert any(
            line.startswith("models: tiny-llama (the base), calm (") and "plain (" in line for line in lines
        )

        assert http(f"{url}/health")[0] == 200  # /health needs no key
        status, body = http(f"{url}/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-llama", "calm", "plain"]

        stream = client.chat.completions.create(model="calm", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=1000, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = iter(stream)
        next(chunks)  # in flight now
        process.send_signal(signal.SIGTERM)
        received, cancelled = [], None
        try:
            received.extend(chunks)  # the answer goes on after the signal, until done or the bound
        except openai.APIError as exc:  # cancelled at the bound: the stream's last event is the error
            cancelled = exc
        assert process.wait(timeout=30) == 0
        assert received
        assert cancelled is None or "shut down before this answer was finished" in str(cancelled)
        with pytest.raises(OSError):
            http(f"{url}/health")  # nothing listens any more
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    reader.join(5)
    output = "".join(lines)
    assert '"POST /v1/chat/completions" 200 calm' in output and output.rstrip().endswith("stopped")
