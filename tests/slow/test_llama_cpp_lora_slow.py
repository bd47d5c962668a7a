"""`--format gguf-lora` in a real llama.cpp (node-llama-cpp's prebuilt CPU binary): the base GGUF with the
adapter applied (`--lora`) decodes greedily exactly like the merged model's GGUF, on llama (Q/K rows
permuted for RoPE, in the base and in lora_b), qwen2 (no permutation), gemma2 (norms stored as 1 + w
in the base, which the adapter does not touch) and phi3 (fused qkv_proj and gate_up_proj).

Both runs are llama.cpp on f32 files, so they differ only by the order of the float32 sums (the adapter
adds B @ (A @ x) where the merge has (W + B @ A) @ x): well under a logit, where a wrong permutation, a
missed scaling or a transposed factor moves logits by whole units. The adapter's noise is large enough that
it changes the greedy tokens, so a file llama.cpp loaded but did not apply would fail too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import random_adapter
from llama_cpp_runtime import install_runtime, run_greedy

quiet = lambda _: None  # noqa: E731
IDS = [1, 17, 42, 99, 7, 250, 3, 64]


@pytest.fixture(scope="session")
def llama_runtime() -> Path:
    return install_runtime()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_gguf_lora_on_the_base_decodes_like_the_merged_gguf(
    arch, tiny_model_factory, llama_runtime, tmp_path
):
    from loratool.export import run_export
    from loratool.export.gguf import write_gguf
    from loratool.merge import run_merge

    base = tiny_model_factory(arch)
    adapter = random_adapter(base, tmp_path / "run", r=4, scale=0.5, target_modules="all-linear")
    exported = run_export(adapter, format="gguf-lora", outtype="f32", base=str(base), log=quiet)
    lora = exported / "run.lora.f32.gguf"
    base_gguf = write_gguf(base, tmp_path / "base.f32.gguf", "f32", log=quiet, name="tiny")
    merged = run_merge(adapter, base=str(base), output=tmp_path / "merged", dtype="float32", log=quiet)
    merged_gguf = write_gguf(merged, tmp_path / "merged.f32.gguf", "f32", log=quiet, name="tiny")

    with_lora = run_greedy(llama_runtime, base_gguf, ids=IDS, n=16, lora=lora)
    want = run_greedy(llama_runtime, merged_gguf, ids=IDS, n=16)
    plain = run_greedy(llama_runtime, base_gguf, ids=IDS, n=16)
    assert with_lora.generated == want.generated, (with_lora.generated, want.generated, with_lora.log)
    assert plain.generated != want.generated, "the adapter does not change this model's greedy tokens"
