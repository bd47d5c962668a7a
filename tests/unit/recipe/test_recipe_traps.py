"""Recipe traps: repeated keys, alias bombs, unreadable files, bad regexes, values only the
libraries know, and damaged adapter files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from helpers.recipe_traps import DAMAGES, damage

# a fixture, imported for pytest to find in this module
from helpers.recipe_traps import pristine_adapter as pristine_adapter
from loratool.errors import LoratoolError
from loratool.recipe import MAX_ALIAS_NODES, load_recipe, parse_yaml, validate_recipe

MINIMAL = "base_model: some/model\ndata:\n  train:\n    - path: train.jsonl\ntraining:\n  output_dir: out\n"


def load_text(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path, overrides)


def message_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(LoratoolError) as info:
        load_text(tmp_path, text, overrides)
    return info.value.message


# --- repeated keys --------------------------------------------------------------------------------------


def test_a_section_given_twice_names_both_lines(tmp_path):
    text = MINIMAL + "lora:\n  r: 8\n" + "# more settings\n" * 3 + "lora:\n  r: 16\n"
    message = message_of(tmp_path, text)
    assert f"{tmp_path / 'recipe.yaml'}: 1 problem in the recipe" in message
    assert "lora: key given twice (lines 7 and 12)" in message


def test_nested_and_list_item_keys_given_twice_are_reported_with_other_problems(tmp_path):
    text = (
        "base_model: some/model\n"  # 1
        "data:\n"  # 2
        "  train:\n"  # 3
        "    - path: a.jsonl\n"  # 4
        "      format: alpaca\n"  # 5
        "      path: b.jsonl\n"  # 6
        "training:\n"  # 7
        "  output_dir: out\n"  # 8
        "  learning_rate: 1e-4\n"  # 9
        "  learnig_rate: 1\n"  # 10
        "  learning_rate: 2e-4\n"  # 11
        "  learning_rate: 3e-4\n"  # 12
    )
    message = message_of(tmp_path, text)
    assert "3 problems in the recipe" in message
    assert "data.train.0.path: key given twice (lines 4 and 6)" in message
    assert "training.learning_rate: key given 3 times (lines 9, 11 and 12)" in message
    assert "training.learnig_rate: unknown key — did you mean training.learning_rate?" in message


def test_quoting_does_not_hide_a_repeated_key(tmp_path):
    message = message_of(tmp_path, MINIMAL + "lora:\n  r: 8\n  'r': 16\n")
    assert "lora.r: key given twice (lines 8 and 9)" in message


def test_repeated_key_in_a_set_value_is_refused(tmp_path):
    message = message_of(tmp_path, MINIMAL, ("lora={r: 8, r: 16}",))
    assert "--set 'lora={r: 8, r: 16}': r: key given twice (columns 2 and 8)" in message


def test_merge_keys_and_small_aliases_still_load(tmp_path):
    text = (
        "base_model: some/model\n"
        "data:\n"
        "  train:\n"
        "    - &source {path: train.jsonl, format: alpaca}\n"
        "  validation:\n"
        "    - *source\n"
        "training:\n"
        "  output_dir: out\n"
        "lora: &lora\n"
        "  r: 8\n"
        "  target_modules: [q_proj, v_proj]\n"
    )
    recipe = load_text(tmp_path, text)
    assert recipe.data.validation[0].path == recipe.data.train[0].path
    data, duplicates = parse_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "s")
    assert data["other"] == {"x": 3, "y": 2} and duplicates == []  # an explicit key overrides a merged one


def test_yaml_stays_safe(tmp_path):
    with pytest.raises(yaml.YAMLError):
        parse_yaml("base_model: !!python/object/apply:os.system ['echo pwned']\n", "s")


# --- alias bombs ----------------------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_is_built(tmp_path, monkeypatch):
    # parse_yaml, not load_recipe: PyYAML builds the bomb as shared lists (cheap), and it is validation that
    # would walk all 9**9 values. So if the refusal broke, this test would fail quickly, not hang.
    built = []
    original = yaml.SafeLoader.construct_document
    monkeypatch.setattr(
        yaml.SafeLoader, "construct_document", lambda self, n: built.append(n) or original(self, n)
    )
    with pytest.raises(LoratoolError) as info:
        parse_yaml(billion_laughs(), "bomb.yaml")
    assert info.value.message.startswith("bomb.yaml: YAML aliases expand this document past 10,000")
    assert built == []  # refused on the node graph, before any value was constructed


def test_recursive_alias_is_refused(tmp_path):
    with pytest.raises(LoratoolError, match="YAML aliases expand"):
        parse_yaml("a: &a [*a]\n", "loop.yaml")
    with pytest.raises(LoratoolError, match="YAML aliases expand"):
        load_text(tmp_path, MINIMAL + "model: &m {revision: *m}\n")


def test_alias_bomb_file_through_load_recipe(tmp_path):
    message = message_of(tmp_path, MINIMAL + billion_laughs().replace("a0:", "x0:"))
    assert f"{tmp_path / 'recipe.yaml'}: YAML aliases expand" in message


def test_aliases_within_the_limit_are_fine():
    text = (
        "a: &a [" + ", ".join(["x"] * 100) + "]\nb: [" + ", ".join(["*a"] * (MAX_ALIAS_NODES // 101)) + "]\n"
    )
    data, _ = parse_yaml(text, "s")
    assert len(data["b"]) == MAX_ALIAS_NODES // 101


# --- unreadable recipe files ----------------------------------------------------------------------------


def test_non_utf8_recipe_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.encode() + "# café\n".encode("latin-1"))
    with pytest.raises(LoratoolError) as info:
        load_recipe(path)
    assert info.value.message.startswith(f"{path}:7: the recipe is not UTF-8 text (byte 0xe9")
    assert "UTF-8" in info.value.hint


def test_directory_recipe_path(tmp_path):
    with pytest.raises(LoratoolError) as info:
        load_recipe(tmp_path)
    assert info.value.message == f"{tmp_path} is a directory, not a recipe file"


# --- module-name regexes --------------------------------------------------------------------------------


def raw_with_lora(**lora) -> dict:
    raw = yaml.safe_load(MINIMAL)
    raw["lora"] = lora
    return raw


def test_invalid_target_modules_regex_names_key_and_error():
    with pytest.raises(LoratoolError) as info:
        validate_recipe(raw_with_lora(target_modules=r".*\.(q_proj|v_proj"))
    assert (
        r"lora.target_modules: '.*\.(q_proj|v_proj' is not a valid regular expression "
        "(missing ), unterminated subpattern at position 4)" in info.value.message
    )


def test_regex_checks_follow_peft():
    # Strings are regexes (PEFT fullmatches them); list items are plain module names, compared as suffixes.
    validate_recipe(raw_with_lora(target_modules=r".*\.(q_proj|v_proj)", exclude_modules="lm_head"))
    validate_recipe(raw_with_lora(target_modules=["q_proj[0]"]))
    with pytest.raises(LoratoolError) as info:
        validate_recipe(raw_with_lora(exclude_modules="lm_head(", rank_pattern={"q_proj[": 4}))
    assert "lora.exclude_modules: 'lm_head(' is not a valid regular expression" in info.value.message
    assert "lora.rank_pattern: 'q_proj[' is not a valid regular expression" in info.value.message


# --- settings only the libraries know -------------------------------------------------------------------


def test_trainer_settings_are_checked_against_the_library(tmp_path):
    from loratool.train.preflight import check_trainer_settings

    out = tmp_path / "run"
    base = MINIMAL.replace("output_dir: out", f"output_dir: {out}")
    with pytest.raises(LoratoolError) as info:
        check_trainer_settings(
            load_text(tmp_path, base + "  optim: adamw_tourch\n  lr_scheduler_type: cosin\n")
        )
    assert "training.optim: 'adamw_tourch' is not a valid optimizer — did you mean adamw_torch?" in str(
        info.value
    )
    assert (
        "training.lr_scheduler_type: 'cosin' is not a valid learning-rate scheduler — did you mean cosine?"
        in str(info.value)
    )
    assert "paged_adamw_8bit" in info.value.hint  # the library's own list of optimizers

    with pytest.raises(LoratoolError, match="training.torch_empty_cache_steps: the trainer rejected"):
        check_trainer_settings(load_text(tmp_path, base + "  torch_empty_cache_steps: -1\n"))

    check_trainer_settings(load_text(tmp_path, base + "  optim: adafactor\n"))
    assert not out.exists()  # building SFTConfig writes nothing


@pytest.mark.parametrize("how", list(DAMAGES))
def test_check_adapter_files_names_the_damaged_file(pristine_adapter, tmp_path, how):
    from loratool.adapter.files import check_adapter_files

    adapter = shutil.copytree(pristine_adapter, tmp_path / "adapter")
    assert check_adapter_files(adapter)["peft_type"] == "LORA"
    damage(adapter, how)
    name, expected = DAMAGES[how]
    with pytest.raises(LoratoolError) as info:
        check_adapter_files(adapter)
    assert info.value.message.startswith(f"{adapter / name}: ") and expected in info.value.message
