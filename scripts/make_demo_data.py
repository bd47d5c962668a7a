"""The demo's task data: free-text orders -> one-line tickets in a fixed `key=value` layout.

    input:  "Can Maria Lopez in Lisbon get 3 boxes of green tea by May 17?"
    output: "name=Maria Lopez; city=Lisbon; item=green tea; qty=3; due=05-17"

Why this task: a small instruction model already reads such sentences, but it cannot know this house
format (key names and order, `; ` separators, the month as a number, no prose around it), so its exact
match on held-out orders is ~0; a LoRA adapter learns the layout in a few CPU minutes, and exact match
makes the difference visible in one number. Rows are short (~94 tokens with the chat template), which
keeps CPU steps fast.

Deterministic: pure Python, seeded, no network. Train and validation rows never share an input sentence.
The files are committed under recipes/data/ (tests/unit/data/test_demo.py checks they equal this script's output);
run `python scripts/make_demo_data.py` to write them again.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Turn this order into a ticket."
FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Chloe",
         "Mateo", "Sara", "Kwame", "Nina", "Lucas", "Mei", "Hugo", "Amara", "Pavel"]  # fmt: skip
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Silva", "Patel", "Brown", "Khan", "Petrov",
        "Martin", "Rossi", "Berg", "Mensah", "Kowalski", "Dubois", "Chen", "Weber", "Okafor", "Jensen"]  # fmt: skip
CITIES = ["Lisbon", "Oslo", "Nairobi", "Denver", "Osaka", "Lyon", "Porto", "Dublin", "Austin", "Krakow",
          "Toronto", "Seville", "Leeds", "Bergen", "Accra", "Perth", "Quito", "Tallinn", "Tucson", "Malmo"]  # fmt: skip
ITEMS = ["green tea", "coffee beans", "printer paper", "AA batteries", "wool socks", "paper cups",
         "olive oil", "dog treats", "blue pens", "rice", "lemon soap", "sticky notes", "tennis balls",
         "light bulbs", "oat bars", "glass jars"]  # fmt: skip
UNITS = ["boxes", "packs", "bags", "cases", "crates"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip
TEMPLATES = [
    "{name} from {city} ordered {qty} {unit} of {item}, needed by {month} {day}.",
    "Please ship {qty} {unit} of {item} to {name} in {city} before {month} {day}.",
    "Order for {name} ({city}): {qty} {unit} of {item}, due {month} {day}.",
    "{month} {day} is the deadline for {name} in {city}, who wants {qty} {unit} of {item}.",
    "Can {name} in {city} get {qty} {unit} of {item} by {month} {day}?",
    "Deliver {item}, {qty} {unit}, to {name} at the {city} office by {month} {day}.",
]
TRAIN_ROWS = 480
VALIDATION_ROWS = 60
SEED = 0
OUT_DIR = Path(__file__).resolve().parents[1] / "recipes" / "data"


def make_row(rng: random.Random) -> dict[str, str]:
    """One alpaca row: the fixed instruction, an order sentence, and its ticket."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city, item, unit = rng.choice(CITIES), rng.choice(ITEMS), rng.choice(UNITS)
    qty, month, day = rng.randint(2, 48), rng.randrange(12), rng.randint(1, 28)
    sentence = rng.choice(TEMPLATES).format(
        name=name, city=city, qty=qty, unit=unit, item=item, month=MONTHS[month], day=day
    )
    ticket = f"name={name}; city={city}; item={item}; qty={qty}; due={month + 1:02d}-{day:02d}"
    return {"instruction": INSTRUCTION, "input": sentence, "output": ticket}


def generate(
    seed: int = SEED, train_rows: int = TRAIN_ROWS, validation_rows: int = VALIDATION_ROWS
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, validation): distinct sentences, none shared between the splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < train_rows + validation_rows:
        row = make_row(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return rows[:train_rows], rows[train_rows:]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    train, validation = generate()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "orders-train.jsonl", train)
    write_jsonl(args.out_dir / "orders-validation.jsonl", validation)
    print(f"wrote {len(train)} training and {len(validation)} validation rows to {args.out_dir}")


if __name__ == "__main__":
    main()
