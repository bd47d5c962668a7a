"""The llama.cpp harness itself: a missing node skips locally and fails where required, and
the greedy harness is pinned.

Each test exports a checkpoint with `write_gguf`, greedy-decodes it in llama.cpp and in transformers from
the Hugging Face checkpoint, and compares: the prompt's tokenization (llama.cpp's own tokenizer built from
the GGUF metadata, BOS included where the GGUF asks for it, against `tokenizer(text)`) and the greedy tokens.

Why margin-aware: both runtimes compute in floating point with different kernels, so where transformers'
two best logits are closer than the rounding error a flip is legitimate, and after it the two runs
continue from different contexts. So llama.cpp's tokens are fed back through transformers (teacher
forcing) and each must be within `tol` logits of transformers' best at its position; up to the first
difference the runs must match token for token, and that difference, if any, must be such a near-tie.
Where no step of the path is that close (top-2 gap above 2 x tol everywhere) the runs must be identical.
The tolerances are far above the rounding error (f32: ~1e-5 logits; f16 weights: ~0.03 on a 135M model)
and far below what a real export bug does (a wrong RoPE layout or norm epsilon moves logits by whole
units).

Runtime (2 busy CPU cores): 5-10 s per tiny architecture (~3 s of it llama.cpp loading and decoding); ~37 s
for SmolLM2-135M (24 s of it turning the Q4_1 GGUF into a Hugging Face checkpoint, once per session). The
first run installs node-llama-cpp (6-12 s).
"""

from __future__ import annotations

import pytest

from conftest import REPO
from llama_cpp_runtime import install_runtime, runtime_required

# --- the runtime itself ----------------------------------------------------------------------------------


def test_missing_node_skips_locally_and_fails_where_required(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LORATOOL_REQUIRE_LLAMA_CPP", raising=False)
    with pytest.raises(pytest.skip.Exception, match="node is not on PATH"):
        install_runtime()
    for name, value in (("CI", "true"), ("LORATOOL_REQUIRE_LLAMA_CPP", "1")):
        monkeypatch.setenv(name, value)
        assert runtime_required()
        with pytest.raises(pytest.fail.Exception, match="runtime required .* but node is not on PATH"):
            install_runtime()
        monkeypatch.delenv(name)
    monkeypatch.setenv("CI", "false")
    assert not runtime_required()


def test_greedy_harness_is_pinned():
    """The harness must never fetch or build llama.cpp: exact versions, and the no-download options."""
    import json

    harness = REPO / "tests" / "llama_cpp"
    deps = json.loads((harness / "package.json").read_text())["dependencies"]
    assert deps == {"node-llama-cpp": "3.22.1", "@node-llama-cpp/linux-x64": "3.22.1"}
    lock = json.loads((harness / "package-lock.json").read_text())["packages"]
    assert lock["node_modules/node-llama-cpp"]["version"] == "3.22.1"
    script = (harness / "greedy.mjs").read_text()
    for option in ('build: "never"', "skipDownload: true", "gpu: false", "temperature: 0"):
        assert option in script
