"""What the merge tests of several tiers share: the CLI call, the merged weights and their
comparison, merge.json, a tiny GPT-2."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import LORATOOL_RUN
from conftest import random_adapter as peft_adapter
from loratool.cli import app
from loratool.model.fingerprint import weights_fingerprint

# --- helpers -------------------------------------------------------------------------------------------


def merge_cli(*args: str | Path):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
    # Tied weights (GPT-2's lm_head) are in the state dict but not in the checkpoint.
    assert set(got) <= set(expected) and len(got) >= len(expected) - 1


def record(folder: Path) -> dict:
    return json.loads((folder / "merge.json").read_text())


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 stores its projections as Conv1D (in, out): the fan_in_fan_out case."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from loratool.model.tiny import CHATML_TEMPLATE, build_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tokenizer = build_tokenizer(512)
    tokenizer.chat_template = CHATML_TEMPLATE
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- a run stopped after two sealed checkpoints ------------------------------------------------------


def seal(checkpoint: Path, base_fingerprint: str | None) -> None:
    """Seal `checkpoint` the way training does: the trainer callback's on_save, after the trainer saved."""
    from loratool.train.checkpoints import CheckpointSeal

    step = int(checkpoint.name.split("-")[-1])
    args = SimpleNamespace(output_dir=str(checkpoint.parent))
    state = SimpleNamespace(global_step=step, is_world_process_zero=True, num_input_tokens_seen=0)
    CheckpointSeal(base_fingerprint=base_fingerprint).on_save(args, state, control=None)


def run_with_checkpoints(folder: Path, base: Path) -> Path:
    """A run stopped after two checkpoints (run.json "failed"), trained on `base`; its adapter_config names a
    base this machine does not have, so only the fingerprints tell bases apart."""
    fingerprint = weights_fingerprint(base)
    folder.mkdir()
    base_model = {"id": str(base), "resolved_path": str(base), "fingerprint": fingerprint}
    (folder / "run.json").write_text(
        json.dumps({**LORATOOL_RUN, "status": "failed", "base_model": base_model})
    )
    for step, seed in ((6, 1), (12, 2)):
        checkpoint = peft_adapter(
            base, folder / "checkpoints" / f"checkpoint-{step}", seed, target_modules=["q_proj"]
        )
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        (checkpoint / "adapter_config.json").write_text(
            json.dumps({**config, "base_model_name_or_path": "some-org/some-model"})
        )
        seal(checkpoint, fingerprint)
    return folder
