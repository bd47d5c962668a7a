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
    assert config["base_model_name_or_path"] == "/models/SmolLM2-135M-Instruct-Q8_0.gguf"
    card = (tmp_path / "README.md").read_text()
    assert "`SmolLM2-135M-Instruct-Q8_0.gguf` (sha256 `" + "ab12cd" * 10 + "`)" in card
    assert ".cache/loratool" not in card
    assert "Short run" not in card and "final train loss: 1.2346" in card
