"""`loratool eval`'s generation metrics on known strings."""

from __future__ import annotations

import pytest

from loratool.eval.metrics import generation_metrics


def test_generation_metrics_on_known_strings():
    got = generation_metrics(["Paris", " a b c ", "x"], ["Paris", "a b d", "y"], [1, 3, 1])
    assert got["exact_match"] == pytest.approx(1 / 3)  # whitespace stripped: only "Paris" matches
    # ROUGE-L F1 per row: 1, LCS 2 of 3 words both ways (2/3), 0.
    assert got["rouge_l_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert got["mean_generated_tokens"] == pytest.approx(5 / 3)
    assert got["bleu"] == 0  # corpus BLEU needs 4-gram matches, and these answers are too short for one
    assert 0 < got["chrf"] < 100
    close = generation_metrics(["the cat sat on the mat today"], ["the cat sat on the mat"], [7])
    assert 50 < close["bleu"] < 100 and 50 < close["chrf"] < 100
    perfect = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], [6])
    assert perfect["exact_match"] == 1 and perfect["rouge_l_f1"] == 1
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)


@pytest.mark.parametrize(
    ("rows", "holds"),
    [
        (
            [{"prompt": "Say hi.", "chosen": " hi there", "rejected": " go away"},
             {"prompt": "Say bye.", "chosen": " bye now", "rejected": " no"}],
            "pairs",
        ),
        (
            [{"prompt": "Say hi.", "completion": " hi there", "label": True},
             {"prompt": "Say hi.", "completion": " go away", "label": False},
             {"prompt": "Say bye.", "completion": " bye now", "label": True}],
            "judged",
        ),
    ],
)  # fmt: skip
def test_eval_data_of_pairs_or_judged_rows_asks_for_the_chosen_answers(tiny_llama, tmp_path, rows, holds):
    import json

    from transformers import AutoTokenizer

    from loratool.eval.run import build_eval_data, rows_in
    from loratool.generate.target import resolve_target

    path = tmp_path / "held-out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rows_in(path) == holds
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = build_eval_data(resolve_target(tiny_llama), path, tokenizer)
    references = sorted(
        tokenizer.decode(p.reference_ids, skip_special_tokens=True).strip() for p in data.prompts
    )
    assert references == ["bye now", "hi there"]  # the desirable answers only, as DPO / KTO runs are judged
