"""`loratool train RECIPE --smoke`: the whole recipe, end to end, on a small random model, in about a minute.

Everything the recipe says is kept — architecture, tokenizer, chat template, data pipeline, LoRA targets,
quantization (bitsandbytes runs on CPUs too), optimizer, schedule — except what makes a run expensive:

- the base becomes a random model of the same architecture, built from the base's config alone (few
  layers, narrow; the vocabulary stays, so the real tokenizer and template are used): no weights are
  downloaded, only the config and tokenizer of a hub id;
- a few steps on a few rows, a short max_length and a small batch.

Then the adapter is merged (and the merge verified) and, where the architecture exports to GGUF, exported
(and the export verified). Every output is marked as a smoke run — run.json's `smoke` record and a banner
on the adapter's model card — so it can never be mistaken for a real adapter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.export import run_export
from loratool.export.gguf import ARCHITECTURES
from loratool.merge import run_merge
from loratool.model.cache import cache_root
from loratool.model.checkpoint import read_config
from loratool.model.gguf_base import resolve_base_model
from loratool.model.load import load_tokenizer
from loratool.recipe import Recipe, recipe_to_dict, validate_recipe

# The small model: the base's config with these sizes. 2 layers keep every layer type that alternates
# (sliding / full attention) present; 4 query heads over 2 key-value heads keep grouped-query attention.
SMOKE_SIZES = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
SMOKE_STEPS = 4
SMOKE_ROWS = 32  # per data source
SMOKE_MAX_LENGTH = 256  # tokens: the logits of a 150k vocabulary at 2 x 2048 tokens would take 2.5 GB
SMOKE_BATCH = 2
SMOKE_SUFFIX = "-smoke"


def smoke_recipe(recipe: Recipe, base_dir: Path) -> tuple[Recipe, list[str]]:
    """The recipe as a smoke run trains it, and one line per value changed."""
    raw = recipe_to_dict(recipe)
    changes: list[str] = []

    def change(section: dict[str, Any], key: str, value: Any, where: str) -> None:
        if section.get(key) != value:
            changes.append(f"{where}.{key}: {section.get(key)!r} -> {value!r}")
            section[key] = value

    raw["base_model"] = str(base_dir)
    changes.append(
        f"base_model: {recipe.base_model} -> a random {SMOKE_SIZES['num_hidden_layers']}-layer copy"
    )
    change(raw["model"], "revision", None, "model")
    change(raw["model"], "tokenizer", None, "model")  # saved with the small base
    data, training = raw["data"], raw["training"]
    for split in ("train", "validation"):
        for source in data[split] if isinstance(data.get(split), list) else []:
            change(
                source, "max_rows", min(source.get("max_rows") or SMOKE_ROWS, SMOKE_ROWS), f"data.{split}.N"
            )
    change(data, "max_length", min(data["max_length"], SMOKE_MAX_LENGTH), "data")
    change(training, "output_dir", smoke_output_dir(recipe.training.output_dir), "training")
    change(training, "max_steps", SMOKE_STEPS, "training")
    change(
        training,
        "per_device_train_batch_size",
        min(training["per_device_train_batch_size"], SMOKE_BATCH),
        "training",
    )
    change(
        training,
        "per_device_eval_batch_size",
        min(training["per_device_eval_batch_size"], SMOKE_BATCH),
        "training",
    )
    change(training, "gradient_accumulation_steps", 1, "training")
    change(training, "logging_steps", 1, "training")
    if training.get("eval_steps") is not None:
        change(training, "eval_steps", SMOKE_STEPS // 2, "training")
    if training.get("save_steps") is not None:
        change(training, "save_steps", SMOKE_STEPS // 2, "training")
    for method in ("grpo", "rloo"):  # online RL: a batch holds whole groups of completions
        if isinstance(raw.get(method), dict):
            online = raw[method]
            change(online, "num_generations", 2, method)
            change(
                online, "max_completion_length", min(online.get("max_completion_length") or 16, 16), method
            )
            change(training, "per_device_train_batch_size", 2, "training")
    change(training, "early_stopping_patience", None, "training")
    change(training, "report_to", "none", "training")  # no tracker entry for a throwaway run
    return validate_recipe(raw, source="the smoke recipe"), changes


def smoke_output_dir(output_dir: str) -> str:
    return (
        output_dir if output_dir.rstrip("/").endswith(SMOKE_SUFFIX) else output_dir.rstrip("/") + SMOKE_SUFFIX
    )


def build_smoke_base(recipe: Recipe, folder: Path, log: Callable[[str], None]) -> Path:
    """A random model of the base's architecture (config and tokenizer only, no weights), in `folder`,
    reused when the same config was built before."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    source = resolve_base_model(recipe.base_model, log)
    try:
        config = AutoConfig.from_pretrained(
            source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise LoratoolError(
            f"--smoke: cannot read the config of {recipe.base_model}: {exc}", hint=_config_hint(exc, source)
        ) from None
    tokenizer = load_tokenizer(recipe.base_model, recipe.model, log)
    shrink(config)
    key = hashlib.sha256(
        json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
        + tokenizer.name_or_path.encode()
        + str(len(tokenizer)).encode()
    ).hexdigest()[:16]
    target = folder / key
    if (target / "config.json").is_file():
        return target
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    try:
        model.generation_config = GenerationConfig.from_pretrained(source, revision=recipe.model.revision)
    except OSError:
        pass  # no generation_config.json: the model's defaults
    partial = folder / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"smoke base: a random {config.model_type} with {parameters:,} parameters in {target}")
    return target


def _config_hint(exc: BaseException, source: str) -> str:
    """What to do when the base's config cannot be read: an architecture this transformers does not know
    is not a network problem, and neither is a local directory."""
    import transformers

    if (
        isinstance(exc, KeyError)
        or "does not recognize this architecture" in str(exc)
        or "model_type" in str(exc)
    ):
        return (
            f"transformers {transformers.__version__} does not know this architecture: upgrade it "
            "(pip install -U 'transformers<6'), or set model.trust_remote_code: true if the model ships its "
            "own code and you trust it"
        )
    if Path(source).expanduser().exists():
        return f"check that {source} holds a readable config.json"
    return "a hub id needs the network (or the hub cache) for its config.json and tokenizer"


def shrink(config: Any) -> None:
    """Make `config` small in place: SMOKE_SIZES where the architecture has the field, per-layer lists cut
    to the new depth, mixture-of-experts kept (with narrow experts)."""
    layers = SMOKE_SIZES["num_hidden_layers"]
    for name, value in SMOKE_SIZES.items():
        if name == "head_dim" and getattr(config, "head_dim", None) is None:
            continue
        if name == "num_key_value_heads" and getattr(config, "num_key_value_heads", None) in (
            None,
            getattr(config, "num_attention_heads", None),
        ):
            value = SMOKE_SIZES["num_attention_heads"]  # multi-head attention stays multi-head
        if hasattr(config, name) or name in getattr(config, "attribute_map", {}):
            setattr(config, name, value)
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(config, name, None):
            setattr(config, name, SMOKE_SIZES["intermediate_size"])
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    for name in ("max_window_layers",):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, min(getattr(config, name), layers))
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    if hasattr(config, "torch_dtype"):
        config.torch_dtype = "float32"


def run_smoke(recipe: Recipe, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the smoke version of `recipe`, merge it, export it where the architecture exports, verify
    each; return what was done (also printed)."""
    import time

    from loratool.train.run import run_train  # deferred: training loads torch and transformers

    started = time.time()
    base_dir = build_smoke_base(recipe, cache_root() / "smoke", log)
    smoke, changes = smoke_recipe(recipe, base_dir)
    log("smoke run: the recipe as written, except:")
    for line in changes:
        log(f"  {line}")
    record = {"of_base_model": recipe.base_model, "changes": changes}
    run_dir = run_train(smoke, overwrite=True, log=log, smoke=record)
    merged = run_merge(run_dir, output=Path(f"{run_dir}-merged"), overwrite=True, log=log)
    model_type = read_config(base_dir)["model_type"]
    exported = None
    if recipe.reward is not None:  # llama.cpp runs language models; a score head has no GGUF equivalent
        log("export: skipped (a reward model: GGUF holds language models)")
    elif model_type in ARCHITECTURES:
        # From the merged checkpoint: exporting the run directory would merge the adapter a second time.
        exported = run_export(merged, output=Path(f"{run_dir}-gguf"), outtype="f32", overwrite=True, log=log)
    else:
        log(f"export: skipped ({model_type} is not an architecture loratool exports to GGUF)")
    outcome = {
        "run": str(run_dir),
        "merged": str(merged),
        "exported": str(exported) if exported else None,
        "seconds": round(time.time() - started, 1),
    }
    log(
        f"smoke run passed in {outcome['seconds']:.0f}s: trained {run_dir}, merged {merged}"
        + (f", exported {exported}" if exported else "")
        + " (all marked as a smoke run; not a real adapter)"
    )
    return outcome
