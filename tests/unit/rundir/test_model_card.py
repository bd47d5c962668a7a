"""Shareable run directories (issue 12): a GGUF base is named by its file and sha256."""

from __future__ import annotations

import json

from loratool.rundir.model_card import finish_adapter_dir
from loratool.rundir.records import RunRecord


def test_a_gguf_base_is_named_by_its_file_and_sha256(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/home/me/.cache/loratool/gguf/ab12cd", "r": 8})
    )
    manifest = {
        "base_model": {
            "id": "/models/SmolLM2-135M-Instruct-Q8_0.gguf",
            "resolved_path": "/home/me/.cache/loratool/gguf/ab12cd",
            "gguf": {"file": "/models/SmolLM2-135M-Instruct-Q8_0.gguf", "sha256": "ab12cd" * 10},
        },
        "train": {"global_step": 500, "tokens_trained": 2_000_000, "train_loss": 1.23456},
    }
    finish_adapter_dir(
        tmp_path, {"lora": {"r": 8, "lora_alpha": 16}}, RunRecord.from_dict(manifest, tmp_path)
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "SmolLM2-135M-Instruct-Q8_0.gguf"  # not this machine's path
    card = (tmp_path / "README.md").read_text()
    assert "`SmolLM2-135M-Instruct-Q8_0.gguf` (sha256 `" + "ab12cd" * 10 + "`)" in card
    assert ".cache/loratool" not in card
    assert "Short run" not in card and "final train loss: 1.2346" in card


def test_an_online_rl_run_says_how_it_was_trained(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8}))
    grpo = {
        "num_generations": 4, "max_completion_length": 36, "temperature": 0.7, "beta": 0.0,
        "rewards": [{"name": "exact_match", "weight": 1.0}, {"name": "length", "weight": 0.1}],
        "init_adapter": "/runs/orders-sft",
    }  # fmt: skip
    manifest = {"base_model": {"id": "org/base"}, "stage": "grpo", "grpo": grpo, "train": {"global_step": 24}}
    finish_adapter_dir(tmp_path, {"lora": {"r": 8}}, RunRecord.from_dict(manifest, tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert (
        "Trained by online reinforcement learning (GRPO): 4 completions per prompt, up to 36 tokens each, "
        "sampled at temperature 0.7 and scored by exact_match, length x 0.1; no KL term (beta 0); started "
        "from the adapter of `orders-sft`."
    ) in card
