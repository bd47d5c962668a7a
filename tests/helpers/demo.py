"""What the demo tests of several tiers share: the demo recipe."""

from __future__ import annotations

from conftest import REPO

RECIPE = REPO / "recipes" / "smollm2-demo.yaml"
