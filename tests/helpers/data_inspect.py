"""What the `loratool data` tests of several tiers share: chat rows, good and bad."""

from __future__ import annotations


def chat(*turns: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
    return {"messages": messages}


GOOD_ROWS = [chat("the first question", "the first answer", system="be brief")] + [
    chat(f"question {i}", f"answer {i}") for i in range(5)
]
