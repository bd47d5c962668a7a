"""GGUF export without the CLI: metadata, tensors and tokenizer read back, transformers
`gguf_file=` reloads that match the source, and the Ollama Modelfile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.export import copy_model, fields, gguf_tensors, logits_of
from loratool.export.gguf import unpermute_for_rope, write_gguf


def tied_copy(src: Path, dst: Path) -> Path:
    """The model with tied embeddings: lm_head.weight dropped from the checkpoint, config says tied."""
    copy_model(src, dst, tie_word_embeddings=True)
    weights = load_file(dst / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# --- metadata, tensors, tokenizer ----------------------------------------------------------------------


def test_gguf_metadata_fields(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    out = write_gguf(tiny_llama, tmp_path / "m.gguf", "f16", log=lambda _: None)
    f = fields(out)
    config = json.loads((tiny_llama / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert f["general.architecture"] == "llama" and f["general.name"] == tiny_llama.name
    assert f["general.file_type"] == 1  # MOSTLY_F16
    assert f["llama.context_length"] == config["max_position_embeddings"] == 2048
    assert f["llama.embedding_length"] == 64 and f["llama.block_count"] == 2
    assert f["llama.feed_forward_length"] == 128
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert f["llama.vocab_size"] == config["vocab_size"] == len(f["tokenizer.ggml.tokens"])
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert f["tokenizer.ggml.add_bos_token"] is True  # the post-processor prepends BOS
    assert f["tokenizer.chat_template"] == tokenizer.chat_template
    assert (
        f["tokenizer.ggml.tokens"][3] == "<|im_start|>" and f["tokenizer.ggml.token_type"][3] == 3
    )  # CONTROL
    assert f["tokenizer.ggml.token_type"][100] == 1  # NORMAL
    assert len(f["tokenizer.ggml.merges"]) == len(
        json.loads((tiny_llama / "tokenizer.json").read_text())["model"]["merges"]
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f32_tensors_round_trip(tmp_path, tiny_model_factory, arch):
    """Every source tensor is in the GGUF under llama.cpp's name, bit for bit once Q/K are un-permuted."""
    source = tiny_model_factory(arch)
    out = write_gguf(source, tmp_path / "m.gguf", "f32", log=lambda _: None)
    got = gguf_tensors(out)
    weights = load_file(source / "model.safetensors")
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(2):
        for hf, gg in [
            ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ]:  # fmt: skip
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
            if arch == "qwen2" and hf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                names[f"model.layers.{i}.{hf}.bias"] = f"blk.{i}.{gg}.bias"
    assert set(got) == set(names.values()) and set(weights) == set(names)
    for hf, gg in names.items():
        tensor = got[gg]
        if arch != "qwen2" and ".q_proj." in hf:
            tensor = unpermute_for_rope(tensor, 4)
        elif arch != "qwen2" and ".k_proj." in hf:
            tensor = unpermute_for_rope(tensor, 2)
        assert tensor.dtype == np.float32
        np.testing.assert_array_equal(tensor, weights[hf].numpy(), err_msg=hf)
    # The permutation is real: without undoing it the Q rows differ.
    if arch != "qwen2":
        assert not np.array_equal(
            got["blk.0.attn_q.weight"], weights["model.layers.0.self_attn.q_proj.weight"]
        )


def test_tied_embeddings_have_no_output_tensor(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    source = tied_copy(tiny_llama, tmp_path / "tied")
    out = write_gguf(source, tmp_path / "out" / "m.gguf", "f32", log=lambda _: None)
    assert "output.weight" not in gguf_tensors(out) and "token_embd.weight" in gguf_tensors(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings
    torch.testing.assert_close(logits_of(reloaded, [1, 50, 60, 70]), logits_of(original, [1, 50, 60, 70]))


def test_norms_stay_f32_and_q8_0_rows_that_do_not_fit_fall_back_to_f16(tmp_path, tiny_model_factory):
    from gguf import GGUFReader

    source = tiny_model_factory("llama", hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=96)
    out = write_gguf(source, tmp_path / "m.gguf", "q8_0", log=lambda _: None)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_up.weight"] == "F16"  # rows of 48 values: not a multiple of 32
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_transformers_reload_matches_the_source(tmp_path, tiny_model_factory, arch, outtype):
    from loratool.export.verify import THRESHOLDS, verify_gguf

    source = tiny_model_factory(arch)
    out = write_gguf(source, tmp_path / "m.gguf", outtype, log=lambda _: None)
    result = verify_gguf(out, source, outtype, None, log=lambda _: None)
    assert result["passed"], result
    assert result["tokenizer"]["passed"] and result["tokenizer"]["strings"] == 6
    logits = result["logits"]
    assert logits["mean_kl"] <= THRESHOLDS[outtype].max_mean_kl
    if outtype == "f32":
        assert logits["max_abs_logit_diff"] < 1e-5 and logits["greedy_agreement"] == 1.0
    elif outtype == "f16":
        assert 0 < logits["max_abs_logit_diff"] < 2e-2
    else:
        assert 0 < logits["max_abs_logit_diff"] < 0.5 and logits["greedy_agreement"] > 0.8


def test_sentencepiece_style_tokenizer(tmp_path, tiny_llama):
    """A Llama 2 / Mistral style tokenizer.json (BPE with byte fallback, '▁' prefix) becomes a `llama`
    vocabulary with byte tokens and scores, and transformers rebuilds an equivalent tokenizer from it."""
    from transformers import AutoTokenizer

    from loratool.export.verify import compare_tokenizers

    source = copy_model(tiny_llama, tmp_path / "spm")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (source / name).unlink()
    sentencepiece_style_tokenizer().save_pretrained(source)
    out = write_gguf(source, tmp_path / "out" / "m.gguf", "f32", log=lambda _: None)
    f = fields(out)
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in f
    assert f["tokenizer.ggml.add_space_prefix"] is True and f["tokenizer.ggml.add_bos_token"] is True
    tokens, types, scores = (
        f["tokenizer.ggml.tokens"],
        f["tokenizer.ggml.token_type"],
        f["tokenizer.ggml.scores"],
    )
    assert tokens[3] == "<0x00>" and types[3] == 6  # BYTE
    assert tokens[0] == "<unk>" and types[1] == 3 and f["tokenizer.ggml.bos_token_id"] == 1
    assert scores[300] > scores[400]  # earlier pieces merge first
    assert tokens[-1].startswith("[PAD") and types[-1] == 5  # embedding rows beyond the tokenizer: UNUSED
    result = compare_tokenizers(
        AutoTokenizer.from_pretrained(source),
        AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name),
        sentencepiece=True,
    )
    assert result["passed"], result


def sentencepiece_style_tokenizer():
    """A small Llama-2-shaped tokenizer: <unk> <s> </s>, 256 <0xNN> byte tokens, then trained pieces."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from loratool.model.tiny import _corpus

    prefix = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = prefix
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=240, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trainer_tok.train_from_iterator(_corpus(), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = prefix
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    return wrapped


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path, tiny_llama):
    rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    source = copy_model(tiny_llama, tmp_path / "l3", rope_parameters=rope)
    out = write_gguf(source, tmp_path / "m.gguf", "f16", log=lambda _: None)
    freqs = gguf_tensors(out)["rope_freqs.weight"]
    assert freqs.shape == (8,) and freqs.dtype == np.float32
    assert freqs[0] == 1.0 and freqs[-1] == 8.0  # high frequencies kept, the lowest divided by `factor`
    assert fields(out)["llama.rope.freq_base"] == 500000.0


@pytest.mark.parametrize(
    ("template", "name", "stop"),
    [
        ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}", "chatml", "<|im_end|>"),
        ("{{ bos_token }}<|start_header_id|>{{ m }}<|end_header_id|>{{ c }}<|eot_id|>", "llama3", "<|eot_id|>"),
        ("{{ bos_token }}[INST] {{ m }} [/INST]{{ c }}{{ eos_token }}", "llama2-mistral-inst", "</s>"),
        ("<|system|>\n{{ s }}</s><|user|>\n{{ u }}</s><|assistant|>\n", "zephyr", "</s>"),
    ],
)  # fmt: skip
def test_modelfile_chat_formats(template, name, stop):
    from loratool.export.ollama import modelfile_text

    text = modelfile_text("m.gguf", template, "Be brief.", "</s>")
    assert f"# chat format: {name}" in text and f'PARAMETER stop "{stop}"' in text
    assert text.endswith('SYSTEM """Be brief."""\n') and text.count("TEMPLATE") == 1


def test_modelfile_unknown_template_is_refused_and_base_model_passes_the_prompt():
    from loratool.errors import LoratoolError
    from loratool.export.ollama import modelfile_text

    with pytest.raises(LoratoolError, match="none of the formats"):
        modelfile_text("m.gguf", "{{ messages[0]['content'] }} ### Response:", None, None)
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile_text("m.gguf", None, None, "</s>")


def test_a_merge_output_is_named_after_its_run(tmp_path):
    from loratool.export import gguf_name

    merged = tmp_path / "my-run" / "merged"
    merged.mkdir(parents=True)
    assert gguf_name(merged, "f16") == "merged.f16.gguf"  # a folder that merely has that name
    (merged / "merge.json").write_text(json.dumps({"files": [], "status": "complete"}))
    assert gguf_name(merged, "q8_0") == "merged.q8_0.gguf"  # another tool's merge.json: not ours
    record = {
        "loratool_output": {"kind": "merge", "format": 1},
        "files": ["merge.json"],
        "status": "complete",
    }
    (merged / "merge.json").write_text(json.dumps(record))
    assert gguf_name(merged, "q8_0") == "my-run.q8_0.gguf"
    assert gguf_name(tmp_path / "Llama-3.1-8B", "f16") == "Llama-3.1-8B.f16.gguf"


def test_modelfile_carries_the_system_prompt_the_template_adds_by_default():
    from loratool.export.ollama import default_system_prompt

    # SmolLM2-style ChatML: a default system turn when the conversation has none.
    smol = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert default_system_prompt(smol) == "You are SmolLM."
    plain = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>\n'}}{% endfor %}"
    )
    assert default_system_prompt(plain) is None
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}x"
    assert default_system_prompt(refusing) is None
    assert default_system_prompt(None) is None
