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
