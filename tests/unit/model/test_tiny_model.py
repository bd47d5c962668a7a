"""The tiny model builder must produce directories that load like hub checkpoints, fully offline.

Other tests, CI smoke runs and benchmarks build on these models, so the properties they rely on are pinned
here: reloadable with the Auto classes, BOS handling, exact ChatML rendering, vocab coverage, determinism.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

from loratool.errors import LoratoolError  # noqa: E402
from loratool.model.tiny import (  # noqa: E402
    ARCHITECTURES,
    BOS_TOKEN,
    EOS_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
    build_tokenizer,
    count_parameters,
)

MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?\nAnswer briefly."},
    {"role": "assistant", "content": "2 + 2 = 4."},
]
CHATML = (
    "<|im_start|>user\nWhat is 2 + 2?\nAnswer briefly.<|im_end|>\n"
    "<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n"
)
UNICODE_TEXT = "Héllo, wörld! Ça va? 日本語のテキスト 🚀\n\n    def f(x):\n\treturn x  # done\r\nend"


def _ids(encoded: object) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5 (a list in 4.x)."""
    if isinstance(encoded, list):
        return encoded
    return list(encoded["input_ids"])  # type: ignore[index]


def _digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One default-size model per architecture, shared by the tests of this module (built in ~0.1 s each)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reloads_and_runs_forward(built: dict[str, Path], arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built[arch])
    tokenizer = AutoTokenizer.from_pretrained(built[arch])
    config = model.config

    assert config.model_type == arch
    assert model.dtype == torch.float32
    assert config.tie_word_embeddings is False
    # Every token id, specials included, has an embedding row (qwen2 reloads as Qwen2Tokenizer, which
    # would append <|endoftext|> if it were missing).
    assert len(tokenizer) == config.vocab_size
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert getattr(config, "sliding_window", None) is None
    assert 50_000 < count_parameters(built[arch]) < 500_000

    batch = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_config_stops_at_im_end(built: dict[str, Path], arch: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(built[arch])
    generation_config = GenerationConfig.from_pretrained(built[arch])
    im_end_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token == EOS_TOKEN
    assert generation_config.eos_token_id == im_end_id
    assert generation_config.pad_token_id == tokenizer.convert_tokens_to_ids(PAD_TOKEN)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizer_reloads_unchanged(built: dict[str, Path], arch: str) -> None:
    from transformers import AutoTokenizer

    fresh = build_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(built[arch])
    assert reloaded.get_vocab() == fresh.get_vocab()
    assert reloaded(UNICODE_TEXT)["input_ids"] == fresh(UNICODE_TEXT)["input_ids"]
    assert reloaded.decode(reloaded(UNICODE_TEXT)["input_ids"], skip_special_tokens=True) == UNICODE_TEXT


def test_tokenizer_round_trips_unicode_and_newlines() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer(UNICODE_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == UNICODE_TEXT
    # It is a trained BPE, not a byte tokenizer: common words are single tokens.
    assert len(ids) < len(UNICODE_TEXT.encode("utf-8"))
    assert tokenizer.tokenize(" the", add_special_tokens=False) == ["Ġthe"]


def test_bos_prepended_only_with_special_tokens() -> None:
    tokenizer = build_tokenizer()
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    assert tokenizer.bos_token == BOS_TOKEN and bos_id == tokenizer.bos_token_id

    with_bos = tokenizer("hi")["input_ids"]
    without = tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert with_bos[0] == bos_id
    assert with_bos[1:] == without
    assert bos_id not in without
    assert tokenizer.eos_token_id not in with_bos  # no EOS appended


def test_special_tokens_are_single_ids() -> None:
    tokenizer = build_tokenizer()
    for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)]
    assert IM_START_TOKEN in tokenizer.all_special_tokens
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chat_template_renders_chatml(built: dict[str, Path], arch: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[arch])
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == CHATML
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?\nAnswer briefly.<|im_end|>\n<|im_start|>assistant\n"

    ids = _ids(tokenizer.apply_chat_template(MESSAGES, tokenize=True))
    assert ids == tokenizer(CHATML, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START_TOKEN)  # no BOS: the template has none


def test_no_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path / "base", chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template is None
    assert not (path / "chat_template.jinja").exists()


def test_deterministic_weights(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", "mistral", seed=1)
    second = build_tiny_model(tmp_path / "b", "mistral", seed=1)
    other_seed = build_tiny_model(tmp_path / "c", "mistral", seed=2)
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(other_seed)
    assert (first / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()


def test_larger_vocab_is_reached() -> None:
    # The benchmark asks for 8000; the embedded corpus must be rich enough to train that many tokens.
    assert len(build_tokenizer(2000)) == 2000
    assert len(build_tokenizer(8000)) == 8000


def test_custom_sizes(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path = build_tiny_model(
        tmp_path / "wide",
        "qwen2",
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=48,
        vocab_size=300,
        max_position_embeddings=256,
    )
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (32, 1, 1)
    assert (config.vocab_size, config.max_position_embeddings) == (300, 256)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(LoratoolError, match="unknown architecture"):
        build_tiny_model(tmp_path / "x", "gpt2")
    with pytest.raises(LoratoolError, match="do not divide"):
        build_tiny_model(tmp_path / "x", hidden_size=30)
    with pytest.raises(LoratoolError, match="too small"):
        build_tokenizer(100)


def test_import_does_not_load_torch() -> None:
    # The CLI imports loratool modules at startup; torch/transformers must stay lazy.
    code = (
        "import sys, loratool.model.tiny; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    root = REPO
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_make_tiny_model_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = REPO / "scripts" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = tmp_path / "cli"
    assert module.main([str(out), "--arch", "qwen2", "--layers", "1", "--no-chat-template"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{count_parameters(out):,}" in printed
    assert not (out / "chat_template.jinja").exists()
