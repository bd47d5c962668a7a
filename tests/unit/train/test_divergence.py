"""The divergence guard on stand-in runs (no training): a collapse, non-finite numbers and fp16
overflow skips, the expected loss of a fresh model, and the finite-adapter check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from loratool.train import divergence
from loratool.train.divergence import (
    COLLAPSE_PATIENCE,
    FP16_OVERFLOW_PATIENCE,
    DivergenceGuard,
    TrainingDiverged,
    check_finite_adapter,
)


def test_check_finite_adapter(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    check_finite_adapter(model)  # a fresh adapter is finite
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"\(1 of 8 tensors: .*layers\.1\.self_attn\.v_proj\.lora_B"):
        check_finite_adapter(model)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight[1, 2] = float("-inf")
    with pytest.raises(TrainingDiverged, match=r"1 of 8 tensors: .*layers\.0\.self_attn\.q_proj\.lora_A"):
        check_finite_adapter(model)


# The guard's rules, step by step, on a one-parameter stand-in for the trainer.

VOCAB = 1000


class StandIn:
    """What the guard uses of a trainer and its model: training_step, accelerator.gather, parameters."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.zeros(4))
        self.accelerator = SimpleNamespace(gather=lambda t: t)
        self.next_loss = torch.tensor(0.0)
        self.head = SimpleNamespace(weight=torch.zeros(VOCAB, 2))

    def training_step(self, *args, **kwargs):
        return self.next_loss

    def parameters(self):
        return iter([self.weight])

    def get_output_embeddings(self):
        return self.head


class Run:
    def __init__(self, scaler=None):
        self.trainer = StandIn()
        self.guard = DivergenceGuard(self.trainer)
        self.args = SimpleNamespace(learning_rate=1e-3, max_grad_norm=1.0)
        self.state = SimpleNamespace(global_step=0, max_steps=100)
        self.control = SimpleNamespace(should_save=False)
        self.optimizer = SimpleNamespace(scaler=scaler)
        self.guard.on_train_begin(self.args, self.state, self.control, model=self.trainer)

    def step(self, loss: float, grad: float, accumulation: int = 1) -> None:
        """One optimizer step whose micro-batch losses sum to `loss`, with gradient norm `grad`."""
        for _ in range(accumulation):
            self.trainer.next_loss = torch.tensor(loss / accumulation)
            self.trainer.training_step()  # the guard's wrapper around it records the loss
        self.trainer.weight.grad = torch.tensor([grad, 0.0, 0.0, 0.0])
        self.guard.on_pre_optimizer_step(
            self.args, self.state, self.control, model=self.trainer, optimizer=self.optimizer
        )
        self.state.global_step += 1
        self.control.should_save = True
        self.guard.on_step_end(self.args, self.state, self.control)

    def end(self) -> None:
        self.guard.on_train_end(self.args, self.state, self.control)


def test_guard_leaves_a_healthy_start_near_ln_vocab_alone():
    run = Run()
    for _ in range(20):  # a random model predicts nearly uniformly, but its gradient is not zero
        run.step(math.log(VOCAB), grad=0.5, accumulation=2)
        assert run.control.should_save
    for _ in range(COLLAPSE_PATIENCE + 2):  # a zero gradient away from ln(vocab): e.g. no trainable tokens
        run.step(0.0, grad=0.0)
    run.end()


def test_guard_needs_the_collapse_for_patience_steps_in_a_row():
    run = Run()
    run.step(5.0, grad=1.0)
    for _ in range(COLLAPSE_PATIENCE - 1):
        run.step(math.log(VOCAB) + 0.01, grad=0.0, accumulation=4)
        assert not run.control.should_save  # a checkpoint inside the streak would be resumed from
        run.control.should_save = True
        run.guard.on_epoch_end(run.args, run.state, run.control)
        assert not run.control.should_save
    run.step(5.0, grad=1.0)  # recovered: the streak starts over
    assert run.control.should_save
    for _ in range(COLLAPSE_PATIENCE - 1):
        run.step(math.log(VOCAB), grad=1e-9)
    with pytest.raises(
        TrainingDiverged,
        match=rf"at step {COLLAPSE_PATIENCE * 2 + 1}/100: .*since step {COLLAPSE_PATIENCE + 2} ",
    ):
        run.step(math.log(VOCAB), grad=0.0)


def test_guard_refuses_to_end_inside_a_collapse():
    run = Run()
    run.step(5.0, grad=1.0)
    run.step(math.log(VOCAB), grad=0.0)
    with pytest.raises(TrainingDiverged, match="at step 2/100: .*since step 2 .*Stopped at the end"):
        run.end()


def test_guard_stops_on_non_finite_numbers():
    for loss, grad, seen in [
        (float("nan"), 1.0, "the loss is nan"),
        (float("inf"), 1.0, "the loss is inf"),
        (2.0, float("inf"), "the gradient norm is inf"),
        (2.0, float("nan"), "the gradient norm is nan"),
    ]:
        run = Run()
        run.step(2.0, grad=1.0)
        with pytest.raises(TrainingDiverged, match=f"at step 2/100: {seen}"):
            run.step(loss, grad)


def test_guard_lets_the_fp16_loss_scaler_skip_overflowing_steps():
    run = Run(scaler=object())
    for _ in range(FP16_OVERFLOW_PATIENCE):  # the scaler skips these steps and lowers its scale
        run.step(2.0, grad=float("inf"))
    run.step(2.0, grad=1.0)  # and counting starts over after a good step
    for _ in range(FP16_OVERFLOW_PATIENCE):
        run.step(2.0, grad=float("inf"))
    with pytest.raises(TrainingDiverged, match=f"{FP16_OVERFLOW_PATIENCE + 1} steps in a row"):
        run.step(2.0, grad=float("inf"))
    run = Run(scaler=object())
    with pytest.raises(TrainingDiverged, match="the loss is nan"):  # a NaN loss is not the scaler's
        run.step(float("nan"), grad=1.0)


def test_ln_vocab_is_that_of_the_output_layer(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert divergence._ln_vocab(model) == pytest.approx(math.log(model.config.vocab_size))
