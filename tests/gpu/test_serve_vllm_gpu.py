"""On a CUDA GPU with vLLM installed: `loratool serve --engine vllm` starts vLLM's own server with two adapters,
and its greedy answers are the built-in engine's (skipped elsewhere: no vLLM run on CPU)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import conftest
from helpers.serve import Server, ask, http

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
        reason="needs a CUDA GPU and vLLM (pip install 'loratool[vllm]')",
    ),
]
PROMPTS = ["Spell the word backwards: falcon", "Name three colours.", "What is 12 times 12?"]
SMOLLM2 = conftest.REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_vllm_serves_two_adapters_with_the_builtin_engines_greedy_answers(tmp_path):
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is absent: run `python scripts/fetch_smollm2.py`")
    from loratool.model.gguf_base import resolve_base_model

    # vLLM loads Hugging Face checkpoints: both sides serve the conversion of the GGUF. Short answers: the two
    # engines' kernels round differently, and a long greedy answer may part where two logits nearly tie.
    base = resolve_base_model(str(SMOLLM2), log=lambda _: None)
    adapters = {
        name: conftest.random_adapter(
            base, tmp_path / name, seed, r=8, scale=0.02, target_modules="all-linear"
        )
        for seed, name in enumerate(("alpha", "beta"))
    }
    options = [f"{name}={path}" for name, path in adapters.items()]
    builtin = Server([base], options)
    try:
        expected = {(n, p): ask(builtin.client(), n, p, max_tokens=12).choices[0].message.content
                    for n in adapters for p in PROMPTS}  # fmt: skip
    finally:
        builtin.close()

    port = free_port()
    command = [sys.executable, "-m", "loratool", "serve", base, *sum((["--adapter", o] for o in options), []),
               "--engine", "vllm", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "vLLM did not start"
            time.sleep(2)
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} >= {"alpha", "beta"}
        for (name, prompt), answer in expected.items():
            assert ask(client, name, prompt, max_tokens=12).choices[0].message.content == answer, (
                name,
                prompt,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
