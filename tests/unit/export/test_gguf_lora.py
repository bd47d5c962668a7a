"""`loratool export RUN --format gguf-lora`: the GGUF LoRA file read back (names, shapes, metadata, the
llama Q/K permutation of lora_b, PEFT's scaling folded in), the Modelfile, and each refusal with its reason."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import random_adapter
from helpers.export import copy_model, fields, gguf_tensors
from helpers.merge import run_with_checkpoints
from loratool.errors import LoratoolError
from loratool.export import run_export
from loratool.export.gguf import permute_for_rope
from loratool.export.gguf_lora import write_gguf_lora
from loratool.rundir.records import CHECKPOINT_SEAL

quiet = lambda _: None  # noqa: E731
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def merged_state(base, adapter) -> dict[str, np.ndarray]:
    """PEFT's own merge of the adapter into the base, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.float().numpy() for k, v in model.merge_and_unload().state_dict().items()}


def base_state(base) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    return {k: v.float().numpy() for k, v in AutoModelForCausalLM.from_pretrained(base).state_dict().items()}


def test_file_holds_the_lora_pairs_under_llama_cpp_names(tiny_llama, tmp_path):
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", r=4, target_modules=ALL)
    out = write_gguf_lora(adapter, tiny_llama, tmp_path / "a.gguf", "f16", log=quiet, name="run1")
    f = fields(out)
    assert f["general.architecture"] == "llama" and f["general.type"] == "adapter"
    assert f["adapter.type"] == "lora" and f["adapter.lora.alpha"] == 0.0  # scaling folded into lora_b
    assert f["general.name"] == "run1"
    got = gguf_tensors(out)
    config = json.loads((tiny_llama / "config.json").read_text())
    kv = config["hidden_size"] // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {  # (out, in) of each weight
        "attn_q": (64, 64), "attn_k": (kv, 64), "attn_v": (kv, 64), "attn_output": (64, 64),
        "ffn_gate": (128, 64), "ffn_up": (128, 64), "ffn_down": (64, 128),
    }  # fmt: skip
    expected = {}
    for i in range(2):
        for name, (rows, cols) in shapes.items():
            expected[f"blk.{i}.{name}.weight.lora_a"] = (4, cols)
            expected[f"blk.{i}.{name}.weight.lora_b"] = (rows, 4)
    assert {k: v.shape for k, v in got.items()} == expected
    from gguf import GGMLQuantizationType, GGUFReader

    assert {t.tensor_type for t in GGUFReader(out).tensors} == {GGMLQuantizationType.F16}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_b_at_a_is_the_merged_delta_in_the_base_gguf_layout(tiny_model_factory, tmp_path, arch):
    """lora_b @ lora_a equals the change PEFT's merge makes, laid out as write_gguf lays out the base (Q/K
    rows permuted for llama, as they are for qwen2); rsLoRA and a rank_pattern check the scaling fold."""
    base = tiny_model_factory(arch)
    adapter = random_adapter(
        base, tmp_path / "adapter", r=4, target_modules=ALL, use_rslora=True, rank_pattern={"k_proj": 2}
    )
    got = gguf_tensors(write_gguf_lora(adapter, base, tmp_path / "a.gguf", "f32", log=quiet))
    merged, original = merged_state(base, adapter), base_state(base)
    config = json.loads((base / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    assert got["blk.1.attn_k.weight.lora_b"].shape[1] == 2  # the rank_pattern's rank
    for i in range(2):
        for hf, gg in GGUF_NAMES.items():
            name = f"model.layers.{i}.{hf}.weight"
            delta = merged[name] - original[name]
            proj = hf.rsplit(".", 1)[1]
            if arch == "llama" and proj in heads:
                delta = permute_for_rope(delta, heads[proj])
            pair = got[f"blk.{i}.{gg}.weight.lora_b"] @ got[f"blk.{i}.{gg}.weight.lora_a"]
            assert np.abs(delta).max() > 1e-3  # the adapter does change it
            np.testing.assert_allclose(pair, delta, atol=1e-5, err_msg=name)
    if arch == "llama":  # the permutation is not the identity: unpermuted rows would not match
        q = "model.layers.0.self_attn.q_proj.weight"
        pair = got["blk.0.attn_q.weight.lora_b"] @ got["blk.0.attn_q.weight.lora_a"]
        assert not np.allclose(pair, merged[q] - original[q], atol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma2", "phi3"])
def test_other_architectures_store_the_delta_as_hugging_face_lays_it_out(tiny_model_factory, tmp_path, arch):
    """all-linear on the other supported architectures (Phi-3's fused qkv_proj / gate_up_proj included):
    every pair is under gguf's own name for the weight and gives the merged delta, permuted only for
    mistral (llama.cpp's llama architecture)."""
    import gguf

    base = tiny_model_factory(arch)
    adapter = random_adapter(base, tmp_path / "adapter", r=4, target_modules="all-linear")
    got = gguf_tensors(write_gguf_lora(adapter, base, tmp_path / "a.gguf", "f32", log=quiet))
    merged, original = merged_state(base, adapter), base_state(base)
    config = json.loads((base / "config.json").read_text())
    arch_name = fields(tmp_path / "a.gguf")["general.architecture"]
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    changed = [k for k in merged if not np.array_equal(merged[k], original[k])]
    assert len(changed) == len(got) // 2 > 0
    for name in changed:
        gg = names.get_name(name, try_suffixes=(".weight",))
        delta = merged[name] - original[name]
        if arch == "mistral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            delta = permute_for_rope(delta, n)
        pair = got[f"{gg}.lora_b"] @ got[f"{gg}.lora_a"]
        np.testing.assert_allclose(pair, delta, atol=1e-5, err_msg=name)


def test_run_export_writes_the_file_modelfile_and_record(tiny_llama, tmp_path):
    adapter = random_adapter(tiny_llama, tmp_path / "run1", target_modules=["q_proj", "v_proj"])
    out = run_export(adapter, format="gguf-lora", base=str(tiny_llama), log=quiet)
    assert out == tmp_path / "run1-gguf-lora"
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "gguf-lora" and record["outtype"] == "f16"
    assert record["file"] == "run1.lora.f16.gguf" and (out / record["file"]).is_file()
    assert record["modelfile"] == "Modelfile" and record["source"]["kind"] == "run"
    lines = [x for x in (out / "Modelfile").read_text().splitlines() if not x.startswith("#")]
    assert lines == [f"FROM {tiny_llama}", "ADAPTER ./run1.lora.f16.gguf"]


# --- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"use_dora": True}, "a DoRA adapter"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "LoRA on model.embed_tokens"),
        ({"target_modules": ["lm_head"]}, "LoRA on lm_head"),
    ],
)
def test_what_llama_cpp_cannot_apply_is_refused(tiny_llama, tmp_path, lora, message):
    lora.setdefault("target_modules", ["q_proj"])
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", **lora)
    with pytest.raises(LoratoolError, match=message) as error:
        run_export(adapter, format="gguf-lora", log=quiet)
    assert "--format gguf" in error.value.hint
    assert not (tmp_path / "adapter-gguf-lora").exists()


def test_other_peft_methods_are_refused(tiny_llama, tmp_path):
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(LoratoolError, match="peft_type is 'LOHA'; a GGUF LoRA file holds LoRA"):
        write_gguf_lora(adapter, tiny_llama, tmp_path / "a.gguf", log=quiet)


def test_unsupported_base_architecture_is_refused(tiny_llama, tmp_path):
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    other = copy_model(
        tiny_llama, tmp_path / "other", model_type="falcon", architectures=["FalconForCausalLM"]
    )
    with pytest.raises(LoratoolError, match="model_type 'falcon' cannot be exported to GGUF"):
        run_export(adapter, format="gguf-lora", base=str(other), log=quiet)


@pytest.mark.parametrize("outtype", ["q8_0", "bf16", "q4_0"])
def test_outtypes_other_than_f16_and_f32_are_refused(tiny_llama, tmp_path, outtype):
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(LoratoolError, match=f"--outtype '{outtype}' is not available for --format gguf-lora"):
        run_export(adapter, format="gguf-lora", outtype=outtype, log=quiet)


def test_a_merged_checkpoint_is_refused_with_a_hint(tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "merged")
    with pytest.raises(LoratoolError, match="is a model directory; --format gguf-lora") as error:
        run_export(model, format="gguf-lora", log=quiet)
    assert "run directory" in error.value.hint


def test_f16_rounds_after_the_scaling_fold(tiny_llama, tmp_path):
    """lora_b is scaled in float32 and rounded once: the f16 file is the f32 one to f16 precision."""
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", target_modules=["v_proj"])
    f32 = gguf_tensors(write_gguf_lora(adapter, tiny_llama, tmp_path / "a32.gguf", "f32", log=quiet))
    f16 = gguf_tensors(write_gguf_lora(adapter, tiny_llama, tmp_path / "a16.gguf", "f16", log=quiet))
    for name, value in f32.items():
        np.testing.assert_array_equal(f16[name], torch.tensor(value).half().float().numpy())


# --- the base it applies to --------------------------------------------------------------------------------


def test_the_base_must_be_the_weights_the_run_trained_on(tiny_llama, tiny_model_factory, tmp_path):
    checkpoint = run_with_checkpoints(tmp_path / "run", tiny_llama) / "checkpoints" / "checkpoint-12"
    other = tiny_model_factory("llama", seed=7)  # same shapes, other weights: llama.cpp would take it
    with pytest.raises(LoratoolError) as refused:
        run_export(checkpoint, format="gguf-lora", base=str(other), log=quiet)
    assert refused.value.message.startswith("the base model is not the one this adapter was trained on")
    assert "--force" in refused.value.hint
    assert not (tmp_path / "run-checkpoint-12-gguf-lora").exists()

    warned: list[str] = []
    forced = run_export(checkpoint, format="gguf-lora", base=str(other), force=True, log=warned.append)
    assert any(line.startswith("warning: the base model is not the one") for line in warned)
    base = json.loads((forced / "export.json").read_text())["source"]["base"]
    assert base["name"] == str(other) and base["fingerprint_check"] == "mismatch, merged with --force"


def test_the_run_s_own_base_is_checked_and_recorded(tiny_llama, tmp_path):
    checkpoint = run_with_checkpoints(tmp_path / "run", tiny_llama) / "checkpoints" / "checkpoint-12"
    out = run_export(checkpoint, format="gguf-lora", log=quiet)
    base = json.loads((out / "export.json").read_text())["source"]["base"]
    assert base["fingerprint_check"] == "match" and base["fingerprint"] == base["recorded_fingerprint"]


def test_an_unsealed_checkpoint_is_refused_unless_forced(tiny_llama, tmp_path):
    checkpoint = run_with_checkpoints(tmp_path / "run", tiny_llama) / "checkpoints" / "checkpoint-12"
    (checkpoint / CHECKPOINT_SEAL).unlink()  # killed while saving: the seal is written last
    with pytest.raises(LoratoolError, match="is incomplete"):
        run_export(checkpoint, format="gguf-lora", log=quiet)
    assert run_export(checkpoint, format="gguf-lora", force=True, log=quiet).is_dir()
