"""Precision and attention choices follow the hardware; impossible requests fail before loading."""

from __future__ import annotations

import pytest
import torch

from loratool.errors import LoratoolError
from loratool.model import hardware
from loratool.model.hardware import Hardware
from loratool.recipe import validate_recipe

CPU = Hardware(device="cpu", name="x86_64", device_count=1, bf16=False, cpu_count=2)
OLD_GPU = Hardware(device="cuda", name="Tesla T4", device_count=1, bf16=False, cpu_count=8)
NEW_GPU = Hardware(device="cuda", name="NVIDIA H100", device_count=1, bf16=True, cpu_count=16)


def recipe(**sections):
    raw = {"base_model": "m", "data": {"train": [{"path": "t.jsonl"}]}, "training": {"output_dir": "o"}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate_recipe(raw)


def test_auto_dtype_per_device():
    assert hardware.model_dtype("auto", CPU) == torch.float32
    assert hardware.model_dtype("auto", OLD_GPU) == torch.float16
    assert hardware.model_dtype("auto", NEW_GPU) == torch.bfloat16
    assert hardware.model_dtype("float16", NEW_GPU) == torch.float16


def test_mixed_precision_follows_compute_dtype_unless_set():
    plain = recipe()
    assert hardware.mixed_precision(plain, CPU) == (False, False)
    assert hardware.mixed_precision(plain, NEW_GPU) == (True, False)
    assert hardware.mixed_precision(plain, OLD_GPU) == (False, True)
    qlora = recipe(quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16"})
    assert hardware.mixed_precision(qlora, NEW_GPU) == (False, True)
    forced = recipe(training={"output_dir": "o", "bf16": False})
    assert hardware.mixed_precision(forced, NEW_GPU) == (False, False)


def test_the_same_recipe_checks_on_cpu_and_gpu():
    hardware.check(recipe(), CPU)
    hardware.check(recipe(), NEW_GPU)


@pytest.mark.parametrize(
    ("sections", "hw", "expected"),
    [
        ({"training": {"output_dir": "o", "bf16": True}}, OLD_GPU, "cuda (Tesla T4) has no bfloat16 support"),
        ({"model": {"dtype": "bfloat16"}}, CPU, "cpu (x86_64) has no bfloat16 support"),
        ({"training": {"output_dir": "o", "fp16": True}}, CPU, "float16 mixed precision needs a CUDA GPU"),
        ({"model": {"attn_implementation": "flash_attention_2"}}, CPU, "flash_attention_2 needs a CUDA GPU"),
    ],
)
def test_impossible_requests_are_refused(sections, hw, expected):
    with pytest.raises(LoratoolError) as info:
        hardware.check(recipe(**sections), hw)
    assert expected in info.value.message
    assert "model.dtype: auto" in info.value.hint


def test_detect_on_this_machine():
    hw = hardware.detect()
    assert hw.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hw.cpu_count >= 1
