"""The memory plan (`loratool plan`): memory by component, speed, suggestions, conflicts — from the
config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratool.errors import LoratoolError
from loratool.recipe import validate_recipe
from loratool.train.plan import GiB, conflicts, make_plan, model_shape, parse_memory

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
