"""The GPU benchmark script's CPU checks: its arguments, the model shapes, and its refusal to run
without a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO

# --- the benchmark script, on the CPU ---------------------------------------------------------------------


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_arguments_and_shapes():
    bench = load_bench()
    args = bench.parse_args([])
    assert args.models.split(",") == ["llama2-7b", "llama3.1-8b"] and args.max_length == 2048
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "llama2-70b"])
    # The shapes are the real models' (parameter count of the dense Llama formula).
    s = bench.SHAPES["llama2-7b"]
    head = s["hidden_size"] // s["num_heads"]
    per_layer = (
        2 * s["hidden_size"] ** 2
        + 2 * s["hidden_size"] * s["num_kv_heads"] * head
        + 3 * s["hidden_size"] * s["intermediate_size"]
    )
    total = s["num_layers"] * per_layer + 2 * s["vocab_size"] * s["hidden_size"]
    assert 6.6e9 < total < 6.8e9


def test_bench_gpu_refuses_to_run_without_a_gpu_unless_cpu_smoke(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--cpu-smoke"):
        bench.main([])
