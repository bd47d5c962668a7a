"""Preference tuning (the `dpo` section): recipe rules, both pair layouts, masks as for SFT, a real DPO run on
a tiny model whose held-out reward margin rises, and a run directory that merges like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, smoke_recipe
from loratool.data.formats import Conversation
from loratool.data.preference import build_preference_datasets
from loratool.data.templates import with_bos
from loratool.data.tokenize import IGNORE, encode
from loratool.errors import LoratoolError
from loratool.recipe import DataSection, validate_recipe

WORDS = (
    "apple river stone cloud tiger piano garden rocket candle mirror forest silver ocean castle lemon violin"
)
TRAIN_WORDS, HELD_OUT_WORDS = WORDS.split()[:12], WORDS.split()[12:]


def pair(word: str, chat: bool = True) -> dict:
    """A learnable preference: the chosen answer ends in `yes yes`, the rejected one in `no no`."""
    prompt, chosen, rejected = f"Tell me about {word}.", f"{word} is nice. yes yes", f"{word} is nice. no no"
    if not chat:
        return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_section(*paths: Path, **settings) -> DataSection:
    return DataSection(train=[{"path": str(p)} for p in paths], **{"max_length": 128, **settings})


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def fresh(tokenizer):
    """A copy, so a chat template set by one test does not leak into the next."""
    import copy

    return copy.deepcopy(tokenizer)


# --- the recipe -------------------------------------------------------------------------------------------


def recipe_with(**sections) -> dict:
    raw = {"base_model": "m", "data": {"train": [{"path": "p.jsonl"}]}, "training": {"output_dir": "out/x"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def problems(raw: dict) -> str:
    with pytest.raises(LoratoolError) as info:
        validate_recipe(raw)
    return info.value.message


def test_the_dpo_section_selects_preference_tuning_with_its_defaults():
    assert validate_recipe(recipe_with()).stage == "sft"
    recipe = validate_recipe(recipe_with(dpo={}))
    assert recipe.stage == "dpo"
    assert (recipe.dpo.beta, recipe.dpo.loss_type, recipe.dpo.init_adapter) == (0.1, "sigmoid", None)
    assert validate_recipe(recipe_with(dpo={"beta": 0.5, "loss_type": "ipo"})).dpo.loss_type == "ipo"


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"dpo": {"bta": 0.2}}, "dpo.bta: unknown key — did you mean dpo.beta?"),
        ({"dpo": {"loss_type": "sigmod"}}, "dpo.loss_type: expected"),
        ({"dpo": {"beta": 0}}, "dpo.beta: expected"),
        ({"dpo": {"loss_type": "exo_pair"}}, "dpo.label_smoothing: loss_type exo_pair needs it above 0"),
        (
            {"dpo": {}, "data": {"train": [{"path": "p.jsonl", "format": "alpaca"}]}},
            "data.train.0.format: alpaca rows have no rejected answer",
        ),
        ({"dpo": {}, "data": {"packing": True}}, "data.packing: DPO batches are padded pairs"),
        ({"dpo": {}, "data": {"completion_only_loss": False}}, "data.completion_only_loss: DPO"),
        (
            {"data": {"train": [{"path": "p.jsonl", "format": "preference"}]}},
            "data.train.0.format: preference pairs are for preference tuning — add a dpo section",
        ),
    ],
)
def test_recipe_problems_name_the_key_and_the_fix(sections, expected):
    assert expected in problems(recipe_with(**sections))


# --- the data: both layouts, masks, malformed rows ---------------------------------------------------------


def test_chat_pairs_are_masked_as_sft_masks_the_same_answer(tmp_path, tokenizer):
    tok = fresh(tokenizer)
    rows = [pair(w) for w in TRAIN_WORDS[:4]]
    data = build_preference_datasets(data_section(write_jsonl(tmp_path / "p.jsonl", rows)), tok, seed=0)
    assert data.summary.train.rows == 4 and data.validation is None
    for row in data.train:
        prompt = tok.decode(row["prompt_ids"])
        word = prompt.split("Tell me about ")[1].split(".")[0]
        source = next(r for r in rows if r["prompt"][0]["content"] == f"Tell me about {word}.")
        # The prompt is what the tokenizer's own template renders with the generation prompt, with the BOS
        # the tokenizer adds in front (as SFT rows and generation prompts have it: templates.with_bos).
        expected_prompt = with_bos(
            tok, tok.apply_chat_template(source["prompt"], tokenize=False, add_generation_prompt=True)
        )
        assert prompt.startswith(tok.bos_token)
        assert prompt == expected_prompt
        for answer in ("chosen", "rejected"):
            # The answer tokens are exactly the tokens SFT would train on for that conversation.
            ids, labels = encode(
                Conversation(source["prompt"] + source[answer], trained_from=1),
                tok,
                completion_only_loss=True,
            )
            assert row[f"{answer}_ids"] == [t for t in labels if t != IGNORE]
            assert (
                row["prompt_ids"] + row[f"{answer}_ids"]
                == ids[: len(row["prompt_ids"]) + len(row[f"{answer}_ids"])]
            )
        assert tok.decode(row["chosen_ids"]).startswith(f"{word} is nice. yes yes<|im_end|>")
        assert tok.decode(row["rejected_ids"]).startswith(f"{word} is nice. no no<|im_end|>")
    summary = data.summary.train
    assert summary.loss_tokens == sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data.train)
    assert summary.tokens == summary.loss_tokens + 2 * sum(len(r["prompt_ids"]) for r in data.train)


def test_plain_text_pairs_get_no_template_and_end_with_eos(tmp_path, tokenizer):
    tok = fresh(tokenizer)
    rows = [pair(w, chat=False) for w in TRAIN_WORDS[:3]]
    data = build_preference_datasets(data_section(write_jsonl(tmp_path / "p.jsonl", rows)), tok, seed=0)
    assert data.summary.chat_template is None and data.summary.train.sources[0].format == "preference"
    row = data.train[0]
    assert row["prompt_ids"][0] == tok.bos_token_id  # the prompt, as SFT tokenizes a completion's prompt
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["chosen_ids"]).endswith("yes yes" + tok.eos_token)


def test_sharegpt_pairs_as_in_llama_factory(tmp_path, tokenizer):
    tok = fresh(tokenizer)
    rows = [
        {
            "conversations": [{"from": "human", "value": f"Tell me about {w}."}],
            "chosen": {"from": "gpt", "value": f"{w} is nice. yes yes"},
            "rejected": {"from": "gpt", "value": f"{w} is nice. no no"},
        }
        for w in TRAIN_WORDS[:3]
    ]
    sharegpt = build_preference_datasets(
        data_section(write_jsonl(tmp_path / "s.json", rows)), fresh(tok), seed=0
    )
    chat = build_preference_datasets(
        data_section(write_jsonl(tmp_path / "c.jsonl", [pair(w) for w in TRAIN_WORDS[:3]])),
        fresh(tok),
        seed=0,
    )
    assert sharegpt.summary.train.sources[0].format == "sharegpt"
    assert sorted(map(str, sharegpt.train.to_list())) == sorted(map(str, chat.train.to_list()))


@pytest.mark.skipif(not (SHARED_DATA / "preference").is_dir(), reason="needs ../shared/data")
def test_the_llama_factory_demo_file_reads_whole(tokenizer):
    data = build_preference_datasets(
        DataSection(train=[{"path": str(SHARED_DATA / "preference" / "dpo_en_demo.json")}], max_length=4096),
        fresh(tokenizer),
        seed=0,
    )
    source = data.summary.train.sources[0]
    assert source.format == "sharegpt" and source.read == 300
    assert source.used + sum(source.dropped.values()) == 300 and source.dropped["malformed"] == 0


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"prompt": "Hi", "chosen": "a"}, "field 'rejected' is missing"),
        ({"prompt": "Hi", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string, got a number"),
        (
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                "rejected": "c",
            },
            "field 'chosen' must hold one assistant message, got 2 messages",
        ),
        (
            {
                "conversations": "Hi",
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "field 'conversations' must be a list of the prompt's messages, got a string",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Hi"}],
                "chosen": "a",
                "rejected": {"from": "gpt", "value": "b"},
            },
            "field 'chosen' must be one message object",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Hi"}],
                "chosen": {"from": "human", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "field 'chosen' must be an assistant message, got role 'user'",
        ),
    ],
)
def test_a_malformed_pair_names_its_file_row_and_what_to_do(tmp_path, tokenizer, bad, reason):
    good = (
        pair("apple")
        if "prompt" in bad
        else {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        }
    )
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, bad, good])
    with pytest.raises(LoratoolError) as info:
        build_preference_datasets(data_section(path), fresh(tokenizer), seed=0)
    assert info.value.message.startswith(f"{path}:2: {reason}")
    assert "data.on_bad_row: skip" in info.value.hint
    skipped = build_preference_datasets(data_section(path, on_bad_row="skip"), fresh(tokenizer), seed=0)
    source = skipped.summary.train.sources[0]
    assert (source.read, source.used, source.dropped["malformed"]) == (3, 2, 1)
    assert source.bad_rows[0]["location"] == f"{path}:2"


def test_rows_that_are_not_pairs_say_which_keys_a_pair_needs(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    with pytest.raises(LoratoolError) as info:
        build_preference_datasets(data_section(path), fresh(tokenizer), seed=0)
    assert "is not a preference pair; its keys are: instruction, output" in info.value.message
    assert "prompt + chosen + rejected" in info.value.hint and "columns:" in info.value.hint


def test_long_pairs_are_cut_to_max_length_or_dropped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(w) for w in TRAIN_WORDS[:3]])
    full = build_preference_datasets(data_section(path), fresh(tokenizer), seed=0).train
    limit = max(len(r["prompt_ids"]) for r in full) + 3  # every answer is longer than 3 tokens
    cut = build_preference_datasets(data_section(path, max_length=limit), fresh(tokenizer), seed=0)
    assert cut.summary.train.sources[0].truncated == 3 and cut.summary.train.longest == limit
    for row, whole in zip(cut.train, full, strict=True):
        assert row["prompt_ids"] == whole["prompt_ids"]  # the answers are cut, never the prompt
        for answer in ("chosen_ids", "rejected_ids"):
            assert len(row["prompt_ids"]) + len(row[answer]) == limit
            assert row[answer] == whole[answer][: len(row[answer])]
    with pytest.raises(LoratoolError, match="no usable rows: all 3 rows were longer than data.max_length"):
        build_preference_datasets(
            data_section(path, max_length=limit, truncation="drop"), fresh(tokenizer), seed=0
        )


# --- a real DPO run on a tiny model ------------------------------------------------------------------------


def margins(policy, reference, rows: list[dict]) -> list[float]:
    """Per pair: (log p(chosen) - log p(rejected)) under the policy minus the same under the reference,
    in nats, summed over the answer tokens: the implicit reward margin DPO raises (divided by beta)."""

    def answer_logp(model, prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum())

    out = []
    for row in rows:
        p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        out.append(
            (answer_logp(policy, p, c) - answer_logp(policy, p, r))
            - (answer_logp(reference, p, c) - answer_logp(reference, p, r))
        )
    return out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama):
    """A DPO run on 24 chat pairs (12 prompts) with 4 held-out pairs on other prompts, and the trainer."""
    import loratool.train.dpo
    from loratool.train.run import run_train

    tmp = tmp_path_factory.mktemp("dpo")
    train = write_jsonl(tmp / "train.jsonl", [pair(w) for w in TRAIN_WORDS * 2])
    held_out = write_jsonl(tmp / "held_out.jsonl", [pair(w) for w in HELD_OUT_WORDS])
    raw = smoke_recipe(
        tiny_llama,
        train,
        tmp / "out",
        data={"train": [{"path": str(train)}], "validation": [{"path": str(held_out)}], "max_length": 64},
        training={"max_steps": 8, "save_steps": 8, "eval_steps": 8, "logging_steps": 4},
        dpo={"beta": 0.1},
    )
    trainers = []

    class Recording(loratool.train.dpo.PreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loratool.train.dpo, "PreferenceTrainer", Recording)
        out = run_train(validate_recipe(raw), log=lambda _: None)
    return out, trainers[0], held_out


def test_the_reference_is_the_base_with_the_adapter_disabled(dpo_run):
    from peft import PeftModel

    _, trainer, _ = dpo_run
    assert trainer.ref_model is None  # no second model in memory
    assert isinstance(trainer.model, PeftModel)
    assert list(trainer.model.peft_config) == ["default"]  # and no frozen copy of the adapter either


def test_the_held_out_reward_margin_rises(dpo_run, tiny_llama, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, held_out = dpo_run
    rows = build_preference_datasets(data_section(held_out), fresh(tokenizer), seed=0).train.to_list()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    before = margins(base, base, rows)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    with tuned.disable_adapter():
        reference = margins(tuned, base, rows)
    after = margins(tuned, AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), rows)
    assert before == [0.0] * len(rows) and max(map(abs, reference)) < 1e-4  # disabled adapter == base
    assert min(after) > 1.0, after  # every held-out pair, by more than a nat (seen: ~10-30)


def test_the_run_directory_is_a_normal_run_that_records_dpo(dpo_run):
    from loratool.rundir.records import read_run

    out, trainer, _ = dpo_run
    record = read_run(out)
    assert record.complete and record.raw["stage"] == "dpo"
    assert record.raw["dpo"] == {
        "beta": 0.1,
        "loss_type": "sigmoid",
        "reference": "base (adapter disabled)",
        "init_adapter": None,
    }
    assert record.data["train"]["rows"] == 24 and record.data["validation"]["rows"] == 4
    # The default (every other layer) becomes every layer: trl re-enables all after each reference pass.
    assert record.train["checkpointed_layers"] == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["dpo"]["beta"] == 0.1
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "run.json",
        "metrics.jsonl",
        "README.md",
    } <= names
    assert "ref" not in names  # only the trained adapter is saved
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in row for row in logged) and any("eval_loss" in row for row in logged)
    assert "Preference-tuned with DPO" in (out / "README.md").read_text()
    assert record.train["global_step"] == 8 and record.train["tokens_trained"] > 0


def test_the_run_merges_and_the_merge_verifies(dpo_run, tmp_path):
    from loratool.merge import run_merge

    out, _, _ = dpo_run
    merged = run_merge(out, output=tmp_path / "merged", log=lambda _: None)
    record = json.loads((merged / "merge.json").read_text())
    check = record["verification"]["full_precision_base"]
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-4
    assert "held-out validation rows" in record["verification"]["probes"]


# --- starting from a finished SFT run --------------------------------------------------------------------


def test_dpo_starts_from_an_sft_runs_adapter_which_is_also_the_reference(tmp_path, tiny_llama, smoke_data):
    from safetensors.torch import load_file

    import loratool.train.dpo
    from loratool.train.run import run_train

    sft = run_train(
        validate_recipe(smoke_recipe(tiny_llama, smoke_data, tmp_path / "sft", training={"max_steps": 2})),
        log=lambda _: None,
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(w) for w in TRAIN_WORDS])
    raw = smoke_recipe(
        tiny_llama,
        pairs,
        tmp_path / "dpo",
        data={"train": [{"path": str(pairs)}], "max_length": 64},
        training={"max_steps": 1, "save_steps": 1},
        dpo={"init_adapter": str(sft)},
    )
    trainers = []

    class Recording(loratool.train.dpo.PreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)
            # Before any step: the trained adapter and trl's frozen reference copy both hold the SFT weights.
            self.start = {k: v.clone() for k, v in self.model.state_dict().items() if "lora_B" in k}

    logged = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loratool.train.dpo, "PreferenceTrainer", Recording)
        out = run_train(validate_recipe(raw), log=logged.append)
    assert any(f"starting from {sft}" in line for line in logged)
    sft_weights = load_file(sft / "adapter_model.safetensors")
    start = trainers[0].start
    for name, value in sft_weights.items():
        if "lora_B" in name:
            key = name.replace("lora_B.weight", "lora_B.{}.weight")
            torch.testing.assert_close(start[key.format("default")], value)
            torch.testing.assert_close(start[key.format("ref")], value)
    assert trainers[0].ref_model is None
    assert (
        json.loads((out / "run.json").read_text())["dpo"]["reference"]
        == "base + init_adapter (a frozen copy)"
    )
    assert not (out / "ref").exists()

    # Another lora section would not fit the adapter: refused before any weights load, naming the keys.
    raw["lora"]["r"] = 4
    raw["training"]["output_dir"] = str(tmp_path / "dpo-r4")
    with pytest.raises(LoratoolError, match=r"lora.r: 8 there, 4 here"):
        run_train(validate_recipe(raw), log=lambda _: None)
    assert not (tmp_path / "dpo-r4").exists()


def test_init_adapter_must_be_a_finished_loratool_run(tmp_path, tiny_llama):
    from loratool.train.dpo import check_init_adapter

    raw = recipe_with(dpo={"init_adapter": str(tmp_path)})
    raw["base_model"] = str(tiny_llama)
    with pytest.raises(LoratoolError, match="is not a loratool run directory") as info:
        check_init_adapter(validate_recipe(raw))
    assert "training.output_dir of a finished `loratool train` run" in info.value.hint


def test_eval_scores_the_chosen_answers_of_the_runs_validation_pairs(dpo_run, tmp_path):
    from loratool.eval.run import run_eval

    out, _, _ = dpo_run
    report = run_eval(out, max_samples=2, max_new_tokens=4, output=tmp_path / "eval", log=lambda _: None)
    record = json.loads((report / "metrics.json").read_text())
    assert record["data"]["source"] == "validation" and record["data"]["rows"] == 2
    # The references are the chosen answers (the prompts are the pairs' prompts).
    rows = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("yes yes" in row["reference"] and row["reference_complete"] for row in rows)
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)


def test_dry_run_checks_a_dpo_recipe_and_writes_nothing(tmp_path, tiny_llama):
    from loratool.train.run import dry_run

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(w) for w in TRAIN_WORDS])
    raw = smoke_recipe(
        tiny_llama, pairs, tmp_path / "out", data={"train": [{"path": str(pairs)}], "max_length": 64}, dpo={}
    )
    logged: list[str] = []
    dry_run(validate_recipe(raw), log=logged.append)
    text = "\n".join(logged)
    assert "data: train 12 rows" in text and "preference" in text and "adapter:" in text
    assert not (tmp_path / "out").exists()
