"""What the multi-process tests of several tiers share: the shipped accelerate configs."""

from __future__ import annotations

from conftest import REPO

CONFIGS = REPO / "configs" / "accelerate"
