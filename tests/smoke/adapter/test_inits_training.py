"""Inits that change the base (PiSSA, OLoRA, CorDA) and data-driven inits (EVA, CorDA): the run
directory holds a plain LoRA adapter on the ORIGINAL base that reproduces the trained model, and resumes."""

from __future__ import annotations

import json

import pytest

from conftest import smoke_recipe, write_recipe
from loratool.adapter import inits as lora_init
from loratool.recipe import load_recipe
from loratool.train.run import run_train

PROBE = [[1, 5, 9, 23, 42, 7, 3, 11, 60, 2]]
TOLERANCE = 1e-4  # fp32: the converted adapter is the same arithmetic, summed in another order


def _logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE, device=model.device)).logits.float().cpu()


def _train(tmp_path, base, data, monkeypatch, *, init, steps=4, **lora):
    """Train a few steps with `init`; returns the run directory, the trained (unconverted) model's logits
    on PROBE taken just before the final save, and what the run printed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    captured = {}
    save = lora_init.save_adapter

    def save_and_probe(model, folder, state_dict, initial):
        captured["logits"] = _logits(model)
        save(model, folder, state_dict, initial)

    monkeypatch.setattr(lora_init, "save_adapter", save_and_probe)
    out = tmp_path / "run"
    recipe = smoke_recipe(
        base,
        data,
        out,
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": init, **lora},
        training={"max_steps": steps, "save_steps": steps, "logging_steps": 2, "learning_rate": 1e-2},
    )
    printed: list[str] = []
    run_train(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)), log=printed.append)
    return out, captured["logits"], printed


@pytest.mark.parametrize(
    ("init", "extra"),
    [
        ("pissa", {}),
        ("pissa_niter_4", {}),
        ("olora", {}),
        ("corda", {"init_calibration_batches": 2}),
        # tau 0.9: EVA's SVD cycles over the batches until it converges; 0.99 takes minutes here.
        ("eva", {"init_calibration_batches": 2, "eva_config": {"tau": 0.9}}),
    ],
)
def test_adapter_on_the_original_base_reproduces_the_trained_model(
    tmp_path, tiny_llama, smoke_data, monkeypatch, init, extra
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratool.merge import run_merge

    run, trained, printed = _train(tmp_path, tiny_llama, smoke_data, monkeypatch, init=init, **extra)
    record = json.loads((run / "run.json").read_text())["adapter_init"]
    config = json.loads((run / "adapter_config.json").read_text())
    converted = init != "eva"
    assert record["method"] == init.split("_")[0] and record["converted_to_plain_lora"] is converted
    if converted:
        # A plain LoRA adapter: PEFT's default init, rank and alpha doubled (same scale).
        assert config["init_lora_weights"] is True and (config["r"], config["lora_alpha"]) == (8, 16)
        assert config.get("corda_config") is None  # else every load warns that it is ignored
        assert record["rank"] == 8 and record["trained_rank"] == 4
        assert (run / "checkpoints" / lora_init.INITIAL_ADAPTER / "adapter_model.safetensors").is_file()
    assert "Initialized with" in (run / "README.md").read_text()
    if init in ("eva", "corda"):  # the calibration pass has its own progress line
        name = {"eva": "EVA", "corda": "CorDA"}[init]
        assert f"{name}: calibrating on 2 batches of the training data ..." in printed, printed

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base_logits = _logits(base)
    reloaded = _logits(PeftModel.from_pretrained(base, run))
    diff = (reloaded - trained).abs().max().item()
    assert diff <= TOLERANCE, f"{init}: adapter on the original base is {diff:.2e} off the trained model"
    assert (reloaded - base_logits).abs().max().item() > 1e-3, "the adapter should change the model"

    merged = run_merge(run, output=tmp_path / "merged", dtype="float32", log=lambda _: None)
    verification = json.loads((merged / "merge.json").read_text())["verification"]
    worst = max(v["max_abs_logit_diff"] for v in verification.values() if isinstance(v, dict))
    assert verification["passed"] and worst <= TOLERANCE, verification
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged))
    assert (merged_logits - trained).abs().max().item() <= TOLERANCE


@pytest.mark.quick
def test_resume_continues_from_the_unconverted_checkpoint(tmp_path, tiny_llama, smoke_data, monkeypatch):
    """A PiSSA run stopped after its first checkpoint and resumed gives the same final adapter as one
    uninterrupted run: checkpoints hold the unconverted adapter, and only the final one is converted."""
    from safetensors.torch import load_file

    whole, _, _ = _train(tmp_path / "a", tiny_llama, smoke_data, monkeypatch, init="pissa", steps=4)
    out = tmp_path / "b" / "run"
    recipe = smoke_recipe(
        tiny_llama,
        smoke_data,
        out,
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": "pissa"},
        training={"max_steps": 4, "save_steps": 2, "logging_steps": 2, "learning_rate": 1e-2},
    )
    path = write_recipe(tmp_path / "b.yaml", recipe)
    run_train(load_recipe(path), log=lambda _: None)
    # Make it look like a run interrupted after checkpoint-2.
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**manifest, "status": "failed", "error": "interrupted"}))
    checkpoint = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(t.shape[0] == 4 or t.shape[1] == 4 for t in checkpoint.values()), "checkpoint is unconverted"

    run_train(load_recipe(path), resume=True, log=lambda _: None)
    a = load_file(whole / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed PiSSA adapter differs from the uninterrupted one by {worst:.2e}"
