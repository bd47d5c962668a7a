"""`loratool merge` with several adapters: the combination equals PEFT's add_weighted_adapter, the merge
of the combined adapter equals PEFT's merge_and_unload of it, and one clean error per user mistake —
through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import LORATOOL_RUN
from conftest import random_adapter as peft_adapter
from helpers.merge import assert_same_weights, merged_weights
from loratool.cli import app
from loratool.model.fingerprint import file_sha256


def merge_cli(*args: str | Path):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def failed(result, message: str) -> str:
    assert result.exit_code == 1, result.output
    assert f"error: {message}" in result.output, result.output
    assert "hint: " in result.output, result.output
    return result.output


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    targets = ["q_proj", "v_proj", "down_proj"]
    return {
        "a": peft_adapter(tiny_llama, tmp / "a", seed=1, target_modules=targets),
        "b": peft_adapter(tiny_llama, tmp / "b", seed=2, target_modules=["q_proj", "k_proj"]),
        "r8": peft_adapter(tiny_llama, tmp / "r8", seed=3, target_modules=targets, r=8),
    }


def peft_combined(base: Path, dirs: list[Path], weights: list[float], method: str, **kwargs):
    """PEFT directly: load both adapters, add_weighted_adapter, return (peft model, merged state dict)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dirs[0], adapter_name="x0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"x{i}")
    names = [f"x{i}" for i in range(len(dirs))]
    model.add_weighted_adapter(names, weights, "mix", combination_type=method, **kwargs)
    model.set_adapter("mix")
    return model.merge_and_unload(adapter_names=["mix"]).state_dict()


@pytest.mark.parametrize(("method", "names"), [("linear", ["a", "b"]), ("cat", ["a", "r8"])])
def test_combined_merge_equals_peft(tmp_path, tiny_llama, adapters, method, names):
    dirs = [adapters[n] for n in names]
    result = merge_cli(
        "--adapter", dirs[0], "--adapter", dirs[1], "--weights", "0.7,0.3", "--method", method,
        "--adapter-output", tmp_path / "combined", "--output", tmp_path / "merged", "--no-verify",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_same_weights(
        merged_weights(tmp_path / "merged"), peft_combined(tiny_llama, dirs, [0.7, 0.3], method)
    )
    record = json.loads((tmp_path / "combined" / "combine.json").read_text())
    assert record["method"] == method and record["weights"] == [0.7, 0.3] and record["density"] is None
    assert [a["sha256"] for a in record["adapters"]] == [
        file_sha256(d / "adapter_model.safetensors") for d in dirs
    ]
    assert record["loratool_version"]
    config = json.loads((tmp_path / "combined" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)
    assert config["r"] == (4 if method == "linear" else 12)


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_ties_and_dare_combine_merge_and_verify(tmp_path, adapters, method):
    # dare drops entries at random: the run is checked end to end (record, verification), not pinned.
    result = merge_cli(
        "--adapter", adapters["a"], "--adapter", adapters["b"], "--method", method, "--density", "0.4",
        "--adapter-output", tmp_path / "combined", "--output", tmp_path / "merged",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    combined = json.loads((tmp_path / "combined" / "combine.json").read_text())
    assert combined["method"] == method and combined["density"] == 0.4 and combined["weights"] == [0.5, 0.5]
    merged = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert merged["status"] == "complete" and merged["verification"]["passed"]


def test_adapter_only_writes_a_loadable_adapter(tmp_path, tiny_llama, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "combined"
    result = merge_cli(
        "--adapter", adapters["a"], "--adapter", adapters["b"], "--adapter-output", out, "--adapter-only"
    )
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors", "combine.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "merged").exists() and not list(tmp_path.glob("*.partial-*"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    assert model.peft_config["default"].r == 4
    # An existing output is refused without --overwrite, replaced with it.
    again = [
        "--adapter",
        adapters["a"],
        "--adapter",
        adapters["b"],
        "--adapter-output",
        out,
        "--adapter-only",
    ]
    failed(merge_cli(*again), f"output directory {out} already exists")
    assert merge_cli(*again, "--overwrite").exit_code == 0


def test_default_output_is_next_to_the_first_adapter(tmp_path, tiny_llama):
    a = peft_adapter(tiny_llama, tmp_path / "a", seed=4, target_modules=["q_proj"])
    b = peft_adapter(tiny_llama, tmp_path / "b", seed=5, target_modules=["q_proj"])
    result = merge_cli("--adapter", a, "--adapter", b, "--method", "cat", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "combined-cat" / "combine.json").is_file()
    assert (tmp_path / "combined-cat" / "merged" / "merge.json").is_file()


# --- errors --------------------------------------------------------------------------------------------


def test_linear_refuses_adapters_of_different_rank(adapters):
    out = failed(
        merge_cli("--adapter", adapters["a"], "--adapter", adapters["r8"]), "--method linear needs adapters"
    )
    assert "a: r=4, r8: r=8" in out and "--method cat" in out


def test_weights_count_must_match_adapters(adapters):
    failed(
        merge_cli("--adapter", adapters["a"], "--adapter", adapters["b"], "--weights", "0.2,0.3,0.5"),
        "--weights has 3 value(s) for 2 adapters",
    )


def test_unknown_method_is_refused_by_the_cli(adapters):
    result = merge_cli("--adapter", adapters["a"], "--adapter", adapters["b"], "--method", "average")
    assert result.exit_code == 2 and "average" in result.output


def test_combining_options_need_several_adapters(adapters):
    failed(merge_cli("--adapter", adapters["a"], "--weights", "1.0"), "--weights: only used when combining")


def test_adapters_on_different_bases_are_refused(tmp_path, adapters):
    other = shutil.copytree(adapters["b"], tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    out = failed(
        merge_cli("--adapter", adapters["a"], "--adapter", other, "--adapter-only"),
        "the adapters were trained on different base models",
    )
    assert "someone/another-model" in out and "--force" in out


def test_different_base_fingerprints_are_refused(tmp_path, adapters):
    dirs = []
    for name, fingerprint in (("x", "sha256-sampled:aaa"), ("y", "sha256-sampled:bbb")):
        d = shutil.copytree(adapters["a"], tmp_path / name)
        (d / "run.json").write_text(json.dumps({**LORATOOL_RUN, "base_model": {"fingerprint": fingerprint}}))
        dirs.append(d)
    failed(
        merge_cli("--adapter", dirs[0], "--adapter", dirs[1], "--adapter-only"),
        "the adapters were trained on different base models (base fingerprint (run.json)",
    )


def test_target_modules_given_differently_surface_peft_error(tmp_path, tiny_llama, adapters):
    regex = peft_adapter(tiny_llama, tmp_path / "regex", seed=6, target_modules=r".*\.q_proj")
    out = failed(
        merge_cli(
            "--adapter",
            adapters["a"],
            "--adapter",
            regex,
            "--adapter-only",
            "--adapter-output",
            tmp_path / "c",
        ),
        "PEFT cannot combine these adapters with --method linear",
    )
    assert "target modules" in out
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("c.partial-*"))


def test_qlora_adapters_are_refused(tmp_path, adapters):
    qlora = shutil.copytree(adapters["a"], tmp_path / "qlora")
    (qlora / "run.json").write_text(json.dumps({**LORATOOL_RUN, "base_model": {"quantization": "4bit"}}))
    out = failed(
        merge_cli("--adapter", qlora, "--adapter", adapters["b"]),
        f"{qlora} was trained on a 4-bit (QLoRA) base",
    )
    assert "merge them one by one" in out


def test_equal_weights_by_default(tmp_path, tiny_llama, adapters):
    dirs = [adapters["a"], adapters["b"]]
    args = ["--adapter", dirs[0], "--adapter", dirs[1], "--output", tmp_path / "merged", "--no-verify"]
    assert merge_cli(*args, "--adapter-output", tmp_path / "c").exit_code == 0
    torch.testing.assert_close(
        merged_weights(tmp_path / "merged")["model.layers.0.self_attn.q_proj.weight"],
        peft_combined(tiny_llama, dirs, [0.5, 0.5], "linear")["model.layers.0.self_attn.q_proj.weight"],
        atol=1e-6,
        rtol=0,
    )
