"""KTO (the `kto` section) trained: a real run on a tiny model whose held-out desirable completions gain
on the undesirable ones, a run directory that loads, evaluates and merges like any other, and a resumed
run equal to an uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import smoke_recipe, write_recipe
from helpers.dpo import HELD_OUT_WORDS, TRAIN_WORDS, write_jsonl
from helpers.run_trust import adapter_weights, metric_steps, train
from loratool.recipe import validate_recipe
from loratool.rundir.records import read_run
from loratool.train.progress import MetricsLog


def judged(word: str, desirable: bool) -> dict:
    """A chat row: the desirable completion ends in `yes yes`, the undesirable one in `no no`."""
    return {
        "prompt": [{"role": "user", "content": f"Tell me about {word}."}],
        "completion": [
            {"role": "assistant", "content": f"{word} is nice. {'yes yes' if desirable else 'no no'}"}
        ],
        "label": desirable,
    }


def rows(words: list[str]) -> list[dict]:
    return [judged(w, desirable) for w in words for desirable in (True, False)]


def kto_recipe(tmp_path, tiny_llama, name: str = "out", **training) -> dict:
    train_file = write_jsonl(tmp_path / "train.jsonl", rows(TRAIN_WORDS))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows(HELD_OUT_WORDS))
    return smoke_recipe(
        tiny_llama,
        train_file,
        tmp_path / name,
        data={
            "train": [{"path": str(train_file)}],
            "validation": [{"path": str(held_out)}],
            "max_length": 64,
        },
        training={"max_steps": 8, "save_steps": 8, "eval_steps": 8, "logging_steps": 2, **training},
        kto={"beta": 0.1},
    )


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_llama):
    """A KTO run on 24 rows (12 prompts, one desirable and one undesirable completion each) with 8
    held-out rows on other prompts, and its trainer."""
    import loratool.train.kto
    from loratool.train.run import run_train

    tmp = tmp_path_factory.mktemp("kto")
    trainers = []

    class Recording(loratool.train.kto.UnpairedTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loratool.train.kto, "UnpairedTrainer", Recording)
        out = run_train(validate_recipe(kto_recipe(tmp, tiny_llama)), log=lambda _: None)
    return out, trainers[0], tmp


def completion_logp(model, tokenizer, row: dict) -> float:
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    prompt, whole = list(getattr(prompt, "input_ids", prompt)), list(getattr(whole, "input_ids", whole))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    answer = torch.tensor(whole[len(prompt) :])
    return float(torch.log_softmax(logits, -1).gather(1, answer[:, None]).sum())


def test_the_loss_falls_and_stays_finite(kto_run):
    out, _, _ = kto_run
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert any("rewards/chosen" in row for row in logged) and any("eval_loss" in row for row in logged)


def test_the_reference_is_the_base_with_the_adapter_disabled(kto_run):
    _, trainer, _ = kto_run
    assert trainer.ref_model is None  # no second model in memory
    assert list(trainer.model.peft_config) == ["default"]  # and no frozen copy of the adapter either


def test_the_saved_adapter_loads_and_prefers_the_held_out_desirable_completions(kto_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = kto_run
    tokenizer = AutoTokenizer.from_pretrained(out)  # the chat template the run rendered its rows with
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    for word in HELD_OUT_WORDS:
        # KTO's implicit reward: how much more likely the tuned model makes a completion than the base.
        good, bad = judged(word, True), judged(word, False)
        gain_good = completion_logp(tuned, tokenizer, good) - completion_logp(base, tokenizer, good)
        gain_bad = completion_logp(tuned, tokenizer, bad) - completion_logp(base, tokenizer, bad)
        assert gain_good - gain_bad > 1.0, (word, gain_good, gain_bad)  # seen: several nats


def test_the_run_directory_records_kto(kto_run):
    out, _, _ = kto_run
    record = read_run(out)
    assert record.complete and record.stage == "kto"
    assert record.raw["kto"] == {
        "beta": 0.1,
        "loss_type": "kto",
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "reference": "base (adapter disabled)",
        "init_adapter": None,
    }
    assert record.data["train"]["rows"] == 24 and record.data["validation"]["rows"] == 8
    assert record.train["global_step"] == 8 and record.train["tokens_trained"] > 0
    assert "Preference-tuned with KTO" in (out / "README.md").read_text()
    assert not (out / "ref").exists()  # only the trained adapter is saved


def test_eval_scores_the_desirable_completions_and_merge_verifies(kto_run, tmp_path):
    from loratool.eval.run import run_eval
    from loratool.merge import run_merge

    out, _, _ = kto_run
    report = run_eval(out, max_samples=2, max_new_tokens=4, output=tmp_path / "eval", log=lambda _: None)
    generations = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all("yes yes" in row["reference"] for row in generations)
    merged = run_merge(out, output=tmp_path / "merged", log=lambda _: None)
    record = json.loads((merged / "merge.json").read_text())
    assert record["verification"]["full_precision_base"]["passed"]
    assert "held-out validation rows" in record["verification"]["probes"]


def test_a_resumed_kto_run_equals_the_uninterrupted_one(tmp_path, tiny_llama, monkeypatch):
    settings = {"max_steps": 6, "save_steps": 3, "logging_steps": 1, "eval_steps": None}
    whole = write_recipe(tmp_path / "whole.yaml", kto_recipe(tmp_path, tiny_llama, "whole", **settings))
    assert train(whole).exit_code == 0
    parts = write_recipe(tmp_path / "parts.yaml", kto_recipe(tmp_path, tiny_llama, "parts", **settings))
    original = MetricsLog.on_step_end

    def interrupt_at_step_5(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt()
        return original(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "on_step_end", interrupt_at_step_5)  # after checkpoint-3 and step 4
        assert train(parts).exit_code == 130
    resumed = train(parts, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from checkpoint-3" in resumed.output
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "parts")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert metric_steps(tmp_path / "parts") == list(range(1, 7))
    whole_run, parts_run = read_run(tmp_path / "whole").train, read_run(tmp_path / "parts").train
    assert parts_run["train_loss"] == pytest.approx(whole_run["train_loss"], rel=1e-5)
