"""The concatenated mixed-adapter path: its logits equal PEFT's `adapter_names=` path for adapters of other
ranks, scalings and target modules and for rows on the base; it leaves to PEFT what it does not handle (DoRA,
modules_to_save); and `reset` gives the model back with PEFT's adapters working."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loratool.generate.run import BASE
from loratool.serve.engine import PEFT_BASE
from loratool.serve.mixed import MixedLora

ROWS = ["wide", "narrow", BASE, "attention", "wide", "narrow"]


def _randomise(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f"lora_B.{name}." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def model(tiny_llama):
    """A tiny Llama with three LoRA adapters that differ in rank, alpha and target modules."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_name="wide"
    )
    peft.add_adapter("narrow", LoraConfig(r=2, lora_alpha=8, target_modules="all-linear", use_rslora=True))
    peft.add_adapter("attention", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for seed, name in enumerate(("wide", "narrow", "attention")):
        _randomise(peft, name, seed)
    return peft.eval()


def _ids(rows: int) -> torch.Tensor:
    return torch.randint(3, 200, (rows, 7), generator=torch.Generator().manual_seed(1))


def _peft_logits(model, rows: list[str]) -> torch.Tensor:
    names = [PEFT_BASE if row == BASE else row for row in rows]
    return model(input_ids=_ids(len(rows)), adapter_names=names).logits


def test_a_mixed_batch_gives_peft_s_logits_for_every_row(model):
    mixed = MixedLora()
    with torch.inference_mode():
        expected = _peft_logits(model, ROWS)
        assert mixed.handles(model, ROWS)
        with mixed.rows(model, ROWS):
            got = model(input_ids=_ids(len(ROWS))).logits
        mixed.reset()
    assert not torch.equal(expected[0], expected[2])  # the adapters change the answer: a lost one would show
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_set_of_adapters_can_change_between_batches(model):
    mixed = MixedLora()
    with torch.inference_mode():
        for rows in (ROWS, ["attention", BASE], ["narrow", "narrow"], [BASE, BASE], ROWS[::-1]):
            assert mixed.handles(model, rows)
            with mixed.rows(model, rows):
                got = model(input_ids=_ids(len(rows))).logits
            mixed.peft_path()
            torch.testing.assert_close(got, _peft_logits(model, rows), rtol=1e-4, atol=1e-4)
        mixed.reset()


def test_reset_gives_peft_its_adapters_back(model):
    mixed = MixedLora()
    with torch.inference_mode():
        model.set_adapter("wide")
        before = model(input_ids=_ids(1)).logits
        with mixed.rows(model, [BASE]):
            on_base = model(input_ids=_ids(1)).logits
        mixed.reset()
        after = model(input_ids=_ids(1)).logits
    assert not torch.allclose(before, on_base)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["dora", "modules_to_save"],
)
def test_what_it_does_not_handle_is_left_to_peft(tiny_llama, config):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="plain")
    model.add_adapter("other", config)
    mixed = MixedLora()
    assert mixed.handles(model, ["plain", BASE])
    assert not mixed.handles(model, ["plain", "other"])
