"""Stop a run whose training has diverged, at the step it happens, and never write a broken adapter.

Two signatures, checked at every optimizer step (not only at logging steps), after the backward pass and
before the optimizer applies the gradients:

- a non-finite loss or gradient (NaN or inf): one more update would write NaN into the adapter;
- collapse to uniform prediction: the loss sits at ln(vocab size), the loss of predicting every token as
  equally likely, with a gradient norm of ~0, for COLLAPSE_PATIENCE steps in a row. Seen at
  learning_rate 1000 on a tiny model: from step 4 on, loss = ln(512) = 6.2383 and grad norm 0 at every
  step; the run would end "complete" with an adapter that makes the model answer nothing.

A healthy run does not show the second signature: its loss may start near ln(vocab) (a random model
predicts nearly uniformly), but then its gradient is far from zero.

The guard raises TrainingDiverged (a LoratoolError): train marks the run failed, the adapter is never
moved to the run's root, and the trainer saves no checkpoint of the diverged state (checkpoints saved
before it are kept).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    import torch
    from transformers import Trainer

COLLAPSE_PATIENCE = 3
"""Consecutive optimizer steps the collapse signature must hold. One step with a zero gradient at
ln(vocab) is already abnormal; three rule out a coincidence at the cost of three wasted steps."""

COLLAPSE_LOSS_TOLERANCE = 0.02
"""How close to ln(vocab) the loss must be, relative to ln(vocab) (0.12 nats for a 512-token vocabulary,
0.21 for 32k). Loose on purpose: the gradient condition is the specific one."""

COLLAPSE_GRAD_NORM = 1e-6
"""A gradient norm below this counts as zero. Healthy LoRA runs stay orders of magnitude above it (the
B matrices get a gradient from the first step; tiny test models show norms of 0.1 to 10)."""

FP16_OVERFLOW_PATIENCE = 25
"""Consecutive steps with non-finite gradients tolerated under fp16 mixed precision. There the loss
scaler starts at 2**16 and halves its scale after each overflowing step, which it then skips: a few
overflows at the start are normal. After 25 halvings (scale 2**-9) an overflow is not the scaler's."""


class TrainingDiverged(LoratoolError):
    """Training produced a non-finite loss, gradient or adapter, or collapsed to uniform prediction."""


class DivergenceGuard(TrainerCallback):
    """Checks each optimizer step's loss and gradient norm and raises TrainingDiverged at the first sign
    of divergence. Add it to a built trainer: `trainer.add_callback(DivergenceGuard(trainer))`.

    Cost per step: one fused norm over the trainable gradients and one device-to-host copy of two
    numbers (the trainer already syncs on the loss every micro-batch)."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer
        self._loss: torch.Tensor | None = None  # sum of this step's micro-batch losses = the step's loss
        self._params: list[torch.Tensor] | None = None
        self._ln_vocab: float | None = None
        self._collapsed_since: int | None = None  # first step of the current collapse streak
        self._collapsed_steps = 0
        self._overflows = 0
        # The trainer shows callbacks no per-step loss (it logs only every logging_steps, and replaces
        # a NaN loss by the previous average): record what its training step returns.
        step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = step(*args, **kwargs)
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
            return loss

        trainer.training_step = training_step  # type: ignore[method-assign]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._ln_vocab = _ln_vocab(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        if self._params is None:
            self._params = [p for p in model.parameters() if p.requires_grad]
        # Without a recorded loss (a trainer whose training_step was replaced again) only gradients count.
        loss_known = self._loss is not None
        loss = self._loss if self._loss is not None else torch.tensor(0.0)
        self._loss = None
        grads = [_local(p.grad) for p in self._params if p.grad is not None]
        # No gradients to see (DeepSpeed keeps its own): the loss is checked alone.
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        summary = torch.stack([loss.float().reshape(()), norm.float().to(loss.device)])
        # Every process decides on the same numbers (a process that stopped alone would leave the others
        # waiting for it): the mean loss and the largest local gradient norm over all processes.
        rows = self._trainer.accelerator.gather(summary).reshape(-1, 2)
        losses, norms = rows[:, 0].tolist(), rows[:, 1].tolist()
        step_loss = sum(losses) / len(losses)
        grad_norm = next((n for n in norms if not math.isfinite(n)), max(norms))
        step = state.global_step + 1  # the step being taken, as metrics.jsonl numbers it

        if loss_known and not math.isfinite(step_loss):
            self._raise(args, state, step, f"the loss is {step_loss}")
        if grads and not math.isfinite(grad_norm):
            scaler = getattr(optimizer, "scaler", None)  # fp16: the scaler skips this step by itself
            self._overflows += 1
            if scaler is None or self._overflows > FP16_OVERFLOW_PATIENCE:
                in_a_row = f" ({self._overflows} steps in a row, despite fp16 loss scaling)" if scaler else ""
                self._raise(
                    args, state, step, f"the gradient norm is {grad_norm}{in_a_row} (loss {step_loss:.4f})"
                )
            return
        self._overflows = 0
        if loss_known and grads and self._collapsing(step_loss, grad_norm):
            self._collapsed_steps += 1
            self._collapsed_since = self._collapsed_since or step
            if self._collapsed_steps >= COLLAPSE_PATIENCE:
                self._raise(args, state, step, self._collapse_seen(step_loss, grad_norm))
        else:
            self._collapsed_steps, self._collapsed_since = 0, None

    def on_step_end(self, args, state, control, **kwargs):
        # A step inside a collapse streak is not saved as a checkpoint: --resume would start from it.
        if self._collapsed_steps:
            control.should_save = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.on_step_end(args, state, control)  # the same for a checkpoint at the end of an epoch

    def on_train_end(self, args, state, control, **kwargs):
        # The last steps collapsed and training ended before COLLAPSE_PATIENCE: that adapter is broken too.
        if self._collapsed_steps:
            self._raise(args, state, state.global_step, self._collapse_seen(None, None), stopped="at the end")

    def _collapsing(self, loss: float, grad_norm: float) -> bool:
        return (
            self._ln_vocab is not None
            and abs(loss - self._ln_vocab) <= COLLAPSE_LOSS_TOLERANCE * self._ln_vocab
            and grad_norm <= COLLAPSE_GRAD_NORM
        )

    def _collapse_seen(self, loss: float | None, grad_norm: float | None) -> str:
        assert self._ln_vocab is not None
        now = f"loss {loss:.4f}, gradient norm {grad_norm:.2g}" if loss is not None else ""
        return (
            f"the model collapsed to predicting every token as equally likely: since step "
            f"{self._collapsed_since} the loss has sat at ln(vocabulary size) = {self._ln_vocab:.4f} with a "
            f"gradient norm of ~0, {self._collapsed_steps} steps in a row" + (f" (now {now})" if now else "")
        )

    def _raise(
        self, args: Any, state: Any, step: int, seen: str, stopped: str = "there, before the optimizer step"
    ) -> None:
        of = f"/{state.max_steps}" if state.max_steps and state.max_steps > 0 else ""
        raise TrainingDiverged(
            f"training diverged at step {step}{of}: {seen}. Stopped {stopped}; no adapter was written, "
            "checkpoints saved before the divergence are kept",
            hint=f"lower training.learning_rate (it is {args.learning_rate:g}; LoRA usually wants 1e-4 to 3e-4), "
            f"lengthen the warm-up (training.warmup_ratio, e.g. 0.1), clip gradients (training.max_grad_norm, it "
            f"is {args.max_grad_norm:g}; 1.0 or lower), and check the data for broken or empty rows; then "
            "start the run again (--overwrite, or another training.output_dir)",
        )


def check_finite_adapter(model: Any) -> None:
    """Refuse to write an adapter holding NaN or inf: it would load, and make every answer garbage."""
    import torch
    from peft import get_peft_model_state_dict

    weights = {name: _local(t) for name, t in get_peft_model_state_dict(model).items()}
    if not weights:
        return
    device = next(iter(weights.values())).device
    finite = torch.stack([torch.isfinite(t).all().to(device) for t in weights.values()]).tolist()
    broken = [name for name, ok in zip(weights, finite, strict=True) if not ok]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise TrainingDiverged(
            f"the trained adapter holds NaN or inf values ({len(broken)} of {len(weights)} tensors: {shown}); "
            "it was not written",
            hint="training diverged: lower training.learning_rate, lengthen the warm-up (training.warmup_ratio), "
            "keep training.max_grad_norm at 1.0 or lower, and check the data; then start the run again",
        )


def _ln_vocab(model: Any) -> float | None:
    """ln of the number of logits per token: the loss of a uniform prediction. None if unknown."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    size = weight.shape[0] if weight is not None else None
    if size is None:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text, "vocab_size", None)
    return math.log(size) if size and size > 1 else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2) tensor's local part; other tensors as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
