"""The recipe schema: strictness, all-at-once reporting, overrides, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from loratool.errors import LoratoolError
from loratool.recipe import Recipe, load_recipe, reference, validate_recipe

MINIMAL = {
    "base_model": "some/model",
    "data": {"train": [{"path": "train.jsonl"}]},
    "training": {"output_dir": "out"},
}


def problems_of(raw: dict, overrides: tuple[str, ...] = (), tmp_path: Path | None = None) -> str:
    with pytest.raises(LoratoolError) as info:
        if overrides:
            assert tmp_path is not None
            path = tmp_path / "r.yaml"
            path.write_text(yaml.safe_dump(raw))
            load_recipe(path, overrides)
        else:
            validate_recipe(raw)
    return info.value.message


def with_(section: str, **values) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw.setdefault(section, {}).update(values)
    return raw


def test_minimal_recipe_fills_documented_defaults():
    recipe = validate_recipe(MINIMAL)
    assert recipe.lora.r == 16 and recipe.lora.target_modules == "all-linear"
    assert recipe.data.completion_only_loss is True and recipe.data.padding_free is True
    assert recipe.quantization is None and not recipe.is_quantized()
    assert recipe.training.resolved_warmup() == 0.03


def test_recipe_is_frozen():
    recipe = validate_recipe(MINIMAL)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        recipe.training.learning_rate = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        (
            "training",
            "learnig_rate",
            "training.learnig_rate: unknown key — did you mean training.learning_rate?",
        ),
        ("lora", "lora_alhpa", "lora.lora_alhpa: unknown key — did you mean lora.lora_alpha?"),
        ("data", "max_lenght", "data.max_lenght: unknown key — did you mean data.max_length?"),
        ("model", "trust_remote", "model.trust_remote: unknown key — did you mean model.trust_remote_code?"),
        ("quantization", "load_in_4bits", "did you mean quantization.load_in_4bit?"),
        ("training", "max_length", "training.max_length: belongs in data.max_length, not in training"),
    ],
)
def test_unknown_key_names_path_and_closest_key(section, key, expected):
    raw = with_(section, **{key: 1})
    if section == "quantization":
        raw["quantization"]["load_in_4bit"] = True
    assert expected in problems_of(raw)


def test_unknown_key_inside_a_list_item_has_its_index():
    raw = with_("data", train=[{"path": "a.jsonl"}, {"path": "b.jsonl", "fromat": "alpaca"}])
    assert "data.train.1.fromat: unknown key — did you mean data.train.1.format?" in problems_of(raw)


def test_unknown_top_level_key_and_key_from_another_section():
    raw = {**MINIMAL, "learning_rate": 1e-4, "base_modle": "x"}
    message = problems_of(raw)
    assert "learning_rate: unknown key here — it belongs in training.learning_rate" in message
    assert "base_modle: unknown key — did you mean base_model?" in message


def test_wrong_types_name_path_and_expected_type():
    raw = with_("training", learning_rate="fast", per_device_train_batch_size=0)
    message = problems_of(raw)
    assert "training.learning_rate: expected a valid number" in message
    assert "(got 'fast')" in message
    assert "training.per_device_train_batch_size: expected greater than 0 (got 0)" in message


def test_all_problems_are_reported_together():
    raw = with_("training", learnig_rate=1, seed="x")
    raw["lora"] = {"r": -1, "bias": "some"}
    del raw["base_model"]
    message = problems_of(raw)
    assert message.count("\n  - ") == 5, message
    assert "5 problems" in message
    assert "base_model: required key is missing" in message
    assert "lora.bias: expected 'none', 'all' or 'lora_only'" in message


def test_library_fields_pass_through_and_reserved_ones_are_refused():
    recipe = validate_recipe(with_("training", neftune_noise_alpha=5.0, tf32=False))
    assert recipe.training.model_extra == {"neftune_noise_alpha": 5.0, "tf32": False}
    recipe = validate_recipe(with_("lora", layer_replication=[[0, 1]]))
    assert recipe.lora.model_extra == {"layer_replication": [[0, 1]]}
    assert "training.eval_strategy: set by loratool" in problems_of(with_("training", eval_strategy="steps"))
    assert "lora.task_type: set by loratool" in problems_of(with_("lora", task_type="SEQ_CLS"))


def test_library_field_list_matches_installed_libraries():
    """Fails when peft/trl change their fields: regenerate with scripts/gen_library_fields.py."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("gen", REPO / "scripts/gen_library_fields.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen"] = gen
    spec.loader.exec_module(gen)
    from loratool.recipe import library_fields

    current = gen.current_fields()
    assert set(current["LORA_CONFIG_FIELDS"]) == library_fields.LORA_CONFIG_FIELDS
    assert set(current["SFT_CONFIG_FIELDS"]) == library_fields.SFT_CONFIG_FIELDS


@pytest.mark.parametrize(
    ("raw_update", "expected"),
    [
        (
            ("quantization", {"load_in_4bit": True, "load_in_8bit": True}),
            "load_in_4bit and load_in_8bit are both",
        ),
        (("quantization", {"bnb_4bit_quant_type": "nf4"}), "neither load_in_4bit nor load_in_8bit"),
        (("training", {"output_dir": "o", "bf16": True, "fp16": True}), "bf16 and fp16 are both true"),
        (
            ("training", {"output_dir": "o", "warmup_ratio": 0.1, "warmup_steps": 5}),
            "warmup_ratio and warmup_steps",
        ),
        (("training", {"output_dir": "o", "eval_steps": 10}), "no data.validation to evaluate on"),
        (
            ("training", {"output_dir": "o", "early_stopping_patience": 2}),
            "early stopping needs data.validation",
        ),
        (
            ("data", {"train": [{"path": "a"}], "packing": True, "padding_free": False}),
            "packing needs data.padding_free",
        ),
        (("lora", {"init_lora_weights": "magic"}), "'magic' is not a known initialization"),
        (("training", {"output_dir": "o", "max_steps": 0}), "training.max_steps: must be a positive"),
    ],
)
def test_cross_field_rules(raw_update, expected):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    section, values = raw_update
    raw[section] = values
    assert expected in problems_of(raw)


def test_validation_accepts_sources_or_fraction_only():
    assert validate_recipe(with_("data", validation=0.1)).data.validation == 0.1
    sources = validate_recipe(with_("data", validation=[{"path": "v.jsonl"}])).data.validation
    assert sources[0].path == "v.jsonl"
    assert "data.validation: expected a valid list or less than 1 (got 2.0)" in problems_of(
        with_("data", validation=2.0)
    )


def test_overrides_parse_yaml_scalars_and_index_lists(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=1e-4",
            "training.gradient_checkpointing=true",
            "lora.target_modules=[q_proj, v_proj]",
            "data.train.0.path=other.jsonl",
            "quantization.load_in_4bit=true",
            "training.report_to=none",
        ],
    )
    assert recipe.training.learning_rate == 1e-4
    assert recipe.training.gradient_checkpointing is True
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.train[0].path == "other.jsonl"
    assert recipe.is_quantized()


def test_overrides_are_as_strict_as_the_file(tmp_path):
    message = problems_of(MINIMAL, ("training.learnig_rate=1",), tmp_path)
    assert "training.learnig_rate: unknown key — did you mean training.learning_rate?" in message
    message = problems_of(MINIMAL, ("training.seed=abc",), tmp_path)
    assert "training.seed: expected a valid integer" in message
    for bad, expected in [
        ("training.seed", "expected KEY.PATH=VALUE"),
        ("data.train.3.path=x", "data.train.3 must index a list item (0 to 0)"),
        ("base_model.x=1", "base_model is a value, not a section"),
    ]:
        with pytest.raises(LoratoolError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            path = tmp_path / "r.yaml"
            path.write_text(yaml.safe_dump(MINIMAL))
            load_recipe(path, [bad])


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(LoratoolError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\ntraining:\n  output_dir: out\n   seed: 3\n")
    with pytest.raises(LoratoolError) as info:
        load_recipe(bad)
    assert f"{bad}:4:" in info.value.message and "YAML syntax error" in info.value.message
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(LoratoolError, match="a recipe must be a YAML mapping"):
        load_recipe(listy)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("base_model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LoratoolError, match="YAML syntax error"):
        load_recipe(evil)


def test_relative_paths_resolve_against_the_recipe_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    raw = {
        **MINIMAL,
        "base_model": "./model",
        "data": {"train": [{"path": "data/t.jsonl"}, {"path": "org/name"}]},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    assert recipe.base_model == str((tmp_path / "model").resolve())
    assert recipe.data.train[0].path == str(tmp_path / "data" / "t.jsonl")
    assert recipe.data.train[1].path == "org/name"  # a hub id stays as written


def test_reference_documents_every_field():
    text = reference()
    for section in ("model", "lora", "data", "training"):
        model = Recipe.model_fields[section].annotation
        for name, field in model.model_fields.items():
            assert f"{section}.{name}  (" in text
            assert field.description, f"{section}.{name} has no docstring"
    assert "data.train.N.format" in text


def test_reference_doc_is_in_sync():
    """docs/recipe-reference.md is regenerated with `loratool recipe-reference --markdown`."""
    from loratool.recipe import reference_markdown

    doc = REPO / "docs" / "recipe-reference.md"
    assert doc.read_text() == reference_markdown(), (
        "run: loratool recipe-reference --markdown > docs/recipe-reference.md"
    )


def test_settings_that_would_be_ignored_where_they_are_are_refused():
    named = with_("model", gguf_source="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "model.gguf_source: names the hub id a .gguf base" in problems_of(named)
    named["base_model"] = "models/smollm2.Q8_0.gguf"
    assert validate_recipe(named).model.gguf_source == "HuggingFaceTB/SmolLM2-135M-Instruct"

    sft = with_("data", prompt_truncation="keep_end")
    assert "keep_end cuts the prompts of preference pairs and KTO rows, which sft" in problems_of(sft)
    grpo = with_("data", prompt_truncation="keep_end")
    grpo["grpo"] = {"rewards": [{"exact_match": "answer"}]}
    grpo["data"]["train"][0]["format"] = "prompt"
    assert "dropped, never cut" in problems_of(grpo)
    dpo = with_("data", prompt_truncation="keep_end", truncation="drop")
    dpo["dpo"] = {}
    assert "data.truncation: drop skips every row" in problems_of(dpo)
    dpo["data"]["truncation"] = "truncate"
    assert validate_recipe(dpo).data.prompt_truncation == "keep_end"
