"""`loratool eval`: loss as training computes it (checked by hand and against the trainer), the
report files, --compare-base, merged and base-model targets, lm-eval tasks, and one clean error per
mistake — through the real CLI, on a tiny model trained once for the module."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from helpers.eval import SMOKE, eval_cli, metrics
from loratool.cli import app
from loratool.eval.metrics import heldout_loss

HELD_OUT = [
    {"instruction": "Spell the word backwards.", "input": "lantern", "output": "nretnal"},
    {"instruction": "Write the word in capital letters.", "input": "meadow", "output": "MEADOW"},
    {
        "instruction": "How many letters does the word have?",
        "input": "pebble",
        "output": "pebble has 6 letters.",
    },
    {"instruction": "Spell the word backwards.", "input": "copper", "output": "reppoc"},
    {"instruction": "Write the word in capital letters.", "input": "harbor", "output": "HARBOR"},
]


def generations(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama) -> Path:
    """A short `loratool train` run whose 8 validation rows fit one evaluation batch (so the trainer's
    eval_loss is the token-weighted mean too)."""
    tmp = tmp_path_factory.mktemp("eval-run")
    recipe = smoke_recipe(
        tiny_llama,
        SMOKE,
        tmp / "run",
        data={"train": [{"path": str(SMOKE), "format": "alpaca"}], "validation": 0.03, "max_length": 64},
        training={"max_steps": 6, "save_steps": 6, "learning_rate": 1e-2, "per_device_eval_batch_size": 16},
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


@pytest.fixture(scope="module")
def evaluated(run) -> tuple[Path, str]:
    """`loratool eval RUN --compare-base`, once for the module."""
    result = eval_cli(run, "--compare-base")
    assert result.exit_code == 0, result.output
    return run / "eval", result.output


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held-out") / "held_out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELD_OUT))
    return path


def load_run_model(run: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        yaml.safe_load((run / "recipe.yaml").read_text())["base_model"]
    )
    return PeftModel.from_pretrained(base, run).eval()


def validation_rows(run: Path):
    from transformers import AutoTokenizer

    from loratool.data import build_datasets
    from loratool.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    data = build_datasets(recipe.data, AutoTokenizer.from_pretrained(run), seed=recipe.training.seed)
    return list(zip(data.validation["input_ids"], data.validation["labels"], strict=True))


def hand_loss(model, rows) -> float:
    """Sum of -log p(label) over every label != -100, one unpadded row at a time, divided by their count."""
    total, count = 0.0, 0
    for ids, labels in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        for t in range(1, len(ids)):
            if labels[t] != -100:
                total -= log_probs[t - 1, labels[t]].item()
                count += 1
    return total / count


# --- the numbers ---------------------------------------------------------------------------------------


@pytest.mark.quick
def test_loss_equals_hand_computation_and_the_trainers_eval_loss(run, evaluated):
    out, _ = evaluated
    tuned = metrics(out)["models"]["tuned"]
    rows = validation_rows(run)
    model = load_run_model(run)
    assert tuned["rows"] == len(rows) == 8
    assert tuned["loss_tokens"] == sum(sum(label != -100 for label in labels) for _, labels in rows)
    assert tuned["loss"] == pytest.approx(hand_loss(model, rows), abs=1e-5)
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]), rel=1e-9)
    # The whole validation split fits one evaluation batch, so the trainer's mean is the same number.
    trainer = json.loads((run / "run.json").read_text())["train"]["final_eval_loss"]
    assert tuned["loss"] == pytest.approx(trainer, abs=1e-5)
    assert metrics(out)["trainer_final_eval_loss"] == trainer
    # --compare-base switched the adapter off: the base's own loss, and a different one.
    with model.disable_adapter():
        base_loss = hand_loss(model, rows)
    assert metrics(out)["models"]["base"]["loss"] == pytest.approx(base_loss, abs=1e-5)
    assert abs(base_loss - tuned["loss"]) > 0.1


def test_padded_batches_give_the_loss_of_rows_one_by_one(run):
    model, rows = load_run_model(run), validation_rows(run)
    pad = 0
    batched = heldout_loss(model, rows, pad_id=pad, max_batch_tokens=4096)  # all rows in one padded batch
    alone = heldout_loss(model, rows, pad_id=pad, max_batch_tokens=1)  # one row per forward pass
    assert batched.loss == pytest.approx(alone.loss, abs=1e-6)
    assert batched.row_losses == pytest.approx(alone.row_losses, abs=1e-5)


# --- the report ----------------------------------------------------------------------------------------


def test_report_files(run, evaluated):
    out, output = evaluated
    assert {p.name for p in out.iterdir()} == {"metrics.json", "generations.jsonl", "report.md"}
    record = metrics(out)
    assert record["target"]["kind"] == "run" and record["data"]["source"] == "validation"
    assert record["settings"]["decoding"] == "greedy" and record["settings"]["max_new_tokens"] == 8
    assert record["versions"]["sacrebleu"] and record["versions"]["rouge-score"]
    for name in ("tuned", "base"):
        assert set(record["models"][name]) >= {
            "loss",
            "perplexity",
            "exact_match",
            "rouge_l_f1",
            "bleu",
            "chrf",
        }
    assert record["difference"]["loss"] == pytest.approx(
        record["models"]["tuned"]["loss"] - record["models"]["base"]["loss"]
    )

    rows = generations(out)
    assert len(rows) == 8
    assert all(set(r) >= {"prompt", "reference", "tuned", "base"} for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["reference"] for r in rows)

    report = (out / "report.md").read_text()
    assert "| metric | base | tuned | difference |" in report
    assert f"| loss (nats/token) | {record['models']['base']['loss']:.4f} |" in report
    assert "![training and validation loss](../loss_curve.png)" in report
    assert (out / "../loss_curve.png").is_file()
    assert report.count("### Row ") == 5 and rows[0]["reference"] in report
    # The terminal: the table and two examples with the answers of both models.
    assert "loss (nats/token)" in output and output.count("reference: ") == 2
    assert not list(run.glob(".eval.partial-*"))
    # The run's model card now says how the adapter did, for tuned and base.
    card = (run / "README.md").read_text()
    assert (
        f"held-out loss (tuned, `loratool eval`, 8 held-out rows): {record['models']['tuned']['loss']:.4g}"
        in card
    )
    assert "held-out loss (base, " in card and "full report: `eval`" in card


def test_prompt_and_reference_come_from_the_template(run, held_out, tmp_path):
    from transformers import AutoTokenizer

    result = eval_cli(run, "--data", held_out, "--output", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(run)
    by_reference = {r["reference"]: r for r in generations(tmp_path / "ev")}
    assert set(by_reference) == {row["output"] for row in HELD_OUT}
    row = HELD_OUT[0]
    messages = [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # ChatML writes no BOS; the tiny tokenizer puts one before text, so it comes first, as in training
    assert by_reference[row["output"]]["prompt"] == tokenizer.bos_token + expected


def test_max_samples(run, tmp_path):
    result = eval_cli(run, "--max-samples", "3", "--output", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert metrics(tmp_path / "ev")["models"]["tuned"]["rows"] == 3
    assert len(generations(tmp_path / "ev")) == 3


# --- other targets -------------------------------------------------------------------------------------


def test_compare_base_equals_a_separate_evaluation_of_the_base(
    run, tiny_llama, held_out, tmp_path, monkeypatch
):
    result = eval_cli(run, "--data", held_out, "--compare-base", "--output", tmp_path / "run-eval")
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    result = eval_cli(tiny_llama, "--data", held_out)  # a base model: the report goes to ./eval-NAME
    assert result.exit_code == 0, result.output
    alone = tmp_path / f"eval-{tiny_llama.name}"
    compared, separate = metrics(tmp_path / "run-eval")["models"]["base"], metrics(alone)["models"]["base"]
    assert metrics(alone)["target"]["kind"] == "base" and "tuned" not in metrics(alone)["models"]
    assert compared["rows"] == separate["rows"] == len(HELD_OUT)
    for key in ("loss", "rouge_l_f1", "chrf", "exact_match", "mean_generated_tokens"):
        assert compared[key] == pytest.approx(separate[key], abs=1e-5), key
    assert [g["base"] for g in generations(tmp_path / "run-eval")] == [g["base"] for g in generations(alone)]


def test_merged_checkpoint_evaluates_like_the_run(run, evaluated, tmp_path):
    from loratool.merge import run_merge

    merged = run_merge(run, output=tmp_path / "merged", dtype="float32", verify=False, log=lambda _: None)
    result = eval_cli(merged, "--compare-base")  # its data: the run's validation split, via merge.json
    assert result.exit_code == 0, result.output
    got, expected = metrics(merged / "eval"), metrics(evaluated[0])
    assert got["target"]["kind"] == "merged" and got["data"]["rows"] == 8
    for name in ("tuned", "base"):
        assert got["models"][name]["loss"] == pytest.approx(expected["models"][name]["loss"], abs=1e-5)
    assert [g["tuned"] for g in generations(merged / "eval")] == [
        g["tuned"] for g in generations(evaluated[0])
    ]
    curve = os.path.relpath(run / "loss_curve.png", merged / "eval")
    assert f"![training and validation loss]({curve})" in (merged / "eval" / "report.md").read_text()


# --- bad input -----------------------------------------------------------------------------------------


def test_run_without_validation_and_without_data(run, tmp_path):
    copy = tmp_path / "no-validation"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["data"]["validation"] = None
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = eval_cli(copy)
    assert result.exit_code == 1
    assert "has no validation data" in result.output and "hint: pass --data FILE" in result.output
    assert "Traceback" not in result.output and not (copy / "eval").exists()


def test_empty_data_file(run, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = eval_cli(run, "--data", empty, "--output", tmp_path / "ev")
    assert result.exit_code == 1
    assert f"error: --data {empty}: the sources hold no rows" in result.output
    assert not (tmp_path / "ev").exists()


def test_unfinished_run_is_refused(run, tmp_path):
    copy = tmp_path / "crashed"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    manifest = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**manifest, "status": "failed", "error": "OutOfMemoryError"}))
    result = eval_cli(copy)
    assert result.exit_code == 1
    assert "is not finished (run.json status: 'failed': OutOfMemoryError)" in result.output


def test_output_that_is_not_a_report_is_refused(run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = eval_cli(run, "--output", tmp_path)
    assert result.exit_code == 1 and "is not the output of `loratool eval`" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_lm_eval_not_installed(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    result = eval_cli(run, "--lm-eval-tasks", "hellaswag,arc_easy")
    assert result.exit_code == 1
    assert "lm-evaluation-harness, which is not installed" in result.output
    assert "pip install 'loratool[lm-eval]'" in result.output


# --- data order, max_length, lm-evaluation-harness -------------------------------------------------------


def test_data_keeps_file_order_and_cut_references_are_marked(run, held_out, tmp_path):
    result = eval_cli(
        run, "--data", held_out, "--max-samples", "3", "--max-length", "41", "--output", tmp_path / "ev"
    )
    assert result.exit_code == 0, result.output
    record, rows = metrics(tmp_path / "ev"), generations(tmp_path / "ev")
    assert record["data"]["max_length"] == 41 and record["data"]["order"] == "file"
    # The first three rows of the file, in its order (a shuffle would pick others, or reorder them).
    assert [r["prompt"].count(row["input"]) > 0 for r, row in zip(rows, HELD_OUT, strict=False)] == [True] * 3
    cut = [r for r in rows if not r["reference_complete"]]
    assert cut and record["data"]["truncated_references"] == len(cut)
    report = (tmp_path / "ev" / "report.md").read_text()
    assert report.count("Reference (cut at max_length=41 tokens):") == len(cut)


def lm_eval_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


needs_lm_eval = pytest.mark.skipif(
    not lm_eval_installed(), reason="lm-eval is not installed (loratool[lm-eval])"
)


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    """An lm-eval multiple-choice task on a local JSON file: runs offline, in a folder of its own."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    docs = [
        {"question": "The opposite of hot is", "choices": ["cold", "blue"], "answer": 0},
        {"question": "Two plus two is", "choices": ["five", "four"], "answer": 1},
        {"question": "The sky is", "choices": ["blue", "loud"], "answer": 0},
    ]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {
        "task": "loratool_tiny_choice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }
    (folder / "tiny_choice.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


@needs_lm_eval
def test_unknown_lm_eval_task_fails_before_any_model_loads(run, local_task, monkeypatch, tmp_path):
    import loratool.eval.run

    monkeypatch.setattr(loratool.eval.run, "load_target", lambda *a: pytest.fail("loaded a model"))
    result = eval_cli(run, "--lm-eval-tasks", "loratool_tiny_choise", "--lm-eval-include", local_task,
                      "--output", tmp_path / "ev")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "unknown task(s)" in result.output and "did you mean loratool_tiny_choice?" in result.output
    assert not (tmp_path / "ev").exists()


@needs_lm_eval
def test_lm_eval_local_task_on_tuned_and_base(run, local_task, tiny_llama, tmp_path, monkeypatch):
    result = eval_cli(run, "--compare-base", "--max-samples", "2", "--lm-eval-tasks", "loratool_tiny_choice",
                      "--lm-eval-include", local_task, "--output", tmp_path / "ev")  # fmt: skip
    assert result.exit_code == 0, result.output
    harness = metrics(tmp_path / "ev")["lm_eval"]
    assert harness["error"] is None and harness["limit"] is None  # --max-samples does not limit lm-eval
    assert set(harness["models"]) == {"tuned", "base"}
    for numbers in harness["models"].values():
        assert 0.0 <= numbers["loratool_tiny_choice"]["acc,none"] <= 1.0
    assert "lm-eval task metric" in result.output and "loratool_tiny_choice acc" in result.output
    assert "loratool_tiny_choice acc" in (tmp_path / "ev" / "report.md").read_text()
    # The base side is lm-eval on the base itself: the same numbers as evaluating the base alone, with
    # the task named by its YAML path.
    monkeypatch.chdir(tmp_path)
    alone = eval_cli(tiny_llama, "--data", SMOKE, "--max-samples", "2",
                     "--lm-eval-tasks", local_task / "tiny_choice.yaml")  # fmt: skip
    assert alone.exit_code == 0, alone.output
    base_alone = metrics(tmp_path / f"eval-{tiny_llama.name}")["lm_eval"]["models"]["base"]
    assert base_alone == harness["models"]["base"]


def test_lm_eval_failure_keeps_the_rest_of_the_report(run, monkeypatch, tmp_path):
    import loratool.eval.run
    from loratool.eval.lm_harness import HarnessTasks

    def broken(*args):
        raise RuntimeError("the task's dataset vanished")

    monkeypatch.setattr(
        loratool.eval.run, "prepare_tasks", lambda specs, *a: HarnessTasks(specs, None, None, None)
    )
    monkeypatch.setattr(loratool.eval.run, "run_tasks", broken)
    result = eval_cli(run, "--max-samples", "2", "--lm-eval-tasks", "sometask", "--output", tmp_path / "ev")
    assert result.exit_code == 1
    assert "error: lm-evaluation-harness failed: RuntimeError: the task's dataset vanished" in result.output
    record = metrics(tmp_path / "ev")
    assert record["models"]["tuned"]["rows"] == 2  # loss and generation results were written
    assert record["lm_eval"]["error"] == "RuntimeError: the task's dataset vanished"
    assert "lm-eval failed" in (tmp_path / "ev" / "report.md").read_text()
