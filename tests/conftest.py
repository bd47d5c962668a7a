"""Shared fixtures: offline mode, tiny models built once per session, recipe writing, CLI running; the test
tiers (a marker per folder, the slow tier's timeout, the unit tier's guard against training)."""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Tests never touch the network: anything that tries to reach the hub fails at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# tests/helpers/ holds what tests split across tiers share, assertions included: pytest rewrites them like
# test modules so that a failing assert there shows its values too.
pytest.register_assert_rewrite("helpers", *sorted(p.stem for p in TESTS.glob("*_helpers.py")))
# What makes a run.json loratool's own (outputs.py); fixtures that write a minimal run.json start from it.
LORATOOL_RUN = {"loratool_output": {"kind": "run", "format": 1}, "files": ["run.json"]}
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loratool.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    from loratool.model.tiny import build_tiny_model

    built: dict[tuple, Path] = {}

    def make(arch: str = "llama", **kwargs: Any) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            name = f"tiny-{arch}-{len(built)}"
            built[key] = build_tiny_model(tmp_path_factory.mktemp("models") / name, arch=arch, **kwargs)
        return built[key]

    return make


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def smoke_recipe(
    base_model: Path | str, data_path: Path | str, output_dir: Path | str, **sections: Any
) -> dict:
    """A small, fast recipe on a tiny model; sections given here update the defaults key by key."""
    recipe: dict[str, Any] = {
        "base_model": str(base_model),
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data_path), "format": "alpaca"}], "max_length": 64},
        "training": {
            "output_dir": str(output_dir),
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "logging_steps": 2,
            "save_steps": 6,
            "seed": 0,
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def random_adapter(
    base: Path, out: Path, seed: int = 0, *, r: int = 4, scale: float = 0.1, **lora: Any
) -> Path:
    """A PEFT LoRA adapter (lora_alpha = 2r) whose trainable weights all get random noise of size `scale`
    (B, DoRA magnitudes, saved module copies), so that every part of it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, lora_alpha=2 * r, **lora)
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn_like(param))
    model.save_pretrained(out)
    return out


@pytest.fixture()
def smoke_data() -> Path:
    return REPO / "recipes" / "data" / "smoke.jsonl"


# --- both 4-bit CPU kernel paths on any CPU (loratool/model/bnb_cpu.py) ---------------------------------------


def fused_cpu_kernel_stand_in(A, B, out=None, state=None):
    """bitsandbytes' fused AVX512-BF16 CPU kernel (`F.gemv_4bit` on a weight that `Linear4bit.forward`
    repacked), played on any CPU: the same 4-bit weight, computed the way that kernel computes it — input,
    block absmax and result in bfloat16, whatever the compute dtype — and, like it, without a gradient."""
    import copy

    import torch
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit

    absmax = state.absmax  # repacking cast it to bfloat16 and laid it out (K / blocksize, N)
    codes, plain = _convert_weight_packed_for_cpu_inverse(B.clone(), copy.deepcopy(state))
    plain.absmax, plain.nested, plain.dtype = absmax.T.reshape(-1).float(), False, torch.bfloat16
    with torch.no_grad():
        weight = dequantize_4bit(codes, plain)  # bfloat16 codes x bfloat16 absmax
        result = torch.nn.functional.linear(A.to(torch.bfloat16), weight).to(A.dtype)
    if out is not None:
        return out.copy_(result)
    return result


def simulate_avx512bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as on a CPU with AVX512-BF16 (a recent AMD EPYC, say): Linear4bit layers built from now
    on take bitsandbytes' fused CPU kernel in eval mode, played by `fused_cpu_kernel_stand_in`. The choice
    stays bitsandbytes' own: `Linear4bit.__init__` asks `has_avx512bf16()`, `forward` repacks the weight,
    `matmul_4bit` calls `F.gemv_4bit` on it."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bitsandbytes.functional, "gemv_4bit", fused_cpu_kernel_stand_in)


@pytest.fixture()
def simulated_avx512bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_avx512bf16(monkeypatch)


@pytest.fixture(params=["this CPU", "AVX512-BF16 CPU"])
def any_cpu(request) -> str:
    """Run the test twice: on this CPU's own 4-bit kernel path, and as on a CPU with AVX512-BF16."""
    if request.param == "AVX512-BF16 CPU":
        request.getfixturevalue("simulated_avx512bf16")
    return request.param


# --- the tiers: tests/<tier>/... gets the marker <tier> -------------------------------------------------------

TIERS = ("unit", "cli", "smoke", "slow", "gpu")
# Per test, over the default `timeout` in pyproject.toml: the demo trains SmolLM2 for ~4 minutes on 2 CPU
# cores, and the first llama.cpp test installs node-llama-cpp.
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(TESTS).parts if item.path.is_relative_to(TESTS) else ()
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        if tier:
            item.add_marker(tier)
        if (tier == "slow" or item.get_closest_marker("slow")) and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


# --- the unit tier trains nothing ----------------------------------------------------------------------------
# (here and not in tests/unit/conftest.py: a second conftest.py would take the module name `conftest` that
# the tests import their shared helpers from)

UNIT_TIER = TESTS / "unit"
NO_TRAINING = "the unit tier trains nothing: move this test to tests/smoke/"
TRAINER_MODULE = "transformers.trainer"


def refuse_to_train(self, *args, **kwargs):
    # a clean failure where nothing catches it; `loratool train` reports it as "training failed: Failed:
    # the unit tier trains nothing: ...", which fails the test just as well
    pytest.fail(NO_TRAINING, pytrace=False)


class PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """Patches Trainer.train the moment a test imports transformers.trainer: importing it takes seconds, so
    the guard does not do it for the many unit tests that never need it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch = monkeypatch

    def find_spec(self, name, path, target=None):
        if name != TRAINER_MODULE:
            return None
        for finder in sys.meta_path:
            find_spec = None if finder is self else getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.monkeypatch.setattr(module.Trainer, "train", refuse_to_train)

        spec.loader.exec_module = exec_and_patch
        return spec


@pytest.fixture(autouse=True)
def unit_tier_trains_nothing(request: pytest.FixtureRequest) -> None:
    if not request.node.path.is_relative_to(UNIT_TIER):
        return
    monkeypatch = request.getfixturevalue("monkeypatch")
    module = sys.modules.get(TRAINER_MODULE)
    if module is not None:
        monkeypatch.setattr(module.Trainer, "train", refuse_to_train)
        return
    finder = PatchTrainerOnImport(monkeypatch)
    sys.meta_path.insert(0, finder)
    request.addfinalizer(lambda: sys.meta_path.remove(finder))
