"""What the generate tests of several tiers share: the prompt, the CLI call, random adapters and
the reference answer from transformers' own generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import conftest
from loratool.cli import app

PROMPT = "Spell the word backwards: falcon"


def cli(*args: str | Path, input: str | None = None):
    return CliRunner().invoke(app, [*map(str, args)], input=input)


def random_adapter(base: Path, out: Path, seed: int) -> Path:
    """Large random weights on every linear layer, so that adapters visibly change the answers."""
    return conftest.random_adapter(base, out, seed, scale=0.5, target_modules="all-linear")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(tiny_llama, tmp / name, seed) for name, seed in (("one", 1), ("two", 2))}


def reference_answer(
    base: Path,
    adapter: Path | None,
    prompt: str,
    max_new_tokens: int,
    *,
    tokenizer_dir: Path | None = None,
    system: str | None = None,
    tools: list | None = None,
) -> str:
    """transformers' own greedy generate on the chat-templated prompt (the template of `tokenizer_dir`,
    default the base's, with the BOS the tokenizer puts before text first), stopping at the tokenizer's EOS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    bos = tokenizer.bos_token_id
    if tokenizer("x")["input_ids"][:1] == [bos] and ids[0, 0] != bos:  # the BOS tokenizer(text) adds
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
