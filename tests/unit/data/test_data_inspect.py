"""Data inspection (`loratool data` without the CLI): rows rendered as training tokenizes them,
and each check firing (or not) on purpose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.data import write_jsonl
from helpers.data_inspect import GOOD_ROWS, chat
from loratool.data import build_datasets
from loratool.data.inspect import format_report, inspect_data, to_html, token_runs
from loratool.model.load import load_tokenizer
from loratool.recipe import validate_recipe

# End of turn written only when another message follows: the answer's <|im_end|> is rendered as the
# start of the next turn, so it never carries loss; system messages are not rendered at all.
BAD_TEMPLATE = (
    "{% for m in messages %}{% if m.role != 'system' %}{% if not loop.first %}<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}"
)


def recipe_for(tmp_path: Path, model: Path, rows: list[dict], **data) -> object:
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    raw = {
        "base_model": str(model),
        "data": {"train": [{"path": str(path), "format": "messages"}], "max_length": 64, **data},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    return validate_recipe(raw)


def inspect(recipe):
    return inspect_data(recipe, load_tokenizer(recipe.base_model, recipe.model, lambda _: None))


def checks(report) -> dict[str, object]:
    return {f.check: f for f in report.findings}


def test_clean_data_has_no_warning_and_rows_match_training(tmp_path, tiny_llama):
    recipe = recipe_for(tmp_path, tiny_llama, GOOD_ROWS)
    report = inspect(recipe)
    assert report.findings == [] and report.end_of_turn == "<|im_end|>"
    # The rows shown are the rows trained: same ids and labels as the training dataset, in file order.
    trained = build_datasets(recipe.data, report.tokenizer, seed=0).train
    pairs = {tuple(r["input_ids"]): r["labels"] for r in trained}
    assert all(pairs[tuple(row.input_ids)] == row.labels for row in report.rows)
    # The loss runs are exactly the answers with their end of turn.
    runs = token_runs(report.rows[1], report.tokenizer)
    assert [text for kind, text in runs if kind == "loss"] == ["answer 0<|im_end|>\n"]
    text = format_report(report, rows=2, color=False)
    assert "[[answer 0<|im_end|>\n]]" in text and "checks: no problem found" in text
    assert "\x1b[1;32manswer 0" in format_report(report, rows=2, color=True)


def test_every_check_fires_with_counts_and_examples(tmp_path, tiny_model_factory):
    model = Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "model"))
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = config["bos_token_id"]  # generation stops on the wrong token
    (model / "generation_config.json").write_text(json.dumps(config))
    template = tmp_path / "bad.jinja"
    template.write_text(BAD_TEMPLATE)
    rows = [
        *GOOD_ROWS,
        chat("two turns", "first answer", "follow up", "second answer"),
        chat("two turns", "first answer", "follow up", "second answer"),  # an exact duplicate
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        {"messages": [{"role": "user", "content": "only a question"}, {"role": "assistant", "content": ""}]},
        chat("long " * 40, "the answer that gets cut " * 5),
    ]
    report = inspect(recipe_for(tmp_path, model, rows, chat_template=str(template)))
    found = checks(report)
    assert set(found) == {
        "end_of_turn_never_learned",
        "generation_eos_mismatch",
        "all_loss_masked",
        "truncated",
        "duplicates",
        "roles_out_of_order",
        "system_prompt_dropped",
    }
    assert "carries no loss in any of the 9 rows" in found["end_of_turn_never_learned"].message
    assert found["duplicates"].count == 1 and found["duplicates"].examples == [
        f"{tmp_path / 'rows.jsonl'}:8 = {tmp_path / 'rows.jsonl'}:7"
    ]
    assert found["roles_out_of_order"].examples[0].endswith(":9: two user turns in a row (positions 0 and 1)")
    assert found["system_prompt_dropped"].count == 1
    assert found["all_loss_masked"].examples[0].endswith(":10")
    cut = found["truncated"]
    assert cut.count == 1 and "answer tokens" in cut.message and ":11 (" in cut.examples[0]
    eos = found["generation_eos_mismatch"].message
    assert "generation_config.json" in eos
    assert "generate, chat, eval and serve stop there as well" in eos  # loratool handles it: no chore left
    page = to_html(report, rows=3)
    assert page.count("class='row'") == 3 and "data:image/png;base64," in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # self-contained


def test_end_of_turn_missing_from_every_row(tmp_path, tiny_llama):
    template = tmp_path / "no-end.jinja"  # turns are never closed: the EOS <|im_end|> is never written
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = [chat(f"question {i}", f"answer {i}") for i in range(3)]
    found = checks(inspect(recipe_for(tmp_path, tiny_llama, rows, chat_template=str(template))))
    assert "appears in no row" in found["end_of_turn_never_learned"].message


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_loss_runs_follow_completion_only_loss(tmp_path, tiny_llama, completion_only_loss):
    report = inspect(
        recipe_for(tmp_path, tiny_llama, GOOD_ROWS[1:2], completion_only_loss=completion_only_loss)
    )
    kinds = [kind for kind, _ in token_runs(report.rows[0], report.tokenizer)]
    assert kinds == ["context", "loss"]  # the prompt, then the answer; or the first token, then all
    assert (report.rows[0].loss_tokens == len(report.rows[0].input_ids) - 1) is not completion_only_loss
