"""4-bit layers give the same numbers on every CPU (loratool/model/bnb_cpu.py), and the filter
for bitsandbytes' warning about its fused CPU kernel drops that warning and nothing else.

CPUs with AVX512-BF16 are simulated on any CPU (conftest.simulate_avx512bf16): bitsandbytes' own selection
code runs; only its CPU feature check says yes, and its fused kernel is a stand-in that rounds like it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import smoke_recipe
from helpers.bnb_cpu import QLORA, SMOKE
from loratool.model.bnb_cpu import (
    KERNEL_HUB_LOGGER,
    four_bit_matmul,
    silence_kernel_hub_warning,
    use_exact_4bit_matmul,
)

EXACT_PATH = "dequantize-then-matmul in float32 (cpu)"


def four_bit_layer() -> torch.nn.Module:
    """A 128 -> 64 NF4 layer (no bias, like Llama's) computing in float32, as transformers builds them for a
    QLoRA recipe on a CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(
        128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def repacked(model: torch.nn.Module) -> list[str]:
    """The layers the fused kernel took over (their weight is in its layout now)."""
    return [
        name
        for name, m in model.named_modules()
        if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]


# --- one layer: what the fused path does, and that loratool turns it off ------------------------------


def test_on_an_avx512bf16_cpu_eval_mode_takes_the_bfloat16_kernel(simulated_avx512bf16):
    """What loratool guards against; also shows the stand-in reads the repacked weight right (a wrong layout
    would be off by ~1, not by bfloat16 rounding)."""
    layer = four_bit_layer()
    x = torch.randn(8, 128)
    exact = layer(x)  # train mode: dequantize-then-matmul in float32
    assert four_bit_matmul(torch.nn.Sequential(layer)) == "fused AVX512-BF16 kernel in eval mode (bfloat16)"

    with torch.no_grad():
        fused = layer.eval()(x)
    assert repacked(layer) == [""]
    assert 1e-3 < (fused - exact).abs().max().item() < 3e-2  # measured 5.3e-3 (7e-3 on a real EPYC)
    # Repacked for good: train mode now runs the kernel too, and no gradient flows back through the layer.
    assert not layer.train()(x.clone().requires_grad_()).requires_grad


def test_use_exact_4bit_matmul_keeps_eval_mode_exact(simulated_avx512bf16):
    layer = four_bit_layer()
    x = torch.randn(8, 128, requires_grad=True)
    exact = layer(x)
    (exact_grad,) = torch.autograd.grad(exact.sum(), x)

    assert use_exact_4bit_matmul(torch.nn.Sequential(layer)) == 1
    assert four_bit_matmul(torch.nn.Sequential(layer)) == EXACT_PATH
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), exact)
    assert repacked(layer) == []
    (grad,) = torch.autograd.grad(layer.train()(x).sum(), x)
    assert torch.equal(grad, exact_grad)


def test_a_layer_that_already_ran_the_fused_kernel_is_refused(simulated_avx512bf16):
    layer = four_bit_layer()
    with torch.no_grad():
        layer.eval()(torch.randn(2, 128))
    with pytest.raises(RuntimeError, match="already ran the fused CPU kernel"):
        use_exact_4bit_matmul(torch.nn.Sequential(layer))


def test_full_precision_models_have_no_4bit_path():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert use_exact_4bit_matmul(model) == 0 and four_bit_matmul(model) is None


# --- a loaded 4-bit base: every evaluation path of loratool loads through model.load_model -----------------


def load_4bit(tiny_llama: Path, tmp_path: Path) -> torch.nn.Module:
    from loratool.model import hardware
    from loratool.model.load import load_model
    from loratool.recipe import validate_recipe

    recipe = validate_recipe(smoke_recipe(tiny_llama, SMOKE, tmp_path / "run", quantization=QLORA))
    return load_model(recipe, hardware.detect(), log=lambda _: None)


def eval_and_train_mode_logits(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        trained = model.train()(input_ids=ids).logits  # what training computed: the exact path
        evaluated = model.eval()(input_ids=ids).logits  # (after it: eval mode may repack the weights)
    return evaluated, trained


def test_loaded_4bit_base_computes_the_same_on_every_cpu(any_cpu, tiny_llama, tmp_path):
    model = load_4bit(tiny_llama, tmp_path)
    evaluated, trained = eval_and_train_mode_logits(model)
    assert torch.equal(evaluated, trained)
    assert repacked(model) == [] and four_bit_matmul(model) == EXACT_PATH


def test_without_loratool_the_simulated_cpu_drifts(simulated_avx512bf16, tiny_llama, tmp_path, monkeypatch):
    """The test above can fail: with the guard gone, the simulated CPU's logits move by 10x verification's
    1e-3 bound."""
    import loratool.model.load

    monkeypatch.setattr(loratool.model.load, "use_exact_4bit_matmul", lambda model: 0)
    evaluated, trained = eval_and_train_mode_logits(load_4bit(tiny_llama, tmp_path))
    assert (evaluated - trained).abs().max().item() > 1e-2  # measured 5.1e-2


# --- the warning --------------------------------------------------------------------------------------------


def test_the_filter_drops_that_warning_and_nothing_else(caplog):
    silence_kernel_hub_warning()
    silence_kernel_hub_warning()  # once is enough; twice changes nothing
    logger = logging.getLogger(KERNEL_HUB_LOGGER)
    assert len(logger.filters) >= 1
    with caplog.at_level(logging.WARNING):
        # bitsandbytes/backends/cpu/ops.py's own call
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ImportError("No module named 'kernels'"),
        )
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
