"""`lora.method`: an AdaLoRA run cannot be resumed, through the CLI."""

from __future__ import annotations

from conftest import smoke_recipe, write_recipe
from helpers.methods import SMOKE, cli


def test_adalora_run_cannot_be_resumed(tmp_path, tiny_llama):
    recipe = smoke_recipe(tiny_llama, SMOKE, tmp_path / "run", lora={"method": "adalora"})
    del recipe["lora"]["r"]
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--resume")
    assert result.exit_code == 1
    assert "an AdaLoRA run cannot be continued" in result.output
