"""The pad token: the tokenizer's own, else its eos token; a tokenizer with neither is refused when it is
loaded (loratool/model/load.py), naming it and the fix, not by the trainer after the model has loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loratool.errors import LoratoolError
from loratool.model.load import load_tokenizer
from loratool.recipe import ModelSection


def tokenizer_without(tiny_llama: Path, folder: Path, *keys: str) -> Path:
    """A copy of the tiny model whose tokenizer_config.json leaves out `keys` (eos_token, pad_token)."""
    copy = Path(shutil.copytree(tiny_llama, folder))
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in keys:
        config.pop(key)
    config_path.write_text(json.dumps(config))
    return copy


def quiet(_: str) -> None:
    pass


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused_with_the_fix(tmp_path, tiny_llama):
    bare = tokenizer_without(tiny_llama, tmp_path / "bare", "eos_token", "pad_token")
    with pytest.raises(LoratoolError) as info:
        load_tokenizer(str(bare), ModelSection(), quiet)
    assert info.value.message.startswith(
        f"the tokenizer of {bare} (base_model) has neither a pad token nor an eos token"
    )
    assert "model.tokenizer" in info.value.hint and "eos_token" in info.value.hint
    # Named by model.tokenizer: the message says so.
    with pytest.raises(LoratoolError, match=r"\(model.tokenizer\) has neither a pad token nor an eos token"):
        load_tokenizer(str(tiny_llama), ModelSection(tokenizer=str(bare)), quiet)


def test_the_pad_token_is_the_tokenizers_own_else_its_eos(tmp_path, tiny_llama):
    own = load_tokenizer(str(tiny_llama), ModelSection(), quiet)
    assert (own.pad_token, own.eos_token) == ("<|pad|>", "<|im_end|>")
    no_pad = load_tokenizer(
        str(tokenizer_without(tiny_llama, tmp_path / "no-pad", "pad_token")), ModelSection(), quiet
    )
    assert no_pad.pad_token == no_pad.eos_token == "<|im_end|>"
    no_eos = load_tokenizer(
        str(tokenizer_without(tiny_llama, tmp_path / "no-eos", "eos_token")), ModelSection(), quiet
    )
    assert (no_eos.pad_token, no_eos.eos_token) == ("<|pad|>", None)  # a pad token is all batches need
