"""Random models with a real checkpoint's structure (loratool/model/tiny.py REAL_CONFIGS): what the memory
savers' choice and scripts/bench_arch.py rely on — the real vocabulary, head tying, activation and sliding
window at tiny width, the real widths with real_shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loratool.errors import LoratoolError
from loratool.model.tiny import (
    REAL_CONFIGS,
    REAL_STRUCTURE_ARCHITECTURES,
    TINY_WIDTH,
    build_real_structure_model,
    real_structure_config,
)

REPO = Path(__file__).resolve().parents[3]
# What the structure is made of: kept as published at every width.
STRUCTURE = (
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "sliding_window",
    "use_sliding_window",
    "rope_theta",
)


def test_every_architecture_loratool_exports_has_a_real_structure():
    assert set(REAL_STRUCTURE_ARCHITECTURES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"}
    assert REAL_CONFIGS["gemma3_text"][0] == "google/gemma-3-270m"


@pytest.mark.parametrize("arch", REAL_STRUCTURE_ARCHITECTURES)
def test_tiny_keeps_the_structure_and_shrinks_width_and_depth(arch):
    real = REAL_CONFIGS[arch][1]
    tiny = real_structure_config(arch)
    for key in STRUCTURE:
        assert tiny.get(key) == real.get(key), key
    assert tiny["hidden_size"] == TINY_WIDTH["hidden_size"] and tiny["num_hidden_layers"] == 2
    assert tiny["num_attention_heads"] % tiny["num_key_value_heads"] == 0
    assert real_structure_config(arch, real_shape=True) == {**real, **_layer_types(arch, real)}


def _layer_types(arch: str, real: dict) -> dict:
    if arch != "gemma3_text":
        return {}
    # Gemma 3 270m: full attention in every 6th layer, sliding window in the others.
    return {"layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]}


def test_a_shallow_gemma3_still_has_a_full_attention_layer():
    assert real_structure_config("gemma3_text")["layer_types"] == ["sliding_attention", "full_attention"]
    deeper = real_structure_config("gemma3_text", real_shape=True, num_layers=7)
    assert deeper["hidden_size"] == 640 and deeper["num_hidden_layers"] == 7
    assert deeper["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "full_attention"]


def test_an_architecture_without_a_recorded_structure_is_refused(tmp_path):
    with pytest.raises(LoratoolError, match="no real structure recorded for 'gemma2'"):
        build_real_structure_model(tmp_path / "x", "gemma2")


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_the_model_loads_with_the_real_vocabulary_and_runs(tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_real_structure_model(tmp_path / arch, arch, vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.model_type == arch and config.vocab_size == REAL_CONFIGS[arch][1]["vocab_size"]
    # The tokenizer uses the first ids only, like a real checkpoint whose embedding is padded.
    assert max(tokenizer.get_vocab().values()) < len(tokenizer) <= 512 < config.vocab_size
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as both are
    batch = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    else:
        assert config.sliding_window == 512 and config.hidden_activation == "gelu_pytorch_tanh"


def test_the_script_builds_one_and_refuses_width_options(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    assert script.main([str(tmp_path / "m"), "--arch", "phi3", "--real-structure"]) == 0
    assert "wrote phi3 model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "n"), "--arch", "phi3", "--real-shape", "--hidden-size", "32"])
    assert "the width comes from the real config" in capsys.readouterr().err
