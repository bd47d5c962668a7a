"""Adapter initializations beyond B = 0 (`lora.init_lora_weights`): those computed from the training data
(EVA, CorDA), and those that move part of the base weights into the adapter (PiSSA, OLoRA, CorDA, LoftQ).

Base-changing inits train on a changed base: PiSSA, for example, starts from W_res = W - B0 @ A0, so the
trained adapter (B, A) only makes sense on W_res, which nobody else has. At save time PEFT's conversion
(`save_pretrained(path_initial_model_for_weight_conversion=...)`) rewrites it as a plain LoRA adapter on
the ORIGINAL base: delta W = B @ A - B0 @ A0 = [B | -B0] @ [A ; A0], rank 2r (lora_alpha doubles too, so
the scale is unchanged). It needs the adapter as initialized (B0, A0), written before the first step to
checkpoints/initial_adapter. Checkpoints keep the unconverted adapter: --resume re-initializes the same
W_res (checked against that saved copy) and continues from them; only the final adapter is converted.

LoftQ is not converted: its base is W quantized and dequantized (Q), and W - Q - B0 @ A0 is not zero, so
no adapter on the original base reproduces the trained model. The record says so and merge refuses it.

Data-driven inits run a calibration pass over the first `lora.init_calibration_batches` batches of the
training data before training: EVA (on the adapted model; the base is unchanged, ranks are redistributed
across layers) and CorDA (on the base, before the adapter is attached).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter.files import ADAPTER_CONFIG, update_adapter_config
from loratool.errors import LoratoolError
from loratool.recipe.rules import CONVERTED, init_method

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

    from loratool.recipe import LoraSection

INITIAL_ADAPTER = "initial_adapter"  # under checkpoints/: the adapter before the first step
CALIBRATED = ("eva", "corda")


def check_runs_here(lora: LoraSection) -> None:
    """Refuse an init this machine cannot compute (before PEFT fails somewhere inside it)."""
    import torch

    if init_method(lora) == "loftq" and not torch.cuda.is_available():
        raise LoratoolError(
            "lora.init_lora_weights: PEFT computes the loftq init on a CUDA GPU only, and this machine has none",
            hint="train on a GPU, or use pissa / olora (converted to plain LoRA at save) on this machine",
        )


# --- calibration (EVA, CorDA) ----------------------------------------------------------------------------


def calibration_data(
    lora: LoraSection, dataset: Any, tokenizer: Any, *, batch_size: int, device: Any
) -> list[dict[str, Any]] | None:
    """The calibration batches the recipe's init needs, or None when it needs none."""
    if init_method(lora) not in CALIBRATED:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return calibration_batches(
        dataset,
        batches=lora.init_calibration_batches,
        batch_size=batch_size,
        pad_token_id=pad,
        device=device,
    )


def shapes_only(lora: LoraSection) -> LoraSection:
    """The same adapter with PEFT's default init: what `train --dry-run` attaches to a weightless model
    (no data pass, no decomposition of weights that are not there)."""
    if isinstance(lora.init_lora_weights, bool):
        return lora
    return lora.model_copy(update={"init_lora_weights": True})


def calibration_batches(
    dataset: Any, *, batches: int, batch_size: int, pad_token_id: int, device: Any
) -> list[dict[str, Any]]:
    """The first `batches` batches of the training rows, padded on the right, with labels (-100 where
    there is no loss, which EVA leaves out of its statistics)."""
    import torch

    rows = min(len(dataset), batches * batch_size)
    if rows == 0:
        raise LoratoolError(
            "lora.init_lora_weights: the calibration pass has no training rows to run on",
            hint="check data.train",
        )
    out = []
    for start in range(0, rows, batch_size):
        chunk = dataset.select(range(start, min(start + batch_size, rows)))
        width = max(len(ids) for ids in chunk["input_ids"])
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(chunk["input_ids"], chunk["labels"], strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        out.append(
            {
                "input_ids": input_ids.to(device),
                "attention_mask": mask.to(device),
                "labels": labels.to(device),
            }
        )
    return out


def calibrate_base(
    model: PreTrainedModel,
    config: LoraConfig,
    batches: list[dict[str, Any]] | None,
    log: Callable[[str], None],
) -> LoraConfig:
    """CorDA: collect the layer-input covariances on the base, before the adapter is attached. Returns the
    config to attach with (`all-linear` resolved to module names, which CorDA's pass needs)."""
    if getattr(config, "init_lora_weights", True) != "corda":
        return config
    import torch
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    batches = _require(batches, "corda")
    config = _maybe_include_all_linear_layers(config, model)
    log(f"CorDA: calibrating on {len(batches)} batches of the training data ...")

    def run_model() -> None:
        # CorDA's hooks take one unpadded row per forward pass (they squeeze the batch dimension).
        with torch.no_grad():
            for batch in batches:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    model(input_ids=ids[mask.bool()].unsqueeze(0))

    was_training = model.training
    model.eval()
    try:
        preprocess_corda(model, config, run_model=run_model)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise _calibration_error("CorDA", exc) from None
    finally:
        model.train(was_training)
    return config


def calibrate_adapter(
    model: PeftModel, batches: list[dict[str, Any]] | None, log: Callable[[str], None]
) -> None:
    """EVA: initialize A from the SVD of each layer's inputs on the training data (ranks redistributed)."""
    if getattr(model.peft_config["default"], "init_lora_weights", True) != "eva":
        return
    from peft import initialize_lora_eva_weights

    config = model.peft_config["default"]
    batches = _eva_batches(_require(batches, "eva"), config)
    log(f"EVA: calibrating on {len(batches)} batches of the training data ...")
    was_training = model.training
    model.eval()
    try:
        # Every process reads the same rows: gathering them across processes would only repeat them.
        initialize_lora_eva_weights(
            model, dataloader=batches, gather_distributed_inputs=False, show_progress_bar=False
        )
    except (ValueError, RuntimeError, TypeError) as exc:
        raise _calibration_error("EVA", exc) from None
    finally:
        model.train(was_training)


def _eva_batches(batches: list[dict[str, Any]], config: LoraConfig) -> list[dict[str, Any]]:
    """The batches EVA can use. Its incremental SVD skips a batch with fewer tokens (answer tokens, with
    its label mask) than components (rank * rho), and cycles over the batches until every layer has
    converged: with no batch large enough it would cycle forever."""
    eva = config.eva_config
    components = round(max([config.r, *config.rank_pattern.values()]) * eva.rho)

    def tokens(batch: dict[str, Any]) -> int:
        used = batch["attention_mask"].bool()
        if eva.use_label_mask:
            used &= batch["labels"] != eva.label_mask_value
        return int(used.sum())

    usable = [b for b in batches if tokens(b) >= components]
    if not usable:
        most = max(tokens(b) for b in batches)
        raise LoratoolError(
            f"lora.init_lora_weights: eva needs batches of at least {components} answer tokens (r x "
            f"eva_config.rho), and the largest calibration batch has {most}",
            hint="raise training.per_device_train_batch_size, lower lora.r or eva_config.rho, or set "
            "eva_config: {use_label_mask: false} to count prompt tokens too",
        )
    return usable


def _require(batches: list[dict[str, Any]] | None, method: str) -> list[dict[str, Any]]:
    if batches is None:
        raise LoratoolError(
            f"lora.init_lora_weights: {method} needs a calibration pass on the training data, and none was "
            "given here",
            hint="train with the recipe (loratool train), which runs it before training",
        )
    return batches


def _calibration_error(method: str, exc: BaseException) -> LoratoolError:
    return LoratoolError(
        f"lora.init_lora_weights: the {method} calibration pass failed: {type(exc).__name__}: {exc}",
        hint="use more or longer rows (lora.init_calibration_batches, data.max_length), or another init "
        "(true, pissa, olora); loratool never falls back to another init on its own",
    )


# --- the initial adapter, saving, the record -------------------------------------------------------------


def keep_initial_adapter(model: PeftModel, checkpoints_dir: Path, log: Callable[[str], None]) -> Path | None:
    """Save the adapter as initialized (a fresh run), or check that the re-initialized one equals the
    saved copy (--resume: the checkpoints only fit the changed base that copy describes). None when the
    init needs no conversion."""
    import torch
    from safetensors.torch import load_file

    init = getattr(model.peft_config["default"], "init_lora_weights", True)
    if not (isinstance(init, str) and (init.startswith("pissa") or init in CONVERTED)):
        return None
    # PEFT's conversion keeps only lora_A / lora_B: anything else that trains would vanish from the
    # saved adapter (embedding adapters, DoRA magnitudes, biases, saved modules). Refuse before step 1.
    lost = sorted(
        name.removeprefix("base_model.model.")
        for name, param in model.named_parameters()
        if param.requires_grad and ".lora_A." not in name and ".lora_B." not in name
    )
    if lost:
        raise LoratoolError(
            f"lora.init_lora_weights: {init} is converted to a plain LoRA adapter at save time, which keeps "
            f"only lora_A / lora_B weights; these would be lost: {', '.join(lost[:4])}"
            + (f" and {len(lost) - 4} more" if len(lost) > 4 else ""),
            hint="leave embedding layers out of lora.target_modules and drop use_dora, bias and "
            "modules_to_save, or use init_lora_weights: true",
        )
    path = checkpoints_dir / INITIAL_ADAPTER
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        saved = load_file(weights)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            fresh = load_file(Path(tmp) / "adapter_model.safetensors")
        same = saved.keys() == fresh.keys() and all(
            torch.allclose(saved[k].float(), fresh[k].float(), atol=1e-5, rtol=1e-4) for k in saved
        )
        if not same:
            raise LoratoolError(
                f"--resume: the {init} initialization differs from the one this run started with ({path}); "
                "its checkpoints only fit the base as that initialization changed it",
                hint="resume on the same base, data and hardware, or train again with --overwrite",
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    log(f"{init}: initial adapter saved to {path} (to convert the final adapter to plain LoRA)")
    return path


def save_adapter(model: PeftModel, folder: Path, state_dict: Any, initial: Path | None) -> None:
    """The final adapter: PEFT's save, converted to a plain LoRA adapter on the original base when the
    init changed the base (`initial`: the adapter before training, see keep_initial_adapter)."""
    if initial is None:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    import warnings

    # PEFT rewrites the initial adapter's config in place before loading it: convert from a copy. Loading
    # it warns that the init "changes the base weights ... consider converting": this is that conversion.
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(PiSSA|CorDA|OLoRA) changes the base weights")
        warnings.filterwarnings("ignore", message=r"`corda_config` specified but will be ignored")
        copy = Path(tmp) / INITIAL_ADAPTER
        shutil.copytree(initial, copy)
        model.save_pretrained(
            folder, state_dict=state_dict, path_initial_model_for_weight_conversion=str(copy)
        )
    # PEFT keeps corda_config in the converted (plain, init_lora_weights: true) config, and then warns at
    # every load that it is ignored.
    if json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("corda_config") is not None:
        update_adapter_config(folder, corda_config=None)


def init_record(lora: LoraSection, model: PeftModel) -> dict[str, Any] | None:
    """run.json's `adapter_init`: which init, whether the adapter was converted, the saved rank."""
    method = init_method(lora)
    if method is None:
        return None
    record: dict[str, Any] = {"method": method, "init_lora_weights": lora.init_lora_weights}
    if method in CONVERTED:
        record |= {"converted_to_plain_lora": True, "trained_rank": lora.r, "rank": 2 * lora.r}
    elif method == "loftq":
        record |= {
            "converted_to_plain_lora": False,
            "mergeable": False,
            "reason": "LoftQ trains on its own quantized copy of the base, which is not saved; no plain LoRA "
            "adapter on the original base reproduces it",
            "rank": lora.r,
        }
    else:
        record |= {"converted_to_plain_lora": False, "rank": lora.r}
    if method in CALIBRATED:
        record["calibration_batches"] = lora.init_calibration_batches
    if method == "eva":
        ranks = model.peft_config["default"].rank_pattern or {}
        if ranks:
            record["rank_per_layer"] = {"min": min(ranks.values()), "max": max(ranks.values())}
    return record


def describe(record: dict[str, Any] | None) -> str | None:
    """One line for the model card."""
    if not record:
        return None
    method = record.get("method")
    if record.get("converted_to_plain_lora"):
        return (
            f"Initialized with {method}; converted at save time into a plain LoRA adapter of rank "
            f"{record.get('rank')} on the original base (trained at rank {record.get('trained_rank')})."
        )
    if record.get("mergeable") is False:
        return f"Initialized with {method}: {record.get('reason')}; it cannot be merged."
    return f"Initialized with {method} (a plain LoRA adapter on the unchanged base)."


def refuse_unmergeable(record: dict[str, Any] | None, adapter_dir: Path) -> None:
    """merge: refuse an adapter whose run says it cannot be merged into the original base."""
    if record and record.get("mergeable") is False:
        raise LoratoolError(
            f"{adapter_dir}: trained with {record.get('method')} init, which cannot be merged: "
            f"{record.get('reason')}",
            hint="train with init_lora_weights: pissa or olora (converted to plain LoRA at save), or true",
        )
