"""Shareable run directories (issue 12): a real model card, adapter_config.json naming the real
base, the tokenizer's context length kept, the vLLM loader check, and export.json's chain back to the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import conftest
from loratool.cli import app
from loratool.rundir.model_card import vllm_problems, vllm_summary

SMOKE_DATA = conftest.REPO / "recipes" / "data" / "smoke.jsonl"


def cli(*args: str | Path):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama) -> Path:
    tmp = tmp_path_factory.mktemp("card")
    recipe = conftest.smoke_recipe(
        tiny_llama, SMOKE_DATA, tmp / "falcon", training={"max_steps": 2, "save_steps": 2}
    )
    recipe["data"]["validation"] = 0.2
    result = cli("train", conftest.write_recipe(tmp / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    return tmp / "falcon"


@pytest.mark.quick
def test_the_run_directory_has_a_real_model_card(run_dir, tiny_llama):
    card = (run_dir / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not PEFT's template
    assert card.startswith("---\nlibrary_name: peft")
    assert "# falcon" in card and f"A LoRA adapter for **{tiny_llama}**" in card
    assert f"`{SMOKE_DATA}` (alpaca)" in card  # the data source, with its counts
    record = json.loads((run_dir / "run.json").read_text())
    train_rows = record["data"]["train"]["rows"]
    assert f"- train: {train_rows:,} rows" in card and "- validation:" in card
    assert "| LoRA rank r / alpha | 8 / 16 |" in card
    assert f"final train loss: {round(record['train']['train_loss'], 4)}" in card
    assert "final validation loss:" in card
    assert "> **Short run**: 2 optimizer steps" in card  # two steps: say so, and to check its evaluation
    assert 'AutoPeftModelForCausalLM.from_pretrained("falcon")' in card
    assert "vllm serve" in card and "--enable-lora" in card and "loratool export" in card


def test_adapter_config_names_the_base_and_the_tokenizer_keeps_the_context(run_dir, tiny_llama):
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)
    saved = json.loads((run_dir / "tokenizer_config.json").read_text())
    base_context = json.loads((Path(tiny_llama) / "config.json").read_text())["max_position_embeddings"]
    assert saved["model_max_length"] == base_context  # not transformers' 1e30 "no limit"


def test_vllm_check_passes_a_plain_adapter_and_names_what_it_refuses(run_dir, tmp_path, tiny_llama):
    assert vllm_problems(run_dir) == []
    summary = vllm_summary(run_dir)
    assert summary[0].startswith("vLLM: LoRA on ") and "q_proj" in summary[0] and "rank 8" in summary[0]
    assert summary[-1] == "vLLM's LoRA loader will accept it"

    odd = conftest.random_adapter(
        tiny_llama,
        tmp_path / "odd",
        r=600,
        use_dora=True,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    problems = " | ".join(vllm_problems(odd))
    assert "DoRA (use_dora) is not supported by vLLM" in problems
    assert "modules_to_save (lm_head)" in problems
    assert "rank 600 is above vLLM's largest --max-lora-rank (512)" in problems


def test_export_of_a_merged_checkpoint_records_its_merge(run_dir, tmp_path):
    from loratool.export import run_export
    from loratool.merge import run_merge

    merged = run_merge(run_dir, output=tmp_path / "merged", verify=False, log=lambda _: None)
    out = run_export(merged, output=tmp_path / "gguf", verify=False, log=lambda _: None)
    record = json.loads((out / "export.json").read_text())
    merge = record["source"]["merge"]
    assert merge is not None and merge["adapter"]["path"] == str(run_dir)  # the chain back to the run
