"""Preference tuning (the `dpo` section) without training: recipe rules, both pair layouts, masks
as for SFT, the dry run."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA, smoke_recipe
from helpers.dpo import TRAIN_WORDS, data_section, fresh, pair, write_jsonl

# a fixture, imported for pytest to find in this module
from helpers.dpo import tokenizer as tokenizer
from loratool.data.formats import Conversation
from loratool.data.preference import build_preference_datasets
from loratool.data.templates import with_bos
from loratool.data.tokenize import IGNORE, encode
from loratool.errors import LoratoolError
from loratool.recipe import DataSection, validate_recipe

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
    # Every answer is longer than 8 tokens, and chosen and rejected differ within their first 8 (at answer
    # token 7): cut there, each pair still carries a signal (a pair cut to two equal answers is refused).
    limit = max(len(r["prompt_ids"]) for r in full) + 8
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


def test_init_adapter_must_be_a_finished_loratool_run(tmp_path, tiny_llama):
    from loratool.train.dpo import check_init_adapter

    raw = recipe_with(dpo={"init_adapter": str(tmp_path)})
    raw["base_model"] = str(tiny_llama)
    with pytest.raises(LoratoolError, match="is not a loratool run directory") as info:
        check_init_adapter(validate_recipe(raw))
    assert "training.output_dir of a finished `loratool train` run" in info.value.hint


def test_dry_run_checks_a_dpo_recipe_and_writes_nothing(tmp_path, tiny_llama):
    from loratool.train.dry_run import dry_run

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(w) for w in TRAIN_WORDS])
    raw = smoke_recipe(
        tiny_llama, pairs, tmp_path / "out", data={"train": [{"path": str(pairs)}], "max_length": 64}, dpo={}
    )
    logged: list[str] = []
    dry_run(validate_recipe(raw), log=logged.append)
    text = "\n".join(logged)
    assert "data: train 12 rows" in text and "preference" in text and "adapter:" in text
    assert not (tmp_path / "out").exists()
