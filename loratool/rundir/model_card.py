"""What makes a run directory shareable: a model card (README.md), an adapter_config.json that names the
real base, and a check that vLLM's LoRA loader will take the adapter.

PEFT's `save_pretrained` writes a README.md template full of "[More Information Needed]" and records as
`base_model_name_or_path` whatever path the base was loaded from — for a .gguf base, a conversion in the
local cache that nobody else has. `finish_adapter_dir` replaces both from the run's record; `loratool eval`
calls `write_model_card` again to add its numbers. A .gguf base is named by the hub id it was converted
from (the recipe's model.gguf_source, else the file's metadata: run.json gguf.hub_id), else by its file
name and sha256 — never by a path on this machine; run.json keeps the local paths.

The vLLM check reads only adapter_config.json and the tensor names, with the rules vLLM's LoRA loader
applies (vllm/lora/peft_helper.py, worker_manager): no DoRA, no bias, no modules_to_save, rank within
`--max-lora-rank` (one of 1, 8, 16, ..., 512), one lora_alpha / r scaling for every module. vLLM need not be
installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loratool.adapter.inits import describe as describe_init
from loratool.rundir.outputs import read_json, write_json_atomic
from loratool.rundir.records import BaseModelRecord, RunRecord

CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
# vLLM's --max-lora-rank accepts these values only; its default is 16.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
# Under this many optimizer steps or trained tokens the card says the run was short (a narrow task, or a smoke test).
SMOKE_STEPS = 100
SMOKE_TOKENS = 100_000


def base_name(base: BaseModelRecord, recipe: dict[str, Any] | None = None) -> str:
    """How someone else finds the base: its hub id (or local path) as the recipe named it; a .gguf base by
    the hub id it was converted from, else by its file name (the sha256 goes next to it in the card)."""
    if base.gguf is not None:
        return gguf_source(base, recipe) or gguf_file_name(base)
    return str(base.id or base.resolved_path or "unknown")


def gguf_source(base: BaseModelRecord, recipe: dict[str, Any] | None) -> str | None:
    """The hub id a .gguf base was converted from: the recipe's model.gguf_source, else the file's metadata."""
    given = ((recipe or {}).get("model") or {}).get("gguf_source")
    return str(given or (base.gguf or {}).get("hub_id") or "") or None


def gguf_file_name(base: BaseModelRecord) -> str:
    return Path(str((base.gguf or {}).get("file") or base.id or "base.gguf")).name


def finish_adapter_dir(folder: Path, recipe: dict[str, Any], run: RunRecord) -> None:
    """Name the real base in adapter_config.json and write the model card (train, on the staging folder,
    with the run.json it is building)."""
    config_path = folder / ADAPTER_CONFIG
    if config_path.is_file():
        config = read_json(config_path)
        config["base_model_name_or_path"] = base_name(run.base_model, recipe)
        write_json_atomic(config_path, config)
    write_model_card(folder, recipe, run)


def write_model_card(
    folder: Path,
    recipe: dict[str, Any] | None,
    run: RunRecord,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """README.md in `folder`: what the adapter is, how it was made, how well it did, how to load it."""
    path = folder / CARD
    path.write_text(model_card(folder, recipe or {}, run, evaluation), encoding="utf-8")
    return path


def is_smoke(run: RunRecord) -> bool:
    steps, tokens = run.train.get("global_step"), run.train.get("tokens_trained")
    return (isinstance(steps, int) and steps < SMOKE_STEPS) or (
        isinstance(tokens, int) and tokens < SMOKE_TOKENS
    )


def model_card(
    folder: Path, recipe: dict[str, Any], run: RunRecord, evaluation: dict[str, Any] | None = None
) -> str:
    """The card's text, one section after the other. `recipe` is the resolved recipe as a dict (recipe.yaml)."""
    output_dir = (recipe.get("training") or {}).get("output_dir")
    name = Path(output_dir).name if output_dir else folder.name  # train writes into a staging folder
    base_ref = base_name(run.base_model, recipe)
    gguf = run.base_model.gguf
    if gguf:
        hub_base = gguf_source(run.base_model, recipe)
        gguf = {**gguf, "name": gguf_file_name(run.base_model), "hub_id": hub_base}
    else:
        hub_base = None if _looks_local(base_ref) else base_ref
    lora = recipe.get("lora") or {}
    config = _adapter_config(folder)

    lines = _introduction(name, base_ref, hub_base, run, gguf)
    lines += _data_section(run.data)
    lines += _training_section(lora, recipe.get("training") or {}, run, config)
    if run.adalora is not None:
        lines += _adalora_ranks(run.adalora)
    lines += _results_section(run.train, evaluation)
    if run.stage == "reward":
        lines += _reward_use_section(name, hub_base or base_ref)
    else:
        lines += _use_section(folder, name, hub_base or base_ref, gguf, lora, config)
    return "\n".join(lines)


def _introduction(
    name: str, base_ref: str, hub_base: str | None, run: RunRecord, gguf: dict[str, Any] | None
) -> list[str]:
    """The YAML metadata the Hub reads, the title, what the adapter is, and a warning for a short run."""
    lines = ["---", "library_name: peft", "tags: [lora, loratool]"]
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += ["---", "", f"# {name}", ""]
    lines.append(f"A LoRA adapter for **{base_ref}**, trained with loratool.")
    if gguf:
        lines.append(
            f"It was trained on the GGUF file `{gguf['name']}` (sha256 `{gguf.get('sha256')}`)"
            + (
                f", converted from {gguf['hub_id']}: its dequantized weights differ from the hub "
                "checkpoint's by the file's quantization error."
                if gguf.get("hub_id")
                else "."
            )
        )
    if run.base_model.quantization:
        lines.append(f"Trained on the {run.base_model.quantization}-quantized base (QLoRA).")
    if init_line := describe_init(run.adapter_init):
        lines.append(init_line)
    dpo = run.dpo if run.stage == "dpo" else None
    if dpo is not None:
        lines.append(
            f"Preference-tuned with DPO (loss {dpo.get('loss_type')}, beta {dpo.get('beta')}; reference: "
            f"{dpo.get('reference')}) on chosen / rejected answer pairs."
        )
    kto = run.kto if run.stage == "kto" else None
    if kto is not None:
        lines.append(
            f"Preference-tuned with KTO (loss {kto.get('loss_type')}, beta {kto.get('beta')}, weights "
            f"{kto.get('desirable_weight')} desirable / {kto.get('undesirable_weight')} undesirable; "
            f"reference: {kto.get('reference')}) on completions judged desirable or undesirable."
        )
    if run.stage == "reward":
        lines.append(
            "A **reward model**: the base with a one-number score head, trained with this adapter on "
            "chosen / rejected answer pairs to score the chosen answer higher. The head is saved with the "
            "adapter (`modules_to_save`)."
        )
    if (line := online_rl_line(run)) is not None:
        lines.append(line)
    lines.append("")
    if is_smoke(run) and not run.smoke:  # a --smoke run gets its own banner (mark_smoke_run)
        train = run.train
        size = f"{train.get('global_step')} optimizer steps" + (
            f", {train['tokens_trained']:,} tokens" if isinstance(train.get("tokens_trained"), int) else ""
        )
        lines += [
            f"> **Short run**: {size}. That can be enough for a narrow task, or only a smoke test of the "
            "pipeline: check its evaluation before relying on it.",
            "",
        ]
    return lines


def _data_section(data: dict[str, Any]) -> list[str]:
    """Rows and tokens of each split and where they came from (run.json "data", data/summary.py)."""
    lines = ["## Data", ""]
    for split in ("train", "validation"):
        summary = data.get(split)
        if not isinstance(summary, dict):
            continue
        origin = f" ({summary['origin']})" if summary.get("origin") else ""
        lines.append(
            f"- {split}: {summary.get('rows', 0):,} rows, {summary.get('tokens', 0):,} tokens{origin}"
        )
        if not summary.get("origin"):
            for source in summary.get("sources") or []:
                lines.append(
                    f"  - `{source.get('path')}` ({source.get('format')}): {source.get('rows_used', 0):,} of "
                    f"{source.get('rows_read', 0):,} rows used"
                )
    if data.get("chat_template"):
        lines.append(f"- chat template: {data['chat_template']} (saved with the tokenizer in this directory)")
    return [*lines, ""]


def _training_section(
    lora: dict[str, Any], training: dict[str, Any], run: RunRecord, config: dict[str, Any]
) -> list[str]:
    """The settings that shape the adapter, as a table (a setting without a value is left out)."""
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    for key, value in (
        ("LoRA rank r / alpha", f"{_round(lora.get('r'))} / {_round(lora.get('lora_alpha'))}"),
        ("target modules", _target_modules(lora.get("target_modules"), config.get("target_modules"))),
        ("dropout", lora.get("lora_dropout")),
        ("learning rate", training.get("learning_rate")),
        ("optimizer steps", run.train.get("global_step")),
        ("epochs", _round(run.train.get("epochs"))),
        ("effective batch size", run.effective_batch_size),
        ("max length", run.data.get("max_length")),
        ("seed", training.get("seed")),
    ):
        if value not in (None, "None / None"):
            lines.append(f"| {key} | {value} |")
    return [*lines, ""]


def _results_section(train: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    """The final losses, and what `loratool eval` measured when it has run."""
    lines = ["## Results", ""]
    if train.get("train_loss") is not None:
        lines.append(f"- final train loss: {_round(train['train_loss'])}")
    if train.get("final_eval_loss") is not None:
        lines.append(f"- final validation loss: {_round(train['final_eval_loss'])}")
    for key, value in (evaluation or {}).items():
        lines.append(f"- {key}: {value}")
    return [*lines, "- the loss curve: `loss_curve.png`; every step: `metrics.jsonl`", ""]


def _use_section(
    folder: Path,
    name: str,
    load_base: str,
    gguf: dict[str, Any] | None,
    lora: dict[str, Any],
    config: dict[str, Any],
) -> list[str]:
    """How to load it with PEFT, serve it with vLLM (or why vLLM would refuse it), and run it in llama.cpp.
    A .gguf base without a known hub id is loaded from the file, next to the adapter (`./FILE.gguf`)."""
    from_file = bool(gguf) and not gguf.get("hub_id")
    lines = ["## Use", "", "With PEFT:", "", "```python"]
    if from_file:
        assert gguf is not None
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf["name"]}")  # dequantized',
            f'model = PeftModel.from_pretrained(base, "{name}")',
        ]
    else:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # loads {load_base} + this adapter',
        ]
    lines += [
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # the chat template it was trained with',
        "```",
        "",
    ]
    if gguf:
        lines += [
            f"The weights it was trained on are the GGUF file `{gguf['name']}` (sha256 `{gguf.get('sha256')}`)"
            + (
                ": put it in the current directory for the commands here."
                if from_file
                else f'; to load exactly those: `AutoModelForCausalLM.from_pretrained(DIR, gguf_file="'
                f'{gguf["name"]}")` with the file in DIR, then `PeftModel.from_pretrained(base, "{name}")`.'
            ),
            "",
        ]
    # A merge on another machine finds the base by the GGUF file itself (run.json's paths are this one's).
    base_flag = f" --base ./{gguf['name']}" if gguf else ""
    lines += ["With vLLM:", "", "```sh"]
    rank = config.get("r") if isinstance(config.get("r"), int) else lora.get("r")
    max_rank = next((r for r in VLLM_RANKS if isinstance(rank, int) and r >= rank), None)
    rank_flag = f" --max-lora-rank {max_rank}" if max_rank and max_rank > VLLM_DEFAULT_MAX_RANK else ""
    if from_file:  # vLLM takes a LoRA on a Hugging Face checkpoint: merge into the file's weights
        lines += [
            f"loratool merge --adapter {name}{base_flag} --output {name}-merged",
            f"vllm serve ./{name}-merged",
        ]
    else:
        lines.append(f"vllm serve {load_base} --enable-lora --lora-modules {name}=./{name}{rank_flag}")
    lines += ["```", ""]
    problems = vllm_problems(folder) if config and not from_file else []
    if problems:
        lines += ["vLLM's LoRA loader will refuse this adapter as it is:", ""]
        lines += [f"- {p}" for p in problems]
        lines += ["", "Serve the merged model instead (`loratool merge`).", ""]
    lines += [
        "With llama.cpp or Ollama: merge and export it, then run the GGUF file:",
        "",
        "```sh",
        f"loratool merge --adapter {name}{base_flag} --output {name}-merged",
        f"loratool export {name}-merged --format gguf --output {name}-gguf",
        "```",
        "",
        "Everything needed to train it again is in `recipe.yaml` (`loratool train recipe.yaml`); `run.json`",
        "records the versions, the base's fingerprint and the data's.",
        "",
    ]
    return lines


def online_rl_line(run: RunRecord) -> str | None:
    """What a GRPO or RLOO run did: completions per prompt, the rewards that scored them, the KL."""
    rl = run.grpo if run.stage == "grpo" else run.rloo if run.stage == "rloo" else None
    if rl is None:
        return None
    rewards = ", ".join(
        f"{r.get('name')}" + (f" x {r.get('weight')}" if r.get("weight") not in (None, 1, 1.0) else "")
        for r in rl.get("rewards") or []
    )
    beta = rl.get("beta")
    start = rl.get("init_adapter")
    return (
        f"Trained by online reinforcement learning ({run.stage.upper()}): {rl.get('num_generations')} "
        f"completions per prompt, up to {rl.get('max_completion_length')} tokens each, sampled at temperature "
        f"{rl.get('temperature')} and scored by {rewards or 'its rewards'}; "
        + (f"KL to the reference with beta {beta}" if beta else "no KL term (beta 0)")
        + (f"; started from the adapter of `{Path(start).name}`" if start else "")
        + "."
    )


def _reward_use_section(name: str, load_base: str) -> list[str]:
    """How to load a reward model with PEFT and score an answer."""
    return [
        "## Use",
        "",
        "With PEFT (the score head is read from the last token that is not padding):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # the chat template it was trained with',
        f'base = AutoModelForSequenceClassification.from_pretrained("{load_base}", num_labels=1)',
        "base.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id",
        f'model = PeftModel.from_pretrained(base, "{name}")  # the adapter and the trained head',
        'score = model(**tokenizer("prompt and answer", return_tensors="pt")).logits[0, 0]',
        "```",
        "",
        "`loratool eval` reports its pairwise accuracy on held-out pairs; `loratool merge` writes a checkpoint",
        "that loads with `AutoModelForSequenceClassification.from_pretrained(DIR)`. Everything needed to train",
        "it again is in `recipe.yaml` (`loratool train recipe.yaml`); `run.json` records the versions, the",
        "base's fingerprint and the data's.",
        "",
    ]


def _adalora_ranks(record: dict[str, Any]) -> list[str]:
    """AdaLoRA's final rank per layer (run.json "adalora"): one row per module, one column per block."""
    ranks = record.get("final_ranks") or {}
    budget = record.get("rank_budget") or {}
    lines = [
        "## AdaLoRA ranks",
        "",
        f"The rank budget went from {record.get('init_r')} per layer to {record.get('target_r')} on average "
        f"over {record.get('total_step')} optimizer steps: {budget.get('end')} of {budget.get('start')} "
        "ranks kept, where training found them most useful.",
        "",
    ]
    grid: dict[str, dict[str, int]] = {}
    for name, rank in ranks.items():
        layer = next(iter(_layer_index(name)), "-")
        grid.setdefault(name.rsplit(".", 1)[-1], {})[layer] = rank
    layers = sorted(
        {layer for row in grid.values() for layer in row}, key=lambda x: (not x.isdigit(), x.zfill(6))
    )
    lines += [
        "| module | " + " | ".join(f"block {layer}" for layer in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for module, row in grid.items():
        lines.append(f"| {module} | " + " | ".join(str(row.get(layer, "")) for layer in layers) + " |")
    return [*lines, ""]


def vllm_problems(folder: Path) -> list[str]:
    """Why vLLM's LoRA loader would refuse the adapter in `folder` (empty: it would load it)."""
    config = _adapter_config(folder)
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"it is a {config.get('peft_type')} adapter; vLLM serves LoRA only")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported by vLLM")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM loads LoRA adapters without bias terms")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save ({_modules(config['modules_to_save'])}): vLLM does not load trained copies of "
            "whole layers"
        )
    rank = config.get("r")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    top = max((r for r in ranks if isinstance(r, int)), default=None)
    if top is not None and top > VLLM_RANKS[-1]:
        problems.append(f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        problems.append("rank_pattern / alpha_pattern: vLLM scales every module by one lora_alpha / r")
    names = _tensor_names(folder)
    odd = sorted(
        {n for n in names if ".lora_A." not in n and ".lora_B." not in n and "lora_embedding" not in n}
    )
    if odd:
        problems.append(f"tensors vLLM does not expect in a LoRA adapter: {', '.join(odd[:4])}")
    return problems


def vllm_summary(folder: Path) -> list[str]:
    """Lines for `loratool export --format peft`: modules, rank, layers, and the verdict."""
    config = _adapter_config(folder)
    names = _tensor_names(folder)
    modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n})
    layers = sorted({int(part) for n in names for part in _layer_index(n)})
    lines = [
        f"vLLM: LoRA on {', '.join(modules) or 'no module'}, rank {config.get('r')}"
        + (f", layers {layers[0]}-{layers[-1]} ({len(layers)})" if layers else "")
    ]
    problems = vllm_problems(folder)
    lines += [f"vLLM will refuse it: {p}" for p in problems] or ["vLLM's LoRA loader will accept it"]
    return lines


def _layer_index(name: str) -> Iterable[str]:
    parts = name.split(".")
    for before, part in zip(parts, parts[1:], strict=False):
        if before in ("layers", "h", "blocks") and part.isdigit():
            yield part
            return


def _tensor_names(folder: Path) -> list[str]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _modules(value: Any) -> str:
    if isinstance(value, list | tuple | set):
        return ", ".join(sorted(map(str, value)))
    return str(value)


def _round(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return round(value, 4) if isinstance(value, float) else value


def _target_modules(asked: Any, saved: Any) -> str:
    """The recipe's choice (e.g. all-linear) and the layer names it matched, without layer numbers."""
    leaves = sorted({str(m).rsplit(".", 1)[-1] for m in saved}) if isinstance(saved, list | tuple) else []
    shown = ", ".join(leaves) if leaves else _modules(saved)
    if isinstance(asked, str) and asked != shown:
        return f"{asked} ({shown})" if shown and shown != "None" else asked
    return shown


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


# --- a smoke run's card (`train --smoke`) ---

SMOKE_BANNER = (
    "> **SMOKE RUN — not a real adapter.** Trained by `loratool train --smoke` on a small random model "
    "of the base's architecture, for a few steps, to check the recipe end to end. Do not use it.\n\n"
)


def mark_smoke_run(card: Path) -> None:
    """Put the smoke-run banner on top of the adapter's model card."""
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    head = ""
    if text.startswith("---\n") and "\n---\n" in text[4:]:  # YAML metadata must stay at the top
        end = text.index("\n---\n", 4) + len("\n---\n")
        head, text = text[:end] + "\n", text[end:]
    card.write_text(head + SMOKE_BANNER + text, encoding="utf-8")
