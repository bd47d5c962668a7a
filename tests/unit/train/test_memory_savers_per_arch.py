"""The memory savers change no number on any architecture loratool ships: on a tiny random model of each
real structure (loratool/model/tiny.py REAL_CONFIGS: Gemma 3's 262,144-token tied head and four norms per
layer, Qwen2's biases, Qwen3's q/k norms, Phi-3's fused projections), one forward and backward through TRL's
fused LM head gives the same loss and LoRA gradients with every saver installed as with none."""

from __future__ import annotations

import copy

import pytest
import torch

from loratool.model.hardware import Hardware
from loratool.model.tiny import REAL_STRUCTURE_ARCHITECTURES, real_structure_config
from loratool.train import memory
from loratool.train.memory import MemorySavers

CPU = Hardware(device="cpu", name="x86_64", device_count=1, bf16=False, cpu_count=2)
NONE = MemorySavers(mask_dropout=False, loss_positions=False, cpu_vocab_tiles=False, cheap_recompute=False)


@pytest.fixture
def trl_head(monkeypatch):
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    monkeypatch.setattr(utils, "_use_triton", chunked_logprob._use_triton)
    monkeypatch.setattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return utils


def step(model, savers: MemorySavers, input_ids, labels):
    memory.apply(model, CPU, savers)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", REAL_STRUCTURE_ARCHITECTURES)
def test_every_saver_keeps_the_loss_and_gradients(trl_head, arch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **real_structure_config(arch)))
    # Dropout 0: PEFT's dropout and the mask-keeping one draw other random streams (tested elsewhere).
    stock = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    saving = copy.deepcopy(stock)
    for model in (stock, saving):  # as SFTTrainer does (the head's forward closes over its own model)
        trl_head.add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        model.train()
    input_ids = torch.randint(0, 500, (2, 40))
    labels = input_ids.clone()
    labels[0, :25], labels[1, :10] = -100, -100  # prompts carry no loss

    loss, grads = step(stock, NONE, input_ids, labels)
    saved_loss, saved_grads = step(saving, MemorySavers(), input_ids, labels)
    torch.testing.assert_close(saved_loss, loss, atol=1e-6, rtol=1e-6)
    assert saved_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(saved_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
