"""KTO (the `kto` section) without training: recipe rules, unpaired rows and pairs split in two, masks as
for SFT, malformed rows with their file and line, the trainer's KL completions, the dry run and the plan."""

from __future__ import annotations

import pytest

from conftest import smoke_recipe
from helpers.dpo import TRAIN_WORDS, data_section, fresh, pair, write_jsonl

# a fixture, imported for pytest to find in this module
from helpers.dpo import tokenizer as tokenizer
from loratool.data.formats import Conversation
from loratool.data.preference import build_preference_datasets
from loratool.data.tokenize import IGNORE, encode
from loratool.data.unpaired import build_unpaired_datasets, desirable_rows
from loratool.errors import LoratoolError
from loratool.recipe import validate_recipe


def recipe_with(**sections) -> dict:
    raw = {"base_model": "m", "data": {"train": [{"path": "p.jsonl"}]}, "training": {"output_dir": "out/x"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def problems(raw: dict) -> str:
    with pytest.raises(LoratoolError) as info:
        validate_recipe(raw)
    return info.value.message


def judged(word: str, desirable: bool, chat: bool = True) -> dict:
    """One unpaired row: the desirable answer ends in `yes yes`, the undesirable one in `no no`."""
    prompt, answer = f"Tell me about {word}.", f"{word} is nice. {'yes yes' if desirable else 'no no'}"
    if not chat:
        return {"prompt": prompt, "completion": " " + answer, "label": desirable}
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": answer}],
        "label": desirable,
    }


# --- the recipe -------------------------------------------------------------------------------------------


def test_the_kto_section_selects_kto_with_its_defaults():
    recipe = validate_recipe(recipe_with(kto={}))
    assert recipe.stage == "kto" and recipe.method_sections() == ["kto"]
    kto = recipe.kto
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight, kto.loss_type) == (0.1, 1.0, 1.0, "kto")
    assert kto.init_adapter is None


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"kto": {}, "dpo": {}}, "dpo and kto: each section chooses the training method"),
        ({"kto": {}, "reward": {}}, "kto and reward: each section chooses the training method"),
        ({"dpo": {"desirable_weight": 2.0}}, "dpo.desirable_weight: unknown key here — it belongs in kto"),
        ({"kto": {"desirable_wieght": 2.0}}, "did you mean kto.desirable_weight?"),
        ({"kto": {"label_smoothing": 0.1}}, "kto.label_smoothing: unknown key here — it belongs in dpo"),
        ({"kto": {"beta": 0}}, "kto.beta: expected"),
        ({"kto": {"undesirable_weight": -1}}, "kto.undesirable_weight: expected"),
        ({"kto": {"loss_type": "sigmoid"}}, "kto.loss_type: expected"),
        (
            {"kto": {}, "training": {"per_device_train_batch_size": 1}},
            "training.per_device_train_batch_size: KTO estimates its KL term",
        ),
        (
            {"kto": {}, "data": {"train": [{"path": "p.jsonl", "format": "alpaca"}]}},
            "data.train.0.format: alpaca rows have no label or rejected answer to learn from with kto",
        ),
        ({"kto": {}, "data": {"packing": True}}, "data.packing: KTO batches are padded rows"),
        ({"kto": {}, "data": {"completion_only_loss": False}}, "data.completion_only_loss: KTO"),
        ({"kto": {}, "lora": {"init_lora_weights": "eva"}}, "lora.init_lora_weights: eva calibrates"),
        (
            {"data": {"train": [{"path": "p.jsonl", "format": "unpaired"}]}},
            "data.train.0.format: unpaired rows (prompt / completion / label) are for KTO — add a kto section",
        ),
        (
            {"dpo": {}, "data": {"train": [{"path": "p.jsonl", "format": "unpaired"}]}},
            "data.train.0.format: unpaired rows have no rejected answer to learn from with dpo",
        ),
    ],
)
def test_recipe_problems_name_the_key_and_the_fix(sections, expected):
    assert expected in problems(recipe_with(**sections))


def test_apo_zero_unpaired_needs_no_second_row_per_micro_batch():
    raw = recipe_with(kto={"loss_type": "apo_zero_unpaired"}, training={"per_device_train_batch_size": 1})
    assert validate_recipe(raw).kto.loss_type == "apo_zero_unpaired"


# --- the data ---------------------------------------------------------------------------------------------


def test_unpaired_chat_rows_are_masked_as_sft_masks_the_same_completion(tmp_path, tokenizer):
    tok = fresh(tokenizer)
    rows = [judged(w, i % 2 == 0) for i, w in enumerate(TRAIN_WORDS[:4])]
    data = build_unpaired_datasets(data_section(write_jsonl(tmp_path / "u.jsonl", rows)), tok, seed=0)
    assert data.summary.train.rows == 4 and data.summary.train.sources[0].format == "unpaired"
    assert sorted(data.train["label"]) == [False, False, True, True]
    for row in data.train:
        word = tok.decode(row["prompt_ids"]).split("Tell me about ")[1].split(".")[0]
        source = next(r for r in rows if r["prompt"][0]["content"] == f"Tell me about {word}.")
        ids, labels = encode(
            Conversation(source["prompt"] + source["completion"], trained_from=1),
            tok,
            completion_only_loss=True,
        )
        assert row["completion_ids"] == [t for t in labels if t != IGNORE]  # what SFT trains on
        assert (
            row["prompt_ids"] + row["completion_ids"]
            == ids[: len(row["prompt_ids"]) + len(row["completion_ids"])]
        )
        assert row["label"] is source["label"]
        ending = "yes yes" if row["label"] else "no no"
        assert tok.decode(row["completion_ids"]).startswith(f"{word} is nice. {ending}<|im_end|>")


def test_plain_text_rows_get_no_template_and_end_with_eos(tmp_path, tokenizer):
    tok = fresh(tokenizer)
    rows = [judged(w, True, chat=False) for w in TRAIN_WORDS[:2]] + [judged("x", False, chat=False)]
    data = build_unpaired_datasets(data_section(write_jsonl(tmp_path / "u.jsonl", rows)), tok, seed=0)
    assert data.summary.chat_template is None
    assert all(r["completion_ids"][-1] == tok.eos_token_id for r in data.train)


def test_pairs_become_one_desirable_and_one_undesirable_row_each(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(w) for w in TRAIN_WORDS[:5]])
    kto = build_unpaired_datasets(data_section(path), fresh(tokenizer), seed=0)
    dpo = build_preference_datasets(data_section(path), fresh(tokenizer), seed=0)
    assert kto.summary.train.rows == 5 and len(kto.train) == 10  # a pair is one row read, two completions
    assert kto.summary.train.sources[0].format == "preference"
    expected = {(tuple(p["prompt_ids"]), tuple(p["chosen_ids"]), True) for p in dpo.train} | {
        (tuple(p["prompt_ids"]), tuple(p["rejected_ids"]), False) for p in dpo.train
    }
    assert {(tuple(r["prompt_ids"]), tuple(r["completion_ids"]), r["label"]) for r in kto.train} == expected


def test_a_pairs_two_halves_stay_on_the_same_side_of_the_validation_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(w) for w in TRAIN_WORDS])
    data = build_unpaired_datasets(data_section(path, validation=0.25), fresh(tokenizer), seed=0)
    assert (data.summary.train.rows, data.summary.validation.rows) == (9, 3)
    assert (len(data.train), len(data.validation)) == (18, 6)
    assert not set(map(tuple, data.train["prompt_ids"])) & set(map(tuple, data.validation["prompt_ids"]))
    source = data.summary.train.sources[0]
    assert source.read == source.used + source.held_out  # every row read is accounted for
    # `loratool eval` of a KTO run scores the desirable completions, as SFT would train on them.
    rows = desirable_rows(data.validation)
    assert len(rows) == 3 and all(labels[0] == IGNORE for _, labels in rows)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"prompt": "Hi", "completion": "a"}, "field 'label' is missing"),
        ({"prompt": "Hi", "completion": "a", "label": 1}, "field 'label' must be true or false"),
        ({"prompt": "Hi", "completion": "a", "label": "true"}, "got a string 'true'"),
        (
            {"prompt": "Hi", "label": True, "completion": 3},
            "field 'completion' must be a string, got a number",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "completion": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                "label": True,
            },
            "field 'completion' must hold one assistant message, got 2 messages",
        ),
    ],
)
def test_a_malformed_row_names_its_file_and_line(tmp_path, tokenizer, bad, reason):
    good = judged("apple", True, chat=False)
    path = write_jsonl(tmp_path / "u.jsonl", [good, bad, {**good, "label": False}])
    with pytest.raises(LoratoolError) as info:
        build_unpaired_datasets(data_section(path), fresh(tokenizer), seed=0)
    assert info.value.message.startswith(f"{path}:2: ") and reason in info.value.message
    assert "data.on_bad_row: skip" in info.value.hint
    skipped = build_unpaired_datasets(data_section(path, on_bad_row="skip"), fresh(tokenizer), seed=0)
    source = skipped.summary.train.sources[0]
    assert (source.read, source.used, source.dropped["malformed"]) == (3, 2, 1)


def test_rows_that_are_neither_say_which_keys_are_needed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    with pytest.raises(LoratoolError) as info:
        build_unpaired_datasets(data_section(path), fresh(tokenizer), seed=0)
    assert (
        "neither an unpaired row nor a preference pair; its keys are: instruction, output"
        in info.value.message
    )
    assert "prompt + completion + label" in info.value.hint


def test_columns_rename_the_label_and_long_rows_are_cut_or_dropped(tmp_path, tokenizer):
    rows = [{"q": f"Tell me about {w}.", "a": f" {w} is nice. yes yes", "ok": True} for w in TRAIN_WORDS[:3]]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    columns = {"prompt": "q", "completion": "a", "label": "ok"}
    section = data_section(path).model_copy(
        update={"train": [data_section(path).train[0].model_copy(update={"columns": columns})]}
    )
    full = build_unpaired_datasets(section, fresh(tokenizer), seed=0)
    limit = max(len(r["prompt_ids"]) for r in full.train) + 3
    cut = build_unpaired_datasets(section.model_copy(update={"max_length": limit}), fresh(tokenizer), seed=0)
    assert cut.summary.train.sources[0].truncated == 3
    for row, whole in zip(cut.train, full.train, strict=True):
        assert row["prompt_ids"] == whole["prompt_ids"]  # the completion is cut, never the prompt
        assert row["completion_ids"] == whole["completion_ids"][: limit - len(row["prompt_ids"])]
    drop = section.model_copy(update={"max_length": limit, "truncation": "drop"})
    with pytest.raises(LoratoolError, match="no usable rows: all 3 rows were longer than data.max_length"):
        build_unpaired_datasets(drop, fresh(tokenizer), seed=0)


def test_one_label_only_and_unbalanced_weights_are_warned_about(tmp_path, tokenizer):
    from loratool.train.kto import weight_warning

    path = write_jsonl(tmp_path / "u.jsonl", [judged(w, True) for w in TRAIN_WORDS[:3]])
    data = build_unpaired_datasets(data_section(path), fresh(tokenizer), seed=0)
    assert any("no undesirable (label: false) completion" in w for w in data.summary.warnings)
    kto = validate_recipe(recipe_with(kto={})).kto
    assert weight_warning(kto, 10, 10) is None and weight_warning(kto, 11, 10) is None  # 1.1 in [1, 4/3]
    warning = weight_warning(kto, 10, 40)  # 0.25: desirable rows weigh too little
    assert warning is not None and "kto.desirable_weight between 4.00 and 5.33" in warning
    assert weight_warning(kto.model_copy(update={"desirable_weight": 4.5}), 10, 40) is None


# --- the trainer's inputs ----------------------------------------------------------------------------------


def test_kl_completions_are_the_batchs_own_completions_shifted_by_one():
    from loratool.train.kto import with_kl_completions

    rows = {"prompt_ids": [[1], [2], [3]], "completion_ids": [[10], [20], [30]], "label": [True, False, True]}
    out = with_kl_completions(rows)
    assert out["KL_completion_ids"] == [[30], [10], [20]] and out["completion_ids"] == rows["completion_ids"]


def test_the_config_carries_the_kto_settings(tmp_path):
    from loratool.train.kto import build_config

    recipe = validate_recipe(
        recipe_with(kto={"beta": 0.3, "desirable_weight": 1.2, "loss_type": "apo_zero_unpaired"})
    )
    args = build_config(recipe, checkpoints_dir=tmp_path / "c", has_validation=False, bf16=False, fp16=False)
    assert (args.beta, args.desirable_weight, args.undesirable_weight) == (0.3, 1.2, 1.0)
    assert args.loss_type == "apo_zero_unpaired" and args.max_length is None
    assert args.train_sampling_strategy == "sequential"  # the KL pairing needs the data's fixed order
    assert not (tmp_path / "c").exists()


# --- before any weights load --------------------------------------------------------------------------------


def kto_recipe(tmp_path, tiny_llama, rows):
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    return validate_recipe(
        smoke_recipe(
            tiny_llama,
            path,
            tmp_path / "out",
            data={"train": [{"path": str(path)}], "max_length": 64},
            kto={},
        )
    )


def test_dry_run_and_plan_check_a_kto_recipe_and_write_nothing(tmp_path, tiny_llama):
    from loratool.train.dry_run import dry_run
    from loratool.train.plan import plan_recipe

    recipe = kto_recipe(tmp_path, tiny_llama, [judged(w, i % 2 == 0) for i, w in enumerate(TRAIN_WORDS)])
    logged: list[str] = []
    dry_run(recipe, log=logged.append)
    text = "\n".join(logged)
    assert "data: train 12 rows" in text and "unpaired" in text and "adapter:" in text
    notes: list[str] = []
    plan = plan_recipe(recipe, log=notes.append)
    assert not any("data not read" in note for note in notes), notes  # the rows were read as training will
    assert plan.trainable_parameters > 0 and plan.tokens_per_step > 0
    assert not (tmp_path / "out").exists()


def test_a_bad_label_stops_the_dry_run_at_its_line(tmp_path, tiny_llama):
    from loratool.train.dry_run import dry_run

    rows = [judged("apple", True), {**judged("river", False), "label": "no"}]
    recipe = kto_recipe(tmp_path, tiny_llama, rows)
    with pytest.raises(LoratoolError, match=r"u\.jsonl:2: field 'label' must be true or false"):
        dry_run(recipe, log=lambda _: None)


def test_a_long_prompt_is_dropped_or_cut_from_its_start_as_for_pairs(tokenizer, tmp_path):
    long = "Here is a long story about a river and a garden. " * 12
    rows = [judged("apple", True), judged("river", False)]
    rows += [{**judged("violin", True), "prompt": [{"role": "user", "content": long + "So, violin?"}]}]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    dropped = build_unpaired_datasets(data_section(path, max_length=64), fresh(tokenizer), seed=0)
    source = dropped.summary.train.sources[0]
    assert (source.used, source.dropped["prompt_too_long"]) == (2, 1)
    assert "data.prompt_truncation: keep_end cuts it from its start instead" in dropped.summary.format()
    cut = build_unpaired_datasets(
        data_section(path, max_length=64, prompt_truncation="keep_end"), fresh(tokenizer), seed=0
    )
    source = cut.summary.train.sources[0]
    assert (source.used, source.prompts_cut) == (3, 1)
    violin = next(r for r in cut.train if len(r["prompt_ids"]) + len(r["completion_ids"]) == 64)
    assert tokenizer.decode(violin["completion_ids"]).strip().startswith("violin is nice. yes yes")
