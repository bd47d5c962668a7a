"""`loratool train` end to end through the real CLI, on tiny models, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trl
from safetensors.torch import load_file

from conftest import smoke_recipe, write_recipe
from helpers.train import train_cli
from loratool.model.fingerprint import weights_fingerprint
from loratool.recipe import load_recipe

EXPECTED_RUN_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "checkpoints",
    "loss_curve.png",
    "metrics.jsonl",
    "recipe.yaml",
    "run.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "train.log",
}


class RecordingTrainer(trl.SFTTrainer):
    """The real SFTTrainer, remembered so a test can look at the model that was trained in memory."""

    instances: list[trl.SFTTrainer] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.instances.append(self)


@pytest.fixture()
def recording_trainer(monkeypatch):
    RecordingTrainer.instances = []
    monkeypatch.setattr(trl, "SFTTrainer", RecordingTrainer)
    return RecordingTrainer.instances


def probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer("Spell the word backwards: falcon", return_tensors="pt")["input_ids"]


def base_linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(model_dir / "model.safetensors").items() if k.endswith("proj.weight")}


def learnable_data(path: Path, rows: int = 64) -> Path:
    """A task a 140k-parameter random model learns in a few dozen steps: one fixed answer per instruction."""
    with path.open("w") as fh:
        for i in range(rows):
            kind = i % 2
            instruction = ["Is the sky blue?", "Name a colour."][kind] + f" (case {i})"
            output = ["Yes, it is blue.", "Red is a colour."][kind]
            fh.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")
    return path


def test_lora_end_to_end(tmp_path, tiny_llama, recording_trainer):
    out = tmp_path / "run"
    data = learnable_data(tmp_path / "train.jsonl")
    recipe = smoke_recipe(
        tiny_llama,
        data,
        out,
        data={"train": [{"path": str(data), "format": "alpaca"}], "validation": 0.125, "max_length": 64},
        training={"max_steps": 30, "eval_steps": 10, "save_steps": 10, "learning_rate": 1e-2},
    )
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert "tokens" in result.output and "loss on" in result.output  # the data summary came first
    assert {p.name for p in out.iterdir()} == EXPECTED_RUN_FILES

    # The loss falls on a learnable task, in training and on held-out rows.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    # Step 0 (where the base started, as the loss curve shows it) and three evaluations during training.
    assert len(evals) == 4 and rows[0].get("step") == 0 and "eval_loss" in rows[0], rows[0]
    assert evals[-1] < evals[0] and evals[-1] < 0.5 * losses[0], evals
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The manifest describes the run.
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["base_model"]["fingerprint"] == weights_fingerprint(tiny_llama)
    assert manifest["train"]["global_step"] == 30
    assert manifest["train"]["tokens_trained"] > 0
    assert manifest["train"]["final_eval_loss"] == pytest.approx(evals[-1], rel=1e-4)
    assert (
        manifest["data"] and manifest["versions"]["peft"] and manifest["peak_memory_bytes"]["process_rss"] > 0
    )
    assert manifest["wall_time_s"] > 0

    # recipe.yaml is the resolved recipe and is itself a valid recipe.
    assert load_recipe(out / "recipe.yaml").training.max_steps == 30

    # The adapter reloads with plain PEFT and reproduces the trained model's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = recording_trainer[0].model.eval()
    ids = probe_ids(out)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
        got = reloaded(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base_logits).abs().max() > 1e-2  # the adapter does something

    # Base weights unchanged, adapter weights changed (B starts at zero).
    base = base_linear_weights(tiny_llama)
    for name, module in reloaded.named_modules():
        if hasattr(module, "base_layer") and name.endswith("q_proj"):
            key = name.split("base_model.model.", 1)[1] + ".weight"
            torch.testing.assert_close(module.base_layer.weight, base[key], atol=0, rtol=0)
            assert module.lora_B["default"].weight.abs().max() > 0
    adapter = load_file(out / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter)
    assert len(adapter) == 2 * 7 * 2  # A and B for 7 linear layers in each of 2 blocks

    # The saved tokenizer carries the chat template the data was rendered with.
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template


def test_qlora_4bit_end_to_end(tmp_path, tiny_llama, recording_trainer):
    out = tmp_path / "qrun"
    data = learnable_data(tmp_path / "train.jsonl")
    recipe = smoke_recipe(
        tiny_llama,
        data,
        out,
        quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        training={"max_steps": 20, "learning_rate": 1e-2},
    )
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert losses[-1] < 0.5 * losses[0], losses
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["base_model"]["quantization"] == "4bit"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loratool.model.bnb_cpu import use_exact_4bit_matmul

    trained = recording_trainer[0].model
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {
        torch.float32
    }  # fp32 compute on CPU
    assert type(trained.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ids = probe_ids(out)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quant, device_map={"": "cpu"})
    # As loratool loads a 4-bit base on CPU (model/bnb_cpu.py): on an AVX512-BF16 CPU, bitsandbytes' fused
    # kernel would compute this reload in bfloat16 (logits off by ~5e-2), on other CPUs in float32 — the
    # comparison below must mean the same on every CPU.
    use_exact_4bit_matmul(base)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_llama, smoke_data):
    out = tmp_path / "run"
    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        smoke_recipe(tiny_llama, smoke_data, out, training={"max_steps": 4, "save_steps": 2}),
    )
    assert train_cli(recipe_path).exit_code == 0
    refused = train_cli(recipe_path)
    assert refused.exit_code == 1 and "already holds a finished run" in refused.output
    result = train_cli(recipe_path, "--resume", "--set", "training.max_steps=6")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["train"]["global_step"] == 6 and manifest["status"] == "complete"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(2) == 1  # resumed, not restarted
    assert (out / "adapter_model.safetensors").is_file()


def test_malformed_row_fails_with_its_line_and_skip_counts_it(tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})
    data.write_text("\n".join([good] * 10 + ['{"instruction": "broken", ']) + "\n")
    out = tmp_path / "run"
    recipe_path = write_recipe(
        tmp_path / "r.yaml", smoke_recipe(tiny_llama, data, out, training={"max_steps": 2})
    )
    result = train_cli(recipe_path)
    assert result.exit_code == 1
    assert f"{data}:11" in result.output and "on_bad_row: skip" in result.output
    assert not out.exists()  # a data error stops the run before its directory is created
    result = train_cli(recipe_path, "--set", "data.on_bad_row=skip")
    assert result.exit_code == 0, result.output
    assert "malformed" in result.output


def one_sgd_step(
    tmp_path, tiny_llama, smoke_data, name, *, batch, accumulation, attn=None, padding_free=True
):
    """The adapter after one plain-SGD step (the update is the gradient itself: Adam's first step is nearly
    sign(gradient) and would hide a wrong normalization)."""
    out = tmp_path / name
    recipe = smoke_recipe(
        tiny_llama,
        smoke_data,
        out,
        model={"attn_implementation": attn},
        data={"padding_free": padding_free},
        training={
            "max_steps": 1,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "optim": "sgd",
            "learning_rate": 1.0,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 0.0,
        },
    )
    assert train_cli(write_recipe(tmp_path / f"{name}.yaml", recipe)).exit_code == 0
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # the step did move B
    return adapter


@pytest.mark.parametrize(
    ("attn", "padding_free"),
    [(None, True), ("eager", True), ("sdpa", False)],
    ids=["sdpa_per_example", "eager_per_example", "padded-sdpa"],
)
def test_batch_8_equals_batch_2_times_accumulation_4(tmp_path, tiny_llama, smoke_data, attn, padding_free):
    """One optimizer step sees the same 8 examples either way, and the loss is normalized over all of
    their loss tokens, so the adapter moves identically."""
    settings = {"attn": attn, "padding_free": padding_free}
    whole = one_sgd_step(tmp_path, tiny_llama, smoke_data, "b8", batch=8, accumulation=1, **settings)
    split = one_sgd_step(tmp_path, tiny_llama, smoke_data, "b2", batch=2, accumulation=4, **settings)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], atol=1e-5, rtol=1e-4)


def test_padding_free_step_equals_padded_step(tmp_path, tiny_llama, smoke_data):
    """The default (padding-free batches, attention per example) moves the adapter exactly as padded
    batches with the stock sdpa do: same examples, same loss per token, same gradient."""
    free = one_sgd_step(tmp_path, tiny_llama, smoke_data, "free", batch=8, accumulation=1)
    padded = one_sgd_step(
        tmp_path, tiny_llama, smoke_data, "padded", batch=8, accumulation=1, padding_free=False
    )
    for key in free:
        torch.testing.assert_close(free[key], padded[key], atol=1e-5, rtol=1e-4)
