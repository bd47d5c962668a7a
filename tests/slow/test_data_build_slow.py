"""build_datasets on the real data files: every row accounted for."""

from __future__ import annotations

import pytest

from helpers.data import IGNORE, SHARED_DATA, source
from helpers.data_build import assert_rows_accounted_for, build

# a fixture, imported for pytest to find in this module
from helpers.data_build import tok as tok


@pytest.mark.slow
def test_real_datasets_build_and_account_for_every_row(tok):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared real-data folder is not beside the checkout ({SHARED_DATA})")
    sources = [
        source(SHARED_DATA / "alpaca" / "alpaca_en_demo.json"),
        source(SHARED_DATA / "sharegpt" / "glaive_toolcall_en_demo.json"),
        source(SHARED_DATA / "text" / "dolly_open_qa.jsonl"),
    ]
    data = build(tok, *sources, on_bad_row="skip", max_length=1024, validation=0.02, seed=7)
    print(data.summary.format())
    summary = data.summary
    assert [s.format for s in summary.train.sources] == ["alpaca", "sharegpt", "text"]
    assert [s.read for s in summary.train.sources] == [999, 300, 3742]
    assert_rows_accounted_for(summary)
    assert summary.train.rows + summary.validation.rows == sum(
        s.used + s.held_out for s in summary.train.sources
    )
    for labels in data.train["labels"][:500]:
        assert any(label != IGNORE for label in labels)
    assert 0 < summary.train.loss_fraction < 1
    # Tool calls are learned (assistant turns), tool results are not.
    glaive = summary.train.sources[1]
    assert glaive.used > 250 and glaive.loss_tokens < glaive.tokens
