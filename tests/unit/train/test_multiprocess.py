"""Several processes on CPU, what needs no launch: the launch is read from accelerate's
variables, impossible combinations are all listed, 4-bit under ZeRO-3 needs the compute dtype as
storage, and every shipped accelerate config loads.

The runs are shared by the module: a one-process reference of 8 steps (batch 8), a two-process run of 6
steps (2 rows x 2 processes x 2 accumulation steps) under torchrun, and its resume to step 8 as two
machines. A constant learning rate makes 6 steps + 2 resumed steps the same training as 8 straight ones.
"""

from __future__ import annotations

import pytest

from conftest import REPO, smoke_recipe, write_recipe
from helpers.multiprocess import CONFIGS

# --- what cannot work, refused before any weights load (hardware.check) --------------------------------


def recipe_with(tmp_path, tiny_llama, **sections):
    from loratool.recipe import load_recipe

    body = smoke_recipe(tiny_llama, REPO / "recipes" / "data" / "smoke.jsonl", tmp_path / "out", **sections)
    return load_recipe(write_recipe(tmp_path / "r.yaml", body))


def test_launch_is_read_from_accelerates_variables():
    from loratool.model.hardware import launch

    assert launch({}).sharding is None and launch({}).processes == 1
    fsdp = launch({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "4"})
    assert (fsdp.sharding, fsdp.processes, fsdp.shards_weights) == ("fsdp", 4, True)
    zero2 = launch({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert (zero2.sharding, zero2.zero_stage, zero2.shards_weights) == ("deepspeed", 2, False)


def test_impossible_combinations_are_all_listed_at_once(tmp_path, tiny_llama):
    from loratool.errors import LoratoolError
    from loratool.model.hardware import Hardware, Launch, check

    cpu = Hardware(device="cpu", name="x86_64", device_count=1, bf16=False, cpu_count=2)
    recipe = recipe_with(
        tmp_path,
        tiny_llama,
        quantization={"load_in_8bit": True},
        model={"attn_implementation": "flash_attention_2"},
    )
    with pytest.raises(LoratoolError) as caught:
        check(recipe, cpu, Launch("fsdp", None, 2))
    message = caught.value.message
    assert "FSDP, which accelerate applies on CUDA GPUs only" in message
    assert "quantization.load_in_8bit: 8-bit weights cannot be sharded by FSDP" in message
    assert "flash_attention_2 needs a CUDA GPU" in message
    assert message.count("\n  - ") == 3


def test_four_bit_under_zero3_needs_the_compute_dtype_as_storage(tmp_path, tiny_llama):
    import torch

    from loratool.errors import LoratoolError
    from loratool.model.hardware import Hardware, Launch, check, launch_conflicts, quant_storage

    gpu = Hardware(device="cuda", name="H100", device_count=8, bf16=True, cpu_count=32)
    zero3 = Launch("deepspeed", 3, 8)
    wrong = recipe_with(
        tmp_path,
        tiny_llama,
        model={"dtype": "bfloat16"},
        quantization={"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"},
    )
    problems = launch_conflicts(wrong, gpu, zero3)
    assert any("bnb_4bit_quant_storage: uint8 under DeepSpeed ZeRO-3 must equal" in p for p in problems)
    unset = recipe_with(
        tmp_path, tiny_llama, model={"dtype": "bfloat16"}, quantization={"load_in_4bit": True}
    )
    assert quant_storage(unset, gpu, zero3) == torch.bfloat16  # loratool sets it
    assert quant_storage(unset, gpu, Launch(None, None, 8)) is None  # DDP: bitsandbytes' default
    with pytest.raises(LoratoolError):
        check(wrong, gpu, Launch("fsdp", None, 8))


def test_every_shipped_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        path.name: str(load_config_from_file(str(path)).distributed_type).split(".")[-1]
        for path in sorted(CONFIGS.glob("*.yaml"))
    }
    assert kinds == {
        "ddp.yaml": "MULTI_GPU",
        "deepspeed-zero2.yaml": "DEEPSPEED",
        "deepspeed-zero3.yaml": "DEEPSPEED",
        "fsdp.yaml": "FSDP",
        "multi-machine.yaml": "MULTI_GPU",
    }
