"""A second architecture done right: Gemma-style models (a tokenizer that puts <bos> before text, turn markers
that are not ChatML's) train, prompt, stop, evaluate and export correctly. Tiny random gemma3_text models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import random_adapter
from helpers.data import IGNORE, loss_ids, write_jsonl
from loratool.data.formats import Conversation
from loratool.data.templates import (
    adds_bos,
    apply_chat_template_choice,
    end_of_turn,
    stop_texts,
    suggested_template,
)
from loratool.data.tokenize import encode
from loratool.errors import LoratoolError
from loratool.generate.run import Sampling, answer_text, generate_ids, render_prompt

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_factory) -> Path:
    """A gemma3_text base without a chat template (like Gemma-3-270m converted from its GGUF)."""
    return tiny_model_factory("gemma3_text", chat_template=False)


def gemma_tokenizer(gemma_dir: Path, template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    if template is not None:
        apply_chat_template_choice(tokenizer, template)
    return tokenizer


def test_the_tiny_gemma_tokenizer_adds_bos_and_has_no_chatml_tokens(gemma_dir):
    tokenizer = gemma_tokenizer(gemma_dir)
    assert json.loads((gemma_dir / "config.json").read_text())["model_type"] == "gemma3_text"
    assert tokenizer.bos_token == "<bos>" and tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    assert adds_bos(tokenizer)
    vocab = tokenizer.get_vocab()
    assert "<|im_end|>" not in vocab and "<|im_start|>" not in vocab and "<end_of_turn>" in vocab


# --- BOS -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_training_rows_start_with_bos_exactly_once(gemma_dir, template):
    tokenizer = gemma_tokenizer(gemma_dir, template)
    ids, labels = encode(Conversation(CONVERSATION), tokenizer, completion_only_loss=True)
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # chatml: put first; gemma: the template's own, not doubled
    assert labels[0] == IGNORE
    end = "<|im_end|>\n" if template == "chatml" else "<end_of_turn>\n"
    assert tokenizer.decode(loss_ids(ids, labels)) == "Paris." + end  # the masks moved with the BOS


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_generation_prompts_start_with_bos_like_training_rows(gemma_dir, template):
    tokenizer = gemma_tokenizer(gemma_dir, template)
    prompt = render_prompt(tokenizer, CONVERSATION[:1])
    ids, labels = encode(Conversation(CONVERSATION), tokenizer, completion_only_loss=True)
    assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert ids[:first_learned] == prompt  # the model is prompted with exactly what it was trained on


def test_a_tokenizer_without_bos_gets_none(tiny_model_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("gemma3_text", chat_template=False))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.backend_tokenizer.post_processor = None  # now tokenizer(text) adds nothing
    assert not adds_bos(tokenizer)
    ids, _ = encode(Conversation(CONVERSATION), tokenizer, completion_only_loss=True)
    assert tokenizer.bos_token_id not in ids


# --- which template fits -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "gemma3", "gemma"])
def test_the_missing_template_hint_names_gemma_for_gemma_models(gemma_dir, tmp_path, model_type):
    model = tmp_path / "base"
    shutil.copytree(gemma_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    tokenizer = gemma_tokenizer(model)
    with pytest.raises(LoratoolError) as err:
        apply_chat_template_choice(tokenizer, None)
    assert "has no chat template" in err.value.message
    assert err.value.hint.startswith(
        f"set data.chat_template: gemma (the chat format of {model_type} models)"
    )
    assert "chatml" in err.value.hint  # the others are still named


def test_the_hint_follows_the_family_or_the_vocabulary(tiny_model_factory, gemma_dir):
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(tiny_model_factory("qwen2", chat_template=False))
    assert suggested_template(qwen)[0] == "chatml"
    mistral = AutoTokenizer.from_pretrained(tiny_model_factory("mistral", chat_template=False))
    assert suggested_template(mistral)[0] == "mistral"
    no_config = gemma_tokenizer(gemma_dir)
    no_config.name_or_path = ""  # family unknown: the vocabulary has <start_of_turn>/<end_of_turn>
    assert suggested_template(no_config)[0] == "gemma"


# --- the end of a turn, as a token or as text ----------------------------------------------------------


def test_end_of_turn_is_a_token_with_gemma_and_text_with_chatml_on_gemma(gemma_dir):
    gemma = gemma_tokenizer(gemma_dir, "gemma")
    end = end_of_turn(gemma)
    assert end is not None and end.text == "<end_of_turn>"
    assert end.token_id == gemma.convert_tokens_to_ids("<end_of_turn>") and stop_texts(gemma) == []
    chatml = gemma_tokenizer(gemma_dir, "chatml")
    end = end_of_turn(chatml)
    assert end is not None and end.text == "<|im_end|>" and end.token_id is None
    assert stop_texts(chatml) == ["<|im_end|>"]


def scripted(model, tokenizer, text: str):
    """Make `model` (batch 1) answer `text` token by token, whatever the prompt, by pinning the logits of each
    step: the tiny model's weights are random, so this is how it "says" a given answer."""
    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    forward, step = model.forward, {"n": 0}

    def pinned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs.get("use_cache") is False:  # a loss pass (eval's heldout_loss), not a generation step
            return out
        token = script[min(step["n"], len(script) - 1)]
        step["n"] += 1
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        logits[..., token] = 1e4
        out.logits = torch.cat([out.logits[:, :-1], logits], dim=1)
        return out

    model.forward = pinned
    return model


def test_generation_stops_on_the_end_of_turn_text_and_the_answer_is_cut_before_it(gemma_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = gemma_tokenizer(gemma_dir, "chatml")
    prompt = render_prompt(tokenizer, CONVERSATION[:1])
    answer = "Paris.<|im_end|>\nThe quick brown fox jumps over the lazy dog again and again"
    sampling, pad, eos = Sampling(max_new_tokens=40), tokenizer.pad_token_id, [tokenizer.eos_token_id]

    model = scripted(AutoModelForCausalLM.from_pretrained(gemma_dir).eval(), tokenizer, answer)
    runs_on = generate_ids(model, [prompt], sampling, pad_id=pad, stop_ids=eos)[0]
    assert len(runs_on) == 40  # with EOS alone nothing stops it: the eval answers

    model = scripted(AutoModelForCausalLM.from_pretrained(gemma_dir).eval(), tokenizer, answer)
    texts = stop_texts(tokenizer)
    ids = generate_ids(
        model, [prompt], sampling, pad_id=pad, stop_ids=eos, stop_texts=texts, tokenizer=tokenizer
    )[0]
    text = tokenizer.decode(ids)
    assert len(ids) < 15 and text.startswith("Paris.") and "<|im_end|>" in text and "fox" not in text
    assert answer_text(tokenizer, ids, texts) == "Paris."


def test_eval_strips_the_end_of_turn_text_from_answers_and_references(gemma_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from loratool.eval.run import build_eval_data, evaluate_model
    from loratool.generate.target import Loaded, resolve_target

    tokenizer = gemma_tokenizer(gemma_dir, "chatml")
    data = write_jsonl(tmp_path / "qa.jsonl", [{"messages": CONVERSATION}])
    texts, eos = stop_texts(tokenizer), [tokenizer.eos_token_id]
    eval_data = build_eval_data(resolve_target(gemma_dir), data, tokenizer, stop_ids=eos, stop_texts=texts)
    assert eval_data.details["truncated_references"] == 0  # the reference ends the turn, as text
    assert eval_data.prompts[0].prompt_ids[0] == tokenizer.bos_token_id

    model = scripted(
        AutoModelForCausalLM.from_pretrained(gemma_dir).eval(), tokenizer, "Paris.<|im_end|>\nand on and on"
    )
    loaded = Loaded(model, tokenizer, "cpu", "float32", 2048, eos, 0.0, stop_texts=texts)
    result = evaluate_model(loaded, eval_data, Sampling(max_new_tokens=30), 1, lambda _: None, label="t")
    assert result.answers == ["Paris."]
    assert result.numbers["exact_match"] == 1.0 and result.numbers["mean_generated_tokens"] < 6
    # The ids rewards see stop before the end-of-turn text, as the answer does.
    assert tokenizer.decode(result.answer_ids[0]).strip() == "Paris."


def test_merged_generation_config_carries_the_end_of_turn_token_only_when_it_is_one_token(
    gemma_dir, tmp_path
):
    from loratool.merge import write_generation_config

    for template, expected in (("gemma", ["<eos>", "<end_of_turn>"]), ("chatml", ["<eos>"])):
        folder = tmp_path / template
        folder.mkdir()
        shutil.copy(gemma_dir / "config.json", folder / "config.json")
        tokenizer = gemma_tokenizer(gemma_dir, template)
        tokenizer.save_pretrained(folder)
        write_generation_config(gemma_dir, folder)
        eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
        eos = eos if isinstance(eos, list) else [eos]
        assert tokenizer.convert_ids_to_tokens(eos) == expected, template
        assert "stop_strings" not in json.loads((folder / "generation_config.json").read_text())


# --- export --------------------------------------------------------------------------------------------


def test_gguf_export_of_an_unsupported_architecture_fails_before_any_merge(gemma_dir, tmp_path, monkeypatch):
    import loratool.export.gguf
    import loratool.export.run
    import loratool.merge
    from loratool.export import run_export

    supported = {k: v for k, v in loratool.export.gguf.ARCHITECTURES.items() if not k.startswith("gemma")}
    for module in (loratool.export.gguf, loratool.export.run):  # each looks the table up in its own globals
        monkeypatch.setattr(module, "ARCHITECTURES", supported)
    merges = []
    monkeypatch.setattr(loratool.export.run, "run_merge", lambda *a, **k: merges.append(a))
    adapter = random_adapter(gemma_dir, tmp_path / "runs" / "adapter", target_modules="all-linear")
    with pytest.raises(LoratoolError) as err:
        run_export(adapter, output=tmp_path / "runs" / "out", log=lambda _: None)
    assert merges == []
    assert "model_type 'gemma3_text' cannot be exported to GGUF" in err.value.message
    assert "Gemma3ForCausalLM" in err.value.message and str(adapter) in err.value.message
    assert err.value.hint.startswith(f"supported model types: {', '.join(supported)}")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["adapter"]  # no output, no partial


def test_a_conversion_error_after_the_merge_names_the_run_not_the_deleted_folder(
    tiny_llama, tmp_path, monkeypatch
):
    import loratool.export.run
    from loratool.export import run_export

    seen = []

    def failing(model_dir, *args, **kwargs):
        seen.append(model_dir)
        raise LoratoolError(f"{model_dir}: something the writer refuses", hint=f"look at {model_dir}")

    monkeypatch.setattr(loratool.export.run, "export_gguf", failing)
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", target_modules="all-linear")
    with pytest.raises(LoratoolError) as err:
        run_export(adapter, output=tmp_path / "out", log=lambda _: None)
    assert seen and not seen[0].exists()  # the temporary merge is gone
    assert str(seen[0]) not in str(err.value)
    assert err.value.message == f"the merge of {adapter}: something the writer refuses"
