"""GGUF export beyond the Llama family (qwen3, gemma2, gemma3, phi3) and the 4/5-bit types: metadata under
llama.cpp's names, every tensor accounted for (Gemma's norms shifted by one), transformers `gguf_file=`
reloads that match the source within each type's thresholds, and the refusals for what llama.cpp cannot
express. The real llama.cpp runs these files in tests/slow/test_llama_cpp_slow.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from loratool.errors import LoratoolError
from loratool.export.gguf import SUPPORTED_ARCHITECTURES, write_gguf

NEW_ARCHS = ["qwen3", "gemma2", "gemma3_text", "phi3"]
LOW_BIT = ["q5_1", "q5_0", "q4_1", "q4_0"]


def quiet(_: str) -> None:
    pass


def export(source: Path, out: Path, outtype: str, *, log=quiet, name: str = "tiny") -> Path:
    """write_gguf under the name "tiny" (a directory name with "phi3" in it means Phi-3 to llama.cpp)."""
    return write_gguf(source, out, outtype, log=log, name=name)


def fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, dequantize

    return {
        t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        for t in GGUFReader(path).tensors
    }


def tiny(factory, arch: str) -> Path:
    # Six layers for gemma3 so that one of them is a full-attention layer (llama.cpp: 5 sliding, 1 full).
    return factory(arch, num_layers=6) if arch == "gemma3_text" else factory(arch)


def with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_supported_architectures_constant():
    assert SUPPORTED_ARCHITECTURES >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
    assert "gemma3" in SUPPORTED_ARCHITECTURES  # the multimodal wrapper, exported as its language model


# --- tensors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_f32_tensors_round_trip(tmp_path, tiny_model_factory, arch):
    """Every source tensor is in the GGUF, bit for bit (Gemma: norms as 1 + w); no permutation (these
    architectures use rotate-half RoPE in llama.cpp too)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    source = tiny(tiny_model_factory, arch)
    out = export(source, tmp_path / "m.gguf", "f32", log=quiet)
    got = gguf_tensors(out)
    weights = load_file(source / "model.safetensors")
    gguf_arch = {"gemma3_text": "gemma3"}.get(arch, arch)
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == gguf_arch), 6)
    gemma = arch.startswith("gemma")
    expected = set()
    for hf, tensor in weights.items():
        gg = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert gg is not None, hf
        expected.add(gg)
        want = tensor.numpy() + (1.0 if gemma and hf.endswith("norm.weight") else 0.0)
        np.testing.assert_array_equal(got[gg], want, err_msg=hf)
    assert set(got) == expected
    if gemma:  # tied: llama.cpp reuses the embedding, and the source has no lm_head either
        assert "output.weight" not in got and "lm_head.weight" not in weights
    if arch == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(got)  # fused, as in HF
        assert got["blk.0.ffn_up.weight"].shape == (2 * 128, 64)
    if arch in ("qwen3", "gemma3_text"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(got)


def test_low_bit_types_keep_embeddings_and_head_at_q8_0(tmp_path, tiny_model_factory):
    from gguf import GGUFReader

    source = tiny_model_factory("llama")
    for outtype in LOW_BIT:
        out = export(source, tmp_path / f"m.{outtype}.gguf", outtype, log=quiet)
        types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == outtype.upper()
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert fields(out)["general.file_type"] == {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}[outtype]


# --- metadata ------------------------------------------------------------------------------------------


def test_gemma2_metadata(tmp_path, tiny_model_factory):
    source = tiny_model_factory("gemma2")
    f = fields(export(source, tmp_path / "m.gguf", "f16", log=quiet))
    assert f["general.architecture"] == "gemma2"
    assert f["gemma2.attention.key_length"] == f["gemma2.attention.value_length"] == 256
    assert f["gemma2.attn_logit_softcapping"] == 50.0 and f["gemma2.final_logit_softcapping"] == 30.0
    assert f["gemma2.attention.sliding_window"] == 4096
    assert f["gemma2.embedding_length"] == 64 and f["gemma2.block_count"] == 2


def test_gemma3_metadata(tmp_path, tiny_model_factory):
    source = tiny(tiny_model_factory, "gemma3_text")
    f = fields(export(source, tmp_path / "m.gguf", "f16", log=quiet))
    assert f["general.architecture"] == "gemma3"
    assert f["gemma3.attention.sliding_window"] == 16
    assert f["gemma3.rope.freq_base"] == 1_000_000.0 and f["gemma3.rope.freq_base_swa"] == 10_000.0
    assert f["gemma3.attention.key_length"] == 256 and f["gemma3.block_count"] == 6
    assert "gemma3.final_logit_softcapping" not in f and "gemma3.attn_logit_softcapping" not in f


def test_qwen3_and_phi3_metadata(tmp_path, tiny_model_factory):
    f = fields(export(tiny_model_factory("qwen3"), tmp_path / "q.gguf", "f16", log=quiet))
    assert f["general.architecture"] == "qwen3" and f["qwen3.attention.key_length"] == 128
    assert f["qwen3.rope.dimension_count"] == 128
    f = fields(export(tiny_model_factory("phi3"), tmp_path / "p.gguf", "f16", log=quiet))
    assert f["general.architecture"] == "phi3" and f["phi3.rope.dimension_count"] == 16
    assert f["phi3.rope.scaling.original_context_length"] == 4096 and f["phi3.attention.sliding_window"] == 0


def test_phi3_longrope_writes_the_factor_tensors(tmp_path, tiny_model_factory):
    long, short = [1.0 + i / 8 for i in range(8)], [1.0] * 8  # rotary dims 16 -> 8 factors
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long, "short_factor": short}
    source = with_config(
        tiny_model_factory("phi3"),
        tmp_path / "phi3-long",
        rope_parameters=rope,
        max_position_embeddings=8192,
        original_max_position_embeddings=2048,
    )
    out = export(source, tmp_path / "m.gguf", "f16", log=quiet)
    got, f = gguf_tensors(out), fields(out)
    np.testing.assert_array_equal(got["rope_factors_long.weight"], np.float32(long))
    np.testing.assert_array_equal(got["rope_factors_short.weight"], np.float32(short))
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(2048)) ** 0.5)


def test_gemma3_multimodal_checkpoint_exports_its_language_model(tmp_path, tiny_model_factory):
    """model_type gemma3 (Gemma3ForConditionalGeneration): text_config + model.language_model.* weights;
    the vision tower is left out and the file equals the text-only model's."""
    text = tiny(tiny_model_factory, "gemma3_text")
    wrapped = tmp_path / "gemma3-mm"
    shutil.copytree(text, wrapped)
    config = json.loads((text / "config.json").read_text())
    (wrapped / "config.json").write_text(
        json.dumps(
            {"model_type": "gemma3", "text_config": config, "vision_config": {}, "tie_word_embeddings": True}
        )
    )
    weights = {
        k.replace("model.", "model.language_model.", 1): v
        for k, v in load_file(text / "model.safetensors").items()
    }
    weights["model.vision_tower.vision_model.post_layernorm.weight"] = next(iter(weights.values()))[
        :4
    ].clone()
    save_file(weights, wrapped / "model.safetensors", metadata={"format": "pt"})
    a = gguf_tensors(export(text, tmp_path / "text.gguf", "f32", log=quiet))
    b = gguf_tensors(export(wrapped, tmp_path / "mm.gguf", "f32", log=quiet))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --- refusals ------------------------------------------------------------------------------------------


def test_gemma_settings_llama_cpp_cannot_express_are_refused(tmp_path, tiny_model_factory):
    source = tiny(tiny_model_factory, "gemma3_text")
    scaled = with_config(source, tmp_path / "scalar", query_pre_attn_scalar=128)
    with pytest.raises(LoratoolError, match="query_pre_attn_scalar 128 differs"):
        export(scaled, tmp_path / "a.gguf", "f16", log=quiet)
    pattern = with_config(
        source, tmp_path / "pattern", layer_types=["sliding_attention", "full_attention"] * 3
    )
    with pytest.raises(LoratoolError, match="llama.cpp's fixed gemma3 pattern"):
        export(pattern, tmp_path / "b.gguf", "f16", log=quiet)
    assert not list(tmp_path.glob("*.gguf*"))  # refused before anything is written


def test_a_phi3_name_on_a_vocabulary_llama_cpp_would_refuse(tmp_path, tiny_model_factory):
    source = tiny_model_factory("phi3")
    with pytest.raises(LoratoolError, match="makes llama.cpp treat the file as Phi-3"):
        export(source, tmp_path / "m.gguf", "f16", log=quiet, name="my-phi3-finetune")
    export(source, tmp_path / "m.gguf", "f16", log=quiet, name="my-finetune")


def test_k_quants_are_refused_with_the_way_to_get_them(tmp_path, tiny_llama):
    with pytest.raises(LoratoolError, match="unknown --outtype 'q4_K_M'") as caught:
        export(tiny_llama, tmp_path / "m.gguf", "q4_K_M", log=quiet)
    assert "llama-quantize" in caught.value.hint


# --- reload through transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_transformers_reload_matches_the_source(tmp_path, tiny_model_factory, arch, outtype):
    from loratool.export.verify import THRESHOLDS, verify_gguf

    source = tiny(tiny_model_factory, arch)
    out = export(source, tmp_path / "m.gguf", outtype, log=quiet)
    result = verify_gguf(out, source, outtype, None, log=quiet)
    assert result["passed"], result
    assert result["tokenizer"]["passed"] and result["tokenizer"]["strings"] == 6
    logits = result["logits"]
    assert logits["mean_kl"] <= THRESHOLDS[outtype].max_mean_kl
    if outtype == "f32":
        assert logits["max_abs_logit_diff"] < 1e-5 and logits["greedy_agreement"] == 1.0
    else:  # rounding is visible, and larger the fewer the bits
        assert logits["max_abs_logit_diff"] > 0


@pytest.mark.parametrize("outtype", LOW_BIT)
def test_low_bit_reload_within_thresholds_and_ordered_by_bits(tmp_path, tiny_model_factory, outtype):
    from loratool.export.verify import THRESHOLDS, verify_gguf

    source = tiny_model_factory("llama")
    kl = {}
    for t in ("q8_0", outtype):
        out = export(source, tmp_path / f"m.{t}.gguf", t, log=quiet)
        result = verify_gguf(out, source, t, None, log=quiet)
        assert result["passed"], result
        kl[t] = result["logits"]["mean_kl"]
    assert kl["q8_0"] < kl[outtype] <= THRESHOLDS[outtype].max_mean_kl
