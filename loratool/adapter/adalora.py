"""AdaLoRA's rank budget during training, and the ranks it ends with.

PEFT's AdaLoRA keeps each layer's update in SVD form (B, E, A) and, after every optimizer step, scores the
singular values by how much the loss depends on them and zeroes the least important until the total rank
falls from init_r per layer to target_r per layer on average. That step is
`model.base_model.update_and_allocate(global_step)`, "after optimizer.step() and before zero_grad()"; the
transformers Trainer does not call it (nor does trl's SFTTrainer), so `RankBudget` does, from the
trainer's `on_optimizer_step` event, where the gradients it scores are still there.

The schedule (tinit, tfinal, deltaT) is counted against `total_step`, which loratool sets to the run's
real number of optimizer steps: the trainer's own count (`state.max_steps`, from the data, the batch and
the epochs or training.max_steps), taken when training begins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import LoraSection


def provisional_total_steps(lora: LoraSection) -> int:
    """A step count that PEFT's AdaLoraConfig accepts (tinit + tfinal < total_step) for the moment the
    adapter is attached: the trainer's real count replaces it before the first step (RankBudget)."""
    return (lora.tinit or 0) + (lora.tfinal or 0) + 1


class RankBudget(TrainerCallback):
    """Moves AdaLoRA's rank budget after every optimizer step; `record()` is what run.json keeps."""

    def __init__(self, model: Any) -> None:
        import warnings

        from peft.utils.warning import PeftWarning

        self.model = model  # the PeftModel with the AdaLoRA adapter
        self.total_steps: int | None = None
        # A layer AdaLoRA cut to rank 0 is saved as a (0, n) tensor, which PEFT's save blames on unGathered
        # FSDP / ZeRO-3 shards: not the case here.
        warnings.filterwarnings(
            "ignore", message=r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape", category=PeftWarning
        )

    @property
    def config(self) -> Any:
        return self.model.peft_config[self.model.base_model.trainable_adapter_name]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        config = self.config
        total = state.max_steps
        if config.tinit + config.tfinal >= total:
            raise LoratoolError(
                f"lora.tinit + lora.tfinal ({config.tinit} + {config.tfinal}) leave none of this run's {total} "
                "optimizer steps to reallocate AdaLoRA's rank budget in",
                hint="lower lora.tinit / lora.tfinal, or train longer (training.max_steps, num_train_epochs)",
            )
        self.model.base_model.rankallocator.set_total_step(total)  # sets config.total_step too
        self.total_steps = total

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # global_step counts the steps finished before this one: 0 at the first, as in PEFT's examples.
        self.model.base_model.update_and_allocate(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Zero what the last allocation cut, so that the model evaluated now is the adapter saved next
        # (PEFT saves each layer cut to its rank; an optimizer step after the last cut would otherwise
        # leave small values there that the saved adapter does not have).
        pattern = self.config.rank_pattern
        if pattern:
            self.model.base_model.rankallocator.mask_using_rank_pattern(self.model.base_model.model, pattern)

    def record(self) -> dict[str, Any]:
        """init_r, target_r, the schedule, total_step and the final rank of every adapted layer."""
        config = self.config
        ranks = final_ranks(self.model)
        return {
            "init_r": config.init_r,
            "target_r": config.target_r,
            "tinit": config.tinit,
            "tfinal": config.tfinal,
            "deltaT": config.deltaT,
            "total_step": self.total_steps,
            "rank_budget": {"start": config.init_r * len(ranks), "end": sum(ranks.values())},
            "final_ranks": ranks,
        }


def final_ranks(model: Any) -> dict[str, int]:
    """{layer name: rank it kept}, e.g. {"model.layers.0.self_attn.q_proj": 5}: the allocator's last
    rank pattern, or every layer's starting rank when no allocation has run yet."""
    adapter = model.base_model.trainable_adapter_name
    pattern = model.peft_config[adapter].rank_pattern
    if pattern:
        # Keys name the lora_E parameter, with the adapter name or (after a save) without it.
        return {key.split(".lora_E")[0]: int(sum(mask)) for key, mask in sorted(pattern.items())}
    return {
        name.removeprefix("base_model.model.").split(".lora_E")[0]: int(param.shape[0])
        for name, param in model.named_parameters()
        if f"lora_E.{adapter}" in name
    }
