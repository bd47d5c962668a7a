"""Inits that change the base (PiSSA, OLoRA, CorDA) and data-driven inits (EVA, CorDA) without
training: what is refused, at load and at resume, and the dry run."""

from __future__ import annotations

import pytest

from conftest import smoke_recipe, write_recipe
from loratool.adapter import inits as lora_init
from loratool.errors import LoratoolError
from loratool.recipe import load_recipe
from loratool.train.run import run_train


def test_failing_calibration_is_a_clear_error(tmp_path, tiny_llama, smoke_data):
    """EVA's SVD needs more tokens per batch than components (r * rho = 128 here; one row of at most 64
    tokens per batch): PEFT would cycle over the data forever. loratool refuses before training, names
    the numbers, and never trains with another init instead."""
    out = tmp_path / "run"
    recipe = smoke_recipe(
        tiny_llama,
        smoke_data,
        out,
        lora={"r": 64, "lora_alpha": 128, "init_lora_weights": "eva", "init_calibration_batches": 2},
        training={"max_steps": 2, "per_device_train_batch_size": 1},
    )
    with pytest.raises(LoratoolError, match="eva needs batches of at least 128 answer tokens") as caught:
        run_train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), log=lambda _: None)
    assert "per_device_train_batch_size" in (caught.value.hint or "")
    assert not (out / "adapter_model.safetensors").exists()


def test_calibration_without_data_is_refused(tiny_llama):
    from transformers import AutoModelForCausalLM

    from loratool.adapter.lora import attach_adapter
    from loratool.recipe import LoraSection

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(LoratoolError, match="calibration pass on the training data"):
        attach_adapter(
            model,
            LoraSection(init_lora_weights="eva"),
            quantized=False,
            gradient_checkpointing=False,
        )


@pytest.mark.parametrize(
    ("lora", "quantization", "expected"),
    [
        ({"init_lora_weights": "pissa"}, {"load_in_4bit": True}, "on a 4/8-bit base the adapter cannot"),
        ({"init_lora_weights": "olora"}, {"load_in_8bit": True}, "on a 4/8-bit base the adapter cannot"),
        ({"init_lora_weights": "corda"}, {"load_in_4bit": True}, "on a 4/8-bit base the adapter cannot"),
        ({"init_lora_weights": "olora", "use_dora": True}, None, "cannot carry use_dora"),
        (
            {"init_lora_weights": "pissa", "modules_to_save": ["lm_head"]},
            None,
            "cannot carry modules_to_save",
        ),
        ({"init_lora_weights": "loftq"}, {"load_in_4bit": True}, "loftq quantizes the base itself"),
    ],
)
def test_impossible_init_combinations_are_refused_at_load(tmp_path, smoke_data, lora, quantization, expected):
    recipe = smoke_recipe("some/model", smoke_data, tmp_path / "run", lora=lora)
    if quantization:
        recipe["quantization"] = quantization
    with pytest.raises(LoratoolError) as caught:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert expected in str(caught.value)


def test_loftq_run_cannot_be_merged(tmp_path):
    with pytest.raises(LoratoolError, match="cannot be merged"):
        lora_init.refuse_unmergeable(
            {"method": "loftq", "mergeable": False, "reason": "LoftQ trains on its own quantized copy"},
            tmp_path,
        )
    lora_init.refuse_unmergeable({"method": "pissa", "converted_to_plain_lora": True}, tmp_path)


def test_resume_refuses_a_different_initialization(tmp_path, tiny_llama):
    """The checkpoints only fit the base as the first initialization changed it: a re-initialization that
    differs from the saved initial adapter stops the resume."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    def pissa_model():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"))

    saved = lora_init.keep_initial_adapter(pissa_model(), tmp_path, log=lambda _: None)
    assert saved == tmp_path / lora_init.INITIAL_ADAPTER
    assert lora_init.keep_initial_adapter(pissa_model(), tmp_path, log=lambda _: None) == saved
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 0.1 * torch.ones_like(tensors[first])
    save_file(tensors, weights)
    with pytest.raises(LoratoolError, match="differs from the one this run started with"):
        lora_init.keep_initial_adapter(pissa_model(), tmp_path, log=lambda _: None)


@pytest.mark.parametrize("init", ["pissa", "eva", "corda"])
def test_dry_run_checks_the_adapter_without_a_calibration_pass(tmp_path, tiny_llama, smoke_data, init):
    from loratool.train.dry_run import dry_run

    recipe = smoke_recipe(tiny_llama, smoke_data, tmp_path / "run", lora={"init_lora_weights": init})
    printed: list[str] = []
    dry_run(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), log=printed.append)
    assert any(line.startswith("adapter: ") for line in printed), printed
    assert not any("calibrating" in line for line in printed) and not (tmp_path / "run").exists()


def test_sharded_launch_refuses_a_converted_init(tmp_path, smoke_data):
    """FSDP / ZeRO-3 hand the adapter over as shards; PEFT's conversion needs it whole: refused at once."""
    from loratool.model.hardware import Hardware, Launch, launch_conflicts

    gpu = Hardware(device="cuda", name="H100", device_count=8, bf16=True, cpu_count=32)
    recipe = smoke_recipe("some/model", smoke_data, tmp_path / "run", lora={"init_lora_weights": "olora"})
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    problems = launch_conflicts(loaded, gpu, Launch("fsdp", None, 8))
    assert any("olora changes the base" in p and "FSDP shards" in p for p in problems), problems
    assert not any("changes the base" in p for p in launch_conflicts(loaded, gpu, Launch(None, None, 8)))


def test_converted_init_refuses_weights_the_conversion_would_drop(tmp_path, tiny_llama, smoke_data):
    """An embedding adapter has no lora_A / lora_B: PEFT's conversion would drop it silently."""
    out = tmp_path / "run"
    recipe = smoke_recipe(
        tiny_llama,
        smoke_data,
        out,
        lora={"init_lora_weights": "pissa", "target_modules": ["embed_tokens", "q_proj"]},
        training={"max_steps": 2},
    )
    with pytest.raises(LoratoolError, match="these would be lost: model.embed_tokens.lora_embedding_"):
        run_train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), log=lambda _: None)
    assert not (out / "adapter_model.safetensors").exists()
