"""What the build_datasets tests of several tiers share: the tokenizer, the build call and the
row accounting check."""

from __future__ import annotations

import pytest

from helpers.data import chatml_tokenizer, section
from loratool.data import DataSummary, PreparedData, build_datasets


@pytest.fixture()
def tok():
    return chatml_tokenizer()


def build(tok, *sources, seed: int = 0, **fields) -> PreparedData:
    return build_datasets(section(*sources, **fields), tok, seed=seed)


def assert_rows_accounted_for(summary: DataSummary) -> None:
    for split in (summary.train, summary.validation):
        for s in split.sources if split else []:
            assert s.read == s.used + s.held_out + sum(s.dropped.values()), s
