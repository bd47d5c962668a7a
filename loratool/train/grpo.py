"""The `grpo` and `rloo` sections: online RL of the LoRA adapter with trl's GRPOTrainer and RLOOTrainer.

During training the model answers each prompt (data/prompts.py) `num_generations` times; the rewards
(train/rewards.py) score every completion, and the adapter learns from how each completion scored
against the others of its prompt: GRPO divides by the group's spread, RLOO subtracts the mean of the
other completions. The two trainers take the same arguments and differ in that step only, so one module
builds both. Generation runs through transformers' generate on the training device (CPU or GPU), or
through vLLM when `use_vllm` is set (refused without vllm or a CUDA GPU).

The reference of the KL term (`beta` > 0) costs no memory, as for DPO (dpo.py): the base with the
adapter disabled, or a frozen copy of the starting adapter (`init_adapter`, a non-zero init).

One of the sibling trainer builders (sft.py, dpo.py, kto.py, grpo.py, ...), with the same few functions;
`train/preflight.py` picks one per recipe.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from loratool.data.prompts import COLUMNS, build_prompt_datasets
from loratool.data.templates import end_of_turn
from loratool.errors import LoratoolError
from loratool.model import hardware
from loratool.train.arguments import make_config, trainer_fields
from loratool.train.dpo import (
    check_init_adapter,
    drop_reference_adapter,
    drop_unneeded_reference,
    load_init_adapter,
    reference_description,
)
from loratool.train.rewards import load_rewards, trl_reward_funcs

if TYPE_CHECKING:
    from peft import PeftModel

    from loratool.data import PreparedData
    from loratool.recipe import GrpoSection, Recipe, RlooSection

# Per method: trl's config and trainer, and the settings only that method has (the rest are shared).
TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}
OWN_SETTINGS = {"grpo": ("loss_type", "scale_rewards"), "rloo": ("normalize_advantages",)}
SHARED_SETTINGS = ("num_generations", "max_completion_length", "beta", "temperature", "top_p", "epsilon",
                   "num_iterations", "mask_truncated_completions", "use_vllm")  # fmt: skip


def section(recipe: Recipe) -> GrpoSection | RlooSection:
    """The recipe's online RL section (grpo or rloo)."""
    found = getattr(recipe, recipe.stage)
    assert recipe.stage in TRAINERS and found is not None
    return found


def check(recipe: Recipe) -> None:
    """Before anything loads: vLLM only where it can run, every reward function loads, and
    `init_adapter` names a finished run on the same base and lora section."""
    check_vllm(recipe)
    load_rewards(section(recipe).rewards, recipe.stage)
    check_init_adapter(recipe)


def check_vllm(recipe: Recipe, hw: hardware.Hardware | None = None) -> None:
    """`use_vllm` needs vllm installed and a CUDA GPU: refused with the reason otherwise."""
    if not section(recipe).use_vllm:
        return
    key = f"{recipe.stage}.use_vllm"
    if importlib.util.find_spec("vllm") is None:
        raise LoratoolError(
            f"{key}: vllm is not installed",
            hint="pip install vllm (a CUDA GPU is needed too), or set use_vllm: false to generate with "
            "transformers",
        )
    hw = hw or hardware.detect()
    if hw.device != "cuda":
        raise LoratoolError(
            f"{key}: vLLM generates on a CUDA GPU, and this machine has none",
            hint="set use_vllm: false: transformers' generate runs on the CPU (slower)",
        )


def build_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """Every prompt row read and checked against the rewards' columns (data/prompts.py)."""
    return build_prompt_datasets(
        recipe.data,
        tokenizer,
        seed=recipe.training.seed,
        rewards=section(recipe).rewards,
        section=recipe.stage,
    )


def record(recipe: Recipe) -> dict[str, Any]:
    """What run.json says about the method: its settings, the rewards and the reference model."""
    rl = section(recipe)
    init = rl.init_adapter
    settings = {name: getattr(rl, name) for name in (*SHARED_SETTINGS, *OWN_SETTINGS[recipe.stage])}
    return {
        "stage": recipe.stage,
        recipe.stage: {
            **settings,
            "rewards": [
                {"name": r.logged_name(), "kind": r.kind, "weight": r.weight, "setting": getattr(r, r.kind)}
                for r in rl.rewards
            ],
            "reference": reference_description(recipe) if rl.beta else None,
            "init_adapter": str(Path(init).expanduser().resolve()) if init else None,
        },
    }


def build_config(
    recipe: Recipe,
    *,
    checkpoints_dir: Path,
    has_validation: bool,
    bf16: bool,
    fp16: bool,
    train_lengths: Any = None,
) -> GRPOConfig | RLOOConfig:
    """The trainer's arguments (`train_lengths` is for packing, which generated batches do not use)."""
    rl = section(recipe)
    config_class, _ = TRAINERS[recipe.stage]
    fields = trainer_fields(
        recipe.training, checkpoints_dir=checkpoints_dir, has_validation=has_validation, bf16=bf16, fp16=fp16
    )
    # trl turns checkpointing off to generate and back on for every layer, with these kwargs handed to
    # torch's checkpoint as they are (as for DPO, dpo.py): every n-th layer becomes every layer here.
    kwargs = {
        k: v
        for k, v in (fields.get("activation_checkpointing_kwargs") or {}).items()
        if k != "every_n_layers"
    }
    fields["activation_checkpointing_kwargs"] = kwargs or None
    settings = {name: getattr(rl, name) for name in (*SHARED_SETTINGS, *OWN_SETTINGS[recipe.stage])}
    return make_config(
        config_class,
        recipe.training,
        **fields,
        **settings,
        reward_weights=[r.weight for r in rl.rewards],
        # The evaluation samples as many completions per prompt as training: its rewards are comparable.
        num_generations_eval=rl.num_generations,
        remove_unused_columns=False,  # the rewards read the `columns` column
        shuffle_dataset=True,  # trl's sampler shuffles prompts with training.seed, the same on every process
        log_completions=False,  # a table printed and written under checkpoints/ at every log
    )


def prepare_model(
    model: PeftModel, recipe: Recipe, base_fingerprint: str | None, log: Callable[[str], None]
) -> None:
    """Start from the adapter of `init_adapter`, if set (before trl copies it into its reference)."""
    load_init_adapter(model, recipe, base_fingerprint, log)


def build_trainer(
    model: PeftModel,
    recipe: Recipe,
    *,
    args: GRPOConfig | RLOOConfig,
    data: PreparedData,
    tokenizer: Any,
    callbacks: list[Any],
    optimizer: Any,
    num_processes: int,
) -> Any:
    """The GRPO or RLOO trainer on the prompts, with the recipe's rewards (the reference model as the
    module docstring says)."""
    _, trainer_class = TRAINERS[recipe.stage]
    rewards = load_rewards(section(recipe).rewards, recipe.stage)
    stop_at_end_of_turn(model, tokenizer)
    try:
        trainer = trainer_class(
            model=model,
            reward_funcs=trl_reward_funcs(rewards, COLUMNS),
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    except (ValueError, ImportError, NotImplementedError, TypeError) as exc:
        raise LoratoolError(
            f"trl's {trainer_class.__name__} refused this setup: {exc}",
            hint=f"check the {recipe.stage} and training sections",
        ) from None
    drop_unneeded_reference(trainer.model, recipe)
    return trainer


def stop_at_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Generation stops at the chat template's end of turn as well as at EOS: trl stops a completion at the
    generation config's eos_token_id (and the tokenizer's EOS), and a base whose generation config lacks
    the end of turn would run every completion on to max_completion_length, into a made-up next turn."""
    end = end_of_turn(tokenizer)
    if end is None or end.token_id is None:
        return
    eos = model.generation_config.eos_token_id
    stop = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if end.token_id not in stop:
        model.generation_config.eos_token_id = [*stop, end.token_id]


def before_save(model: PeftModel) -> None:
    """The run saves the trained adapter only, not trl's reference copy."""
    drop_reference_adapter(model)
