"""The memory plan (`loratool plan`): memory by component, speed, suggestions, conflicts — from the
config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratool.errors import LoratoolError
from loratool.recipe import validate_recipe
from loratool.train.plan import GPUS, GiB, conflicts, make_plan, model_shape, parse_memory

# Llama 2 7B's published config (meta-llama/Llama-2-7b-hf config.json): 6.74B parameters.
LLAMA2_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def llama2_7b_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama2-7b-config")
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    return folder


def qlora_7b(folder: Path, **training) -> object:
    return validate_recipe(
        {
            "base_model": str(folder),
            "quantization": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
            "lora": {"r": 16, "target_modules": "all-linear"},
            "data": {"train": [{"path": "x.jsonl"}], "max_length": 2048},
            "training": {
                "output_dir": "out",
                "per_device_train_batch_size": 1,
                "gradient_checkpointing": True,
                "optim": "paged_adamw_8bit",
                **training,
            },
        }
    )


def test_qlora_7b_matches_published_figures(llama2_7b_config):
    """QLoRA on a 7B model, seq 2048, batch 1, gradient checkpointing: ~5-6 GB of GPU memory (the QLoRA
    paper's Figure 6 and the common 'fits a 6 GB budget' reports; the 4-bit base alone is ~3.9 GB)."""
    from transformers import AutoConfig

    recipe = qlora_7b(llama2_7b_config)
    shape = model_shape(recipe, AutoConfig.from_pretrained(llama2_7b_config))
    assert 6.7e9 < shape.parameters < 6.8e9
    plan = make_plan(recipe, shape, device="A100-80GB")
    assert 3.4 * GiB < plan.components["base weights"] < 4.0 * GiB
    assert 5.0e9 <= plan.peak_memory_bytes <= 6.5e9, plan.format()
    # Without 4-bit, the same run needs the 16-bit weights: ~13.5 GB more than that.
    plain = make_plan(
        validate_recipe({**recipe.model_dump(mode="json"), "quantization": None}), shape, device="A100-80GB"
    )
    assert plain.components["base weights"] > 12.5 * GiB


def test_components_follow_the_recipe(llama2_7b_config):
    from transformers import AutoConfig

    recipe = qlora_7b(llama2_7b_config)
    shape = model_shape(recipe, AutoConfig.from_pretrained(llama2_7b_config))
    base = make_plan(recipe, shape, device="H100")
    no_ckpt = make_plan(qlora_7b(llama2_7b_config, gradient_checkpointing=False), shape, device="H100")
    assert no_ckpt.components["activations"] > 10 * base.components["activations"]
    bigger = make_plan(qlora_7b(llama2_7b_config, per_device_train_batch_size=4), shape, device="H100")
    assert bigger.components["logits and loss"] == 4 * base.components["logits and loss"]
    adamw = make_plan(qlora_7b(llama2_7b_config, optim="adamw_torch"), shape, device="H100")
    assert adamw.components["optimizer states"] == 4 * base.components["optimizer states"]
    assert no_ckpt.flops_per_token < base.flops_per_token  # no recomputation


def test_suggestions_fit_the_budget(llama2_7b_config):
    from transformers import AutoConfig

    recipe = qlora_7b(llama2_7b_config, per_device_train_batch_size=8, gradient_checkpointing=False)
    shape = model_shape(recipe, AutoConfig.from_pretrained(llama2_7b_config))
    plan = make_plan(recipe, shape, device="budget", budget_bytes=24 * GiB)
    assert not plan.fits() and plan.suggestions
    assert any("gradient_checkpointing=true" in s for s in plan.suggestions)
    assert all("peak ~" in s and "(" in s for s in plan.suggestions)  # each says what it costs


def test_conflicts_are_all_listed(tmp_path):
    recipe = validate_recipe(
        {
            "base_model": "m",
            "model": {"attn_implementation": "flash_attention_2", "dtype": "float32"},
            "quantization": {"load_in_8bit": True},
            "lora": {"use_dora": True},
            "data": {"train": [{"path": "x.jsonl"}]},
            "training": {"output_dir": "out", "fsdp": "full_shard"},
        }
    )
    found = conflicts(recipe, "cpu")
    assert len(found) == 4, found
    assert any("needs a CUDA GPU" in c for c in found) and any("FSDP" in c for c in found)


@pytest.mark.parametrize(
    ("text", "expected"), [("24GiB", 24 * GiB), ("80GB", 80 * GiB), ("512m", 512 * 1024**2)]
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_parse_memory_refuses_nonsense():
    with pytest.raises(LoratoolError):
        parse_memory("lots")


def test_packing_plans_the_packed_rows_a_micro_batch_takes(llama2_7b_config):
    """A packed micro-batch is the rows that hold per_device_train_batch_size examples once packed (4 rows of
    2,048 for 8 examples of 1,000 tokens, two to a row), not per_device_train_batch_size rows of max_length."""
    from transformers import AutoConfig

    def plan(packing: bool, lengths: list[int]):
        recipe = qlora_7b(llama2_7b_config, per_device_train_batch_size=8, gradient_checkpointing=False)
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": packing})})
        shape = model_shape(recipe, AutoConfig.from_pretrained(llama2_7b_config))
        return make_plan(recipe, shape, device="H100", lengths=lengths).components["activations"]

    packed = plan(True, [1000] * 400)
    assert packed == plan(False, [1024] * 400)  # 4 x 2,048 tokens = 8 rows of 1,024, padding-free
    assert packed < 0.6 * plan(False, [2048] * 400)  # what 8 packed rows of max_length would be


# --- several devices ---------------------------------------------------------------------------------


def one_device(recipe, config_dir, device):
    from transformers import AutoConfig

    from loratool.train.plan_devices import OneDevice

    shape = model_shape(recipe, AutoConfig.from_pretrained(config_dir))
    plan = make_plan(recipe, shape, device=device, budget_bytes=GPUS[device][0])
    return plan, OneDevice(plan.device, plan.budget_bytes, plan.components, plan.tokens_per_step,
                           plan.tokens_per_second, plan.steps, shape.parameters, shape.layers, shape.hidden,
                           shape.vocab)  # fmt: skip


def test_sharding_divides_what_is_shared_and_not_the_micro_batch(llama2_7b_config):
    from loratool.train.plan_devices import per_device_memory, spread

    recipe = qlora_7b(llama2_7b_config)
    plan, one = one_device(recipe, llama2_7b_config, "H100")
    ddp = per_device_memory("DDP", one, 16)
    assert ddp == plan.peak_memory_bytes + plan.components["gradients"]  # + DDP's gradient buckets
    fsdp2, fsdp16 = per_device_memory("ZeRO-3 / FSDP", one, 2), per_device_memory("ZeRO-3 / FSDP", one, 16)
    assert fsdp16 < fsdp2 < ddp
    micro_batch = plan.components["activations"] + plan.components["logits and loss"]
    assert fsdp16 > micro_batch  # no strategy divides a device's own micro-batch
    spread_plan = spread(recipe, one, nodes=2, gpus_per_node=8)
    by = {s.strategy: s for s in spread_plan.spreads}
    assert by["DDP"].peak_memory_bytes == int(ddp) and by["DDP"].fits
    # LoRA's gradients are small; sharding moves the whole 4-bit base per micro-batch, several times.
    assert by["ZeRO-3 / FSDP"].communication_seconds > 20 * by["DDP"].communication_seconds
    assert spread_plan.bandwidth_bytes_per_second == 45e9  # InfiniBand per GPU, slower than NVLink
    one_node = spread(recipe, one, nodes=1, gpus_per_node=8)
    assert one_node.bandwidth_bytes_per_second > spread_plan.bandwidth_bytes_per_second
    ethernet = spread(recipe, one, nodes=2, gpus_per_node=8, between_nodes="ethernet")
    assert ethernet.spreads[2].communication_seconds > by["ZeRO-3 / FSDP"].communication_seconds
    text = spread_plan.format()
    assert "2 node(s) x 8 H100 = 16 devices" in text and "InfiniBand between nodes" in text
    assert "fits on fewer devices: DDP on 1, ZeRO-2 on 1, ZeRO-3 / FSDP on 1 H100" in text


def test_it_says_which_strategy_fits_on_how_few_devices(llama2_7b_config):
    from loratool.train.plan_devices import spread

    batch4 = qlora_7b(llama2_7b_config, per_device_train_batch_size=4).model_dump(mode="json")
    plain = validate_recipe({**batch4, "quantization": None})
    _, one = one_device(plain, llama2_7b_config, "T4")  # 16-bit 7B weights (~12.6 GiB) on 16 GiB T4s
    by = {s.strategy: s for s in spread(plain, one, nodes=1, gpus_per_node=4).spreads}
    assert not by["DDP"].fits and by["DDP"].fewest_devices is None  # each device holds the whole model
    assert by["ZeRO-3 / FSDP"].fits and by["ZeRO-3 / FSDP"].fewest_devices == 2


def test_several_devices_need_a_gpu_and_a_known_link(llama2_7b_config):
    from loratool.train.plan_devices import spread

    recipe = qlora_7b(llama2_7b_config)
    _, one = one_device(recipe, llama2_7b_config, "H100")
    with pytest.raises(LoratoolError, match="--interconnect 'carrier-pigeon'"):
        spread(recipe, one, nodes=2, gpus_per_node=8, between_nodes="carrier-pigeon")
    from dataclasses import replace

    with pytest.raises(LoratoolError, match="plan GPUs, and this plan is for the CPU"):
        spread(recipe, replace(one, device="cpu"), nodes=2, gpus_per_node=1)
