"""Folding the active adapter into the base weights for generation (loratool.generate.fold): the folded
adapter generates what the unfolded one does, unfolding gives the base its weights back, and what cannot
be folded exactly (4-bit bases, aLoRA, tied weights) stays unfolded with its reason."""

from __future__ import annotations

import pytest
import torch

from helpers.generate import PROMPT, reference_answer

# a fixture, imported for pytest to find in this module
from helpers.generate import adapters as adapters
from loratool.generate.fold import Folding, folded, refusal
from loratool.generate.run import BASE, Sampling, load_adapters, render_for, run_generate
from loratool.generate.target import resolve_target

PROMPTS = [PROMPT, "Name three colours.", "What is the capital of France?", "Count to five."]
NEW = 16


def _answers(loaded, name: str) -> list[list[int]]:
    """Greedy answers of the active model to PROMPTS, each prompted as `name` is."""
    return [
        loaded.generate(
            [render_for(loaded, name, [{"role": "user", "content": p}], None, None)], Sampling(NEW)
        )[0]
        for p in PROMPTS
    ]


def _q_proj(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight


def test_folded_adapter_generates_as_unfolded_and_unfolding_restores_the_base(tiny_llama, adapters):
    lines: list[str] = []
    loaded = load_adapters(
        resolve_target(tiny_llama), [f"one={adapters['one']}"], lines.append, warm_up=False
    )
    assert loaded.folding is None  # not asked to fold: what serve gets
    weight = _q_proj(loaded.model)
    before = weight.detach().clone()
    unfolded = _answers(loaded, "one")
    loaded.use(BASE)
    base = _answers(loaded, "one")
    assert base != unfolded  # the adapter changes the answers, so equal answers below mean something

    loaded.folding = Folding(loaded.model, quantized=False, log=lines.append)
    loaded.use("one")
    assert loaded.folding.folded == "one" and not torch.equal(weight, before)  # W + scale * B @ A
    assert _answers(loaded, "one") == unfolded
    assert lines[-1] == "adapter one folded into the base weights for generation (" + lines[-1].split("(")[1]

    loaded.use(BASE)  # unfolds
    assert loaded.folding.folded is None
    torch.testing.assert_close(weight, before, rtol=0, atol=1e-6)
    assert _answers(loaded, "one") == base


def test_only_the_active_adapter_is_folded_and_a_switch_refolds(tiny_llama, adapters):
    options = [f"one={adapters['one']}", f"two={adapters['two']}"]
    plain = load_adapters(resolve_target(tiny_llama), options, lambda _: None, warm_up=False)
    expected = {}
    for name in ("one", "two"):
        plain.use(name)
        expected[name] = _answers(plain, name)

    lines: list[str] = []
    loaded = load_adapters(resolve_target(tiny_llama), options, lines.append, warm_up=False, fold=True)
    for name in ("one", "two", "one", BASE, "two"):
        loaded.use(name)
        assert loaded.folding.folded == (None if name == BASE else name)
        if name != BASE:
            assert _answers(loaded, name) == expected[name]
    assert sum("folded into the base weights" in line for line in lines) == 2  # said once per adapter


def test_generate_folds_and_still_answers_as_peft_and_as_the_base(tiny_llama, adapters):
    lines: list[str] = []
    records = run_generate(
        tiny_llama,
        prompts=[PROMPT, f"@base: {PROMPT}", PROMPT],
        adapters=[f"one={adapters['one']}"],
        max_new_tokens=12,
        log=lines.append,
    )
    tuned = reference_answer(tiny_llama, adapters["one"], PROMPT, 12)  # PEFT's own, unfolded
    assert [r["answer"] for r in records] == [tuned, reference_answer(tiny_llama, None, PROMPT, 12), tuned]
    assert sum(line.startswith("adapter one folded into the base weights") for line in lines) == 1


def test_chat_switches_to_the_base_and_back_with_the_adapter_folded(tiny_llama, adapters, monkeypatch):
    import io

    from loratool.generate.run import run_chat

    script = f"{PROMPT}\n/reset\n/adapter base\n{PROMPT}\n/reset\n/adapter one\n{PROMPT}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    lines: list[str] = []
    written: list[str] = []
    run_chat(tiny_llama, adapters=[f"one={adapters['one']}"], max_new_tokens=12, log=lines.append,
             write=written.append)  # fmt: skip
    text = "".join(written)
    tuned, base = (reference_answer(tiny_llama, a, PROMPT, 12) for a in (adapters["one"], None))
    assert tuned != base
    first = text.index(tuned)  # the answers streamed, in order: the adapter's, the base's, the adapter's
    second = text.index(base, first + len(tuned))
    assert tuned in text[second + len(base) :]
    assert sum("folded into the base weights" in line for line in lines) == 1


def _peft_model(base_dir, config, seed: int = 0, dtype=torch.float32):
    """A PEFT model whose every adapter parameter is random and non-zero (a fresh B would be zero)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("lora_", "vera_lambda", "lora_magnitude")):
                param.add_(0.2 * torch.randn_like(param))
    return model


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)


def _configs():
    from peft import AdaLoraConfig, LoraConfig, VeraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
        "adalora": AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "v_proj"]),
        "vera": VeraConfig(r=8, target_modules=["q_proj", "v_proj"], d_initial=0.5),
    }


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "vera"])
def test_each_kind_that_peft_merges_folds_exactly(tiny_llama, kind):
    model = _peft_model(tiny_llama, _configs()[kind])
    assert refusal(model, "default", quantized=False) is None
    ids = torch.tensor([[1, 5, 9, 44, 7, 300, 12], [1, 8, 8, 17, 200, 3, 90]])
    weight = _q_proj(model)
    before = weight.detach().clone()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    unfolded = _greedy(model, ids)
    with model.disable_adapter():
        base = _greedy(model, ids)
    assert not torch.equal(base, unfolded)

    with folded(model, quantized=False, log=lambda _: None):
        assert not torch.equal(weight, before)
        with torch.inference_mode():
            torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=1e-5)
        assert torch.equal(_greedy(model, ids), unfolded)
    torch.testing.assert_close(weight, before, rtol=0, atol=1e-6)
    with model.disable_adapter():
        assert torch.equal(_greedy(model, ids), base)


@pytest.mark.parametrize(
    ("dtype", "dora"), [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)]
)
def test_half_precision_weights_come_back_bit_for_bit(tiny_llama, dtype, dora):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora)
    model = _peft_model(tiny_llama, config, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    folding = Folding(model, quantized=False, log=lambda _: None)
    for _ in range(5):  # PEFT's W + D - D alone drifts further at every switch in half precision
        folding.fold("default", "default")
        assert folding.folded == "default"
        folding.unfold()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


def test_what_does_not_fold_exactly_stays_unfolded_with_its_reason(tiny_llama):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = _peft_model(tiny_llama, lora)
    assert "4-bit" in refusal(model, "default", quantized=True)

    lines: list[str] = []
    folding = Folding(model, quantized=True, log=lines.append)
    weight = _q_proj(model)
    before = weight.detach().clone()
    folding.fold("default", "calm")
    assert folding.folded is None and torch.equal(weight, before)
    assert lines == [
        "note: adapter calm is not folded for generation (the base is 4-bit: folding would round the adapter "
        "to 4 bits): it answers through PEFT's LoRA layers, slower than the base"
    ]

    alora = _peft_model(
        tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 9])
    )
    assert "ALora" in refusal(alora, "default", quantized=False)

    from peft import get_peft_model

    tied = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # as a checkpoint with tie_word_embeddings loads
    tied = get_peft_model(tied, LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    reason = refusal(tied, "default", quantized=False)
    assert "lm_head shares its weight with" in reason and "embed_tokens" in reason
