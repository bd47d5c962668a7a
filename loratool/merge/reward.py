"""Merging a reward model (a `reward` run): the base checkpoint is streamed and merged as for any run
(merge/run.py), with its language-model head left out and the trained score head put in its place
(PEFT saves the head whole, as `modules_to_save`), and a config of the architecture's
ForSequenceClassification class with one label and the pad id the head reads the last real token by.
The result loads with `AutoModelForSequenceClassification.from_pretrained(DIR)`.

Verification compares scores instead of logits: the merged model's score of each probe row against the
base (float32, with the score head) + the adapter through PEFT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter.files import Adapter
from loratool.errors import LoratoolError
from loratool.model.checkpoint import SAFETENSORS_DTYPE, TensorInfo
from loratool.model.load import load_score_model

if TYPE_CHECKING:
    import torch

HEAD = "score.weight"  # transformers' name of the one-label head of every ForSequenceClassification class
LM_HEAD = "lm_head.weight"
# |score difference| allowed: float32 is the same arithmetic as base + adapter (differences ~1e-6); a
# bfloat16 / float16 checkpoint rounds every weight, which moves a score by ~1e-2 on small models.
EXACT = 1e-3
ROUNDED = 0.1


def split_score_head(adapter: Adapter) -> tuple[Adapter, torch.Tensor]:
    """The adapter without its score head (the base checkpoint has no such tensor to merge into), and
    the trained head."""
    update = adapter.updates.get(HEAD)
    if update is None or update.replacement is None:
        raise LoratoolError(
            f"{adapter.path} is a reward model's run, but its adapter holds no trained {HEAD}",
            hint="the adapter directory is damaged or not the run's: train it again",
        )
    updates = {name: u for name, u in adapter.updates.items() if name != HEAD}
    return replace(adapter, updates=updates), update.replacement


def with_score_head(
    planned: list[list[TensorInfo]], head: torch.Tensor, dtype: str
) -> list[list[TensorInfo]]:
    """The output shards' tensors with the language-model head left out (tied heads have none) and the
    score head added at the end of the last shard, in `dtype` (the merged model's)."""
    shards = [[t for t in tensors if t.name != LM_HEAD] for tensors in planned]
    shards[-1].append(TensorInfo(HEAD, SAFETENSORS_DTYPE[dtype], tuple(head.shape)))
    return shards


def write_score_config(folder: Path, tokenizer_dir: Path) -> None:
    """config.json of the ForSequenceClassification class, one label, and the tokenizer's pad id."""
    from transformers import AutoTokenizer

    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config["architectures"] = [
        name.replace("ForCausalLM", "ForSequenceClassification") for name in config.get("architectures") or []
    ]
    config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_scores(
    merged_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    probes: list[list[int]],
    out_dtype: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The merged model's scores against base + adapter (PEFT, float32) on the probe rows."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    merged_model = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
    pad = merged_model.config.pad_token_id
    merged = _scores(merged_model, probes)
    del merged_model
    base = load_score_model(str(base_dir), pad, dtype=torch.float32)
    reference = _scores(PeftModel.from_pretrained(base, adapter_dir).eval(), probes)
    allowed = EXACT if out_dtype == "float32" else ROUNDED
    worst = max(abs(a - b) for a, b in zip(merged, reference, strict=True))
    passed = worst <= allowed  # NaN compares false: a broken merge fails
    log(f"  vs base + adapter: max |Δscore| {worst:.2e} -> {'ok' if passed else 'FAILED'}")
    return {
        "full_precision_base": {
            "reference": "full-precision base + adapter (scores)",
            "max_abs_score_diff": worst,
            "allowed": allowed,
            "rows": len(probes),
            "passed": passed,
        }
    }


def _scores(model: Any, probes: list[list[int]]) -> list[float]:
    """The score of each probe row, one row at a time (no padding)."""
    import torch

    with torch.inference_mode():
        return [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in probes]
