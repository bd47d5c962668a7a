"""What the GGUF-base tests of several tiers share: a private conversion cache and a tiny GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Every test converts into its own cache: never the user's ~/.cache/loratool."""
    cache = tmp_path / "loratool-cache"
    monkeypatch.setenv("LORATOOL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_source(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_source, tmp_path_factory) -> Path:
    from loratool.export.gguf import write_gguf

    return write_gguf(tiny_source, tmp_path_factory.mktemp("gguf") / "tiny.gguf", outtype="f32", log=_quiet)


def _quiet(message: str) -> None:
    pass
