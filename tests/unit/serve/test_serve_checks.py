"""What `loratool serve` refuses before loading anything: adapters the built-in engine cannot batch or vLLM
would not load (with the reason), adapter paths outside --adapter-dir, an exposed server without a key; and
the vLLM command it builds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from loratool.errors import LoratoolError
from loratool.generate.target import Target
from loratool.serve.http_errors import ApiError
from loratool.serve.run import check_exposure, engine_threads, is_loopback, leave_a_core
from loratool.serve.served import Served, builtin_problems
from loratool.serve.vllm import pick_engine, vllm_plan, vllm_refusals

MODULES = ("q_proj", "v_proj")


def fake_adapter(folder: Path, *, modules=MODULES, r: int = 8, **config) -> Path:
    """An adapter directory as PEFT saves one: adapter_config.json and LoRA tensors on `modules`."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    settings = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(modules),
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    tensors = {}
    for module in modules:
        where = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{where}.lora_A.weight"] = torch.zeros(r, 8)
        tensors[f"{where}.lora_B.weight"] = torch.zeros(8, r)
    if config.get("modules_to_save"):
        tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(4, 8)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture()
def llama_base(tmp_path: Path) -> Path:
    base = tmp_path / "tiny-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (base / "chat_template.jinja").write_text("{{ messages }}")
    return base


def test_the_builtin_engine_serves_lora_and_says_why_it_refuses_the_rest(tmp_path):
    assert builtin_problems(fake_adapter(tmp_path / "lora"), max_rank=64) == []
    refused = {
        "dora": ({"use_dora": True}, "DoRA"),
        "vera": ({"peft_type": "VERA"}, "VERA adapter"),
        "bias": ({"bias": "all"}, "bias terms"),
        "big": ({"r": 128}, "rank 128 is above this server's limit of 64"),
        "pattern": ({"rank_pattern": {"q_proj": 96}}, "rank 96"),
    }
    for name, (config, reason) in refused.items():
        problems = builtin_problems(fake_adapter(tmp_path / name, **config), max_rank=64)
        assert len(problems) == 1 and reason in problems[0], (name, problems)
    assert builtin_problems(tmp_path / "big", max_rank=128) == []


def test_vllm_refusals_name_each_reason(tmp_path):
    adapters = {
        "ok": fake_adapter(tmp_path / "ok"),
        "dora": fake_adapter(tmp_path / "dora", use_dora=True),
        "saved": fake_adapter(tmp_path / "saved", modules_to_save=["lm_head"]),
        "odd": fake_adapter(tmp_path / "odd", modules=("q_proj", "router")),
        "big": fake_adapter(tmp_path / "big", r=32),
    }
    refusals = vllm_refusals(adapters, "llama", max_rank=16)
    assert "ok" not in refusals
    assert any("DoRA" in p for p in refusals["dora"])
    assert any("modules_to_save" in p for p in refusals["saved"])
    assert any("LoRA on router" in p for p in refusals["odd"])
    assert refusals["big"] == ["rank 32 is above --max-lora-rank 16"]
    assert "odd" not in vllm_refusals({"odd": adapters["odd"]}, None, None)  # unknown family: not checked


def test_vllm_command_serves_every_adapter_with_the_rank_it_needs(tmp_path, llama_base):
    adapters = {"one": fake_adapter(tmp_path / "one", r=8), "two": fake_adapter(tmp_path / "two", r=20)}
    plan = vllm_plan(Target("base", llama_base), adapters, host="127.0.0.1", port=8123, base_name="tiny-base",
                     max_rank=None, api_key="secret", log=lambda _: None)  # fmt: skip
    command = plan.command
    assert command[1:3] == ["serve", str(llama_base)]
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--served-model-name") + 1] == "tiny-base"
    assert "--enable-lora" in command
    at = command.index("--lora-modules")
    assert command[at + 1 : at + 3] == [
        f"one={adapters['one'].resolve()}",
        f"two={adapters['two'].resolve()}",
    ]
    assert command[command.index("--max-lora-rank") + 1] == "32"  # vLLM's smallest rank >= 20
    assert command[command.index("--max-loras") + 1] == "2"  # both adapters may share a batch
    assert "secret" not in plan.shown and plan.env == {"VLLM_API_KEY": "secret"}
    assert plan.shown.startswith(command[0]) and "--lora-modules one=" in plan.shown


def test_vllm_gets_the_adapters_chat_template_when_it_is_not_the_bases(tmp_path, llama_base):
    own = fake_adapter(tmp_path / "run")
    (own / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    plan = vllm_plan(Target("base", llama_base), {"run": own}, host="127.0.0.1", port=8000, base_name="b",
                     max_rank=None, api_key=None, log=lambda _: None)  # fmt: skip
    assert plan.command[plan.command.index("--chat-template") + 1] == str(
        (own / "chat_template.jinja").resolve()
    )
    assert plan.env == {}


def test_vllm_plan_refuses_with_every_reason_and_a_rank_vllm_does_not_take(tmp_path, llama_base):
    adapters = {"dora": fake_adapter(tmp_path / "dora", use_dora=True), "ok": fake_adapter(tmp_path / "ok")}
    target = Target("base", llama_base)
    with pytest.raises(LoratoolError, match="would refuse 1 of the adapters — dora: DoRA") as caught:
        vllm_plan(target, adapters, host="h", port=1, base_name="b", max_rank=None, api_key=None, log=print)
    assert "--engine builtin" in caught.value.hint
    with pytest.raises(LoratoolError, match="--max-lora-rank 17: vLLM takes one of 1, 8, 16"):
        vllm_plan(target, {}, host="h", port=1, base_name="b", max_rank=17, api_key=None, log=print)


def test_auto_picks_vllm_only_when_installed_with_a_gpu(monkeypatch):
    import loratool.serve.vllm as vllm

    monkeypatch.setattr(vllm, "vllm_installed", lambda: True)
    assert pick_engine("auto", gpu=lambda: True)[0] == "vllm"
    assert pick_engine("auto", gpu=lambda: False) == ("builtin", "auto: no CUDA GPU is present")
    monkeypatch.setattr(vllm, "vllm_installed", lambda: False)
    assert pick_engine("auto", gpu=lambda: True) == ("builtin", "auto: vLLM is not installed")
    assert (
        pick_engine("vllm", gpu=lambda: False)[0] == "vllm"
    )  # asked for: vllm_plan / exec_vllm say what is missing


def test_a_server_beyond_this_machine_needs_a_key_or_insecure():
    said: list[str] = []
    for host in ("127.0.0.1", "localhost", "::1"):
        assert is_loopback(host)
        check_exposure(host, None, False, said.append)
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(LoratoolError, match="reachable from other machines") as caught:
        check_exposure("0.0.0.0", None, False, said.append)
    assert "--api-key" in caught.value.hint and "--insecure" in caught.value.hint
    check_exposure("0.0.0.0", "key", False, said.append)
    assert said == []
    check_exposure("0.0.0.0", None, True, said.append)
    assert "without an API key" in said[0]


def test_runtime_loading_stays_inside_the_adapter_directory(tmp_path):
    allowed = tmp_path / "adapters"
    fake_adapter(allowed / "good")
    outside = fake_adapter(tmp_path / "elsewhere")
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    half = allowed / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (half / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    served = Served(target=Target("base", tmp_path), adapters=SimpleNamespace(names=["one"]), base_name="b",
                    max_rank=4, adapter_dir=allowed)  # fmt: skip

    def refusal(name: str, path: str) -> ApiError:
        with pytest.raises(ApiError) as caught:
            served.check_new(name, path)
        return caught.value

    for path in ("../elsewhere", str(outside), "link", "good/../../elsewhere"):
        error = refusal("new", path)
        assert error.status == 400 and error.code == "outside_adapter_dir", path
    assert "adapter_model.safetensors link outside" in refusal("new", "half").message
    assert refusal("new", "good").code == "adapter_refused"  # inside, but rank 8 > this server's 4
    assert refusal("one", "good").code == "name_taken"
    assert refusal("b", "good").code == "name_taken"
    assert refusal("a/b", "good").param == "lora_name"
    assert refusal("new", "missing").param == "lora_path"
    served.adapter_dir = None
    assert refusal("new", "good").status == 403


def test_an_adapter_that_fits_no_original_base_is_refused_by_both_engines(tmp_path):
    from conftest import LORATOOL_RUN

    folder = fake_adapter(tmp_path / "loftq")
    init = {"method": "loftq", "mergeable": False, "reason": "its base was quantized and dequantized"}
    (folder / "run.json").write_text(json.dumps({**LORATOOL_RUN, "status": "complete", "adapter_init": init}))
    problems = builtin_problems(folder, max_rank=64)
    assert problems == [
        "it was trained with a loftq init and fits no original base: its base was quantized and dequantized"
    ]
    assert vllm_refusals({"loftq": folder}, "llama", None)["loftq"] == problems


def test_on_a_cpu_the_engine_leaves_a_core_to_the_http_side(monkeypatch):
    assert leave_a_core(2)[0] == 1 and leave_a_core(16)[0] == 15 and leave_a_core(1)[0] == 1
    assert "one core left to the HTTP side" in leave_a_core(2)[1]
    assert "the only core" in leave_a_core(1)[1]

    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(4)
        assert engine_threads(None, "cuda:0") == "" and torch.get_num_threads() == 4  # a GPU computes
        assert engine_threads(None, "cpu").startswith("3 CPU threads of 4") and torch.get_num_threads() == 3
        assert engine_threads(2, "cpu") == "2 CPU threads (--threads)" and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert engine_threads(None, "cpu") == "2 CPU threads (OMP_NUM_THREADS)"  # the user's, kept
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
