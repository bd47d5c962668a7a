"""Which memory savers a model gets (loratool/train/memory/__init__.py `choose`), and that `apply` installs
exactly those: each switch checked by its effect on the model or on TRL's LM head, not by its flag."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loratool.model.hardware import Hardware
from loratool.model.tiny import real_structure_config
from loratool.train import memory
from loratool.train.memory import SWITCHES, MemorySavers

CPU = Hardware(device="cpu", name="x86_64", device_count=1, bf16=False, cpu_count=2)
GPU = Hardware(device="cuda", name="NVIDIA H100", device_count=1, bf16=True, cpu_count=16)


def config(arch: str, real_shape: bool = False):
    """The config of a tiny random model with `arch`'s real structure (loratool/model/tiny.py), or of the
    real checkpoint's widths."""
    from transformers import AutoConfig

    fields = real_structure_config(arch, real_shape=real_shape)
    return AutoConfig.for_model(arch, **fields)


@pytest.fixture
def trl_head(monkeypatch):
    """TRL's own LM-head settings for the test, put back afterwards (apply sets module globals)."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    monkeypatch.setattr(utils, "_use_triton", chunked_logprob._use_triton)
    monkeypatch.setattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return utils


def tiny_model(arch: str):
    """A tiny random `arch` model of the real structure with LoRA (dropout 0.05) on every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(arch))
    return get_peft_model(model, LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))


def installed(model, utils) -> MemorySavers:
    """What is in force, read off the model and TRL (not off any flag loratool keeps)."""
    lora_a = [m for name, m in model.named_modules() if name.endswith("lora_A.default")]
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert lora_a and layers
    return MemorySavers(
        mask_dropout=all(hasattr(m, "loratool_dropout") for m in lora_a),
        loss_positions=utils._use_triton(torch.device("cpu")),  # TRL scores only loss positions on CPU
        cpu_vocab_tiles=utils._CHUNKED_LOGPROB_CHUNK_SIZE == 4096,
        cheap_recompute=all("_loratool_inner_forward" in m.__dict__ for m in layers),
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def test_real_widths_get_every_saver_on_a_cpu(arch):
    # At the real checkpoints' widths (Gemma-3-270m profiled switch by switch, memory/__init__.py `choose`)
    # no switch made a step slower or bigger.
    assert memory.choose(config(arch, real_shape=True), CPU) == MemorySavers()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def test_narrow_models_keep_peft_s_dropout_as_measured(arch):
    # The 64-wide models of every structure trained faster with PEFT's dropout (scripts/bench_arch.py);
    # the other switches stay on.
    tiny = config(arch)
    if arch == "gemma3_text":
        assert (tiny.vocab_size, tiny.tie_word_embeddings, tiny.sliding_window) == (262144, True, 512)
    savers = memory.choose(tiny, CPU)
    assert not savers.mask_dropout
    assert dict(savers.off) == {"mask_dropout": "hidden size 64 < 256: PEFT's dropout measured faster"}
    assert savers.loss_positions and savers.cpu_vocab_tiles and savers.cheap_recompute


def test_a_gpu_keeps_trl_s_own_vocabulary_tiles():
    savers = memory.choose(config("llama", real_shape=True), GPU)
    assert not savers.cpu_vocab_tiles
    assert dict(savers.off) == {"cpu_vocab_tiles": "not on a CPU"}
    assert savers.mask_dropout and savers.loss_positions and savers.cheap_recompute


def test_the_record_names_every_switch_and_why_one_is_off():
    record = MemorySavers().without("cheap_recompute", "measured slower here").record()
    assert record == {
        "mask_dropout": True,
        "loss_positions": True,
        "cpu_vocab_tiles": True,
        "cheap_recompute": False,
        "off": {"cheap_recompute": "measured slower here"},
    }
    with pytest.raises(ValueError, match="no memory saver named 'typo'"):
        MemorySavers().without("typo", "")


@pytest.mark.parametrize("off", [(), *((s,) for s in SWITCHES), SWITCHES])
def test_apply_installs_exactly_the_chosen_savers(trl_head, off):
    model = tiny_model("llama")
    chosen = MemorySavers(**{s: s not in off for s in SWITCHES})
    returned = memory.apply(model, CPU, chosen)
    assert returned == chosen
    assert installed(model, trl_head) == chosen


def test_a_switch_turned_off_undoes_what_an_earlier_run_in_the_process_set(trl_head):
    memory.apply(tiny_model("llama"), CPU)  # every saver: TRL's globals switched
    later = tiny_model("llama")
    chosen = MemorySavers(loss_positions=False, cpu_vocab_tiles=False)
    memory.apply(later, CPU, chosen)
    assert installed(later, trl_head) == chosen
    assert trl_head._CHUNKED_LOGPROB_CHUNK_SIZE == 32768  # TRL's own width again


def test_apply_without_a_choice_installs_what_choose_picks_for_the_model(trl_head):
    model = tiny_model("gemma3_text")
    chosen = memory.choose(model.config, CPU)
    returned = memory.apply(model, CPU)
    assert dataclasses.replace(returned, off=()) == dataclasses.replace(chosen, off=())
    assert installed(model, trl_head) == dataclasses.replace(chosen, off=())
