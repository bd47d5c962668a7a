"""The library lines every command used to print, silenced by name (loratool/cli/application.py,
loratool/model/bnb_cpu.py): bitsandbytes' hub-kernel lines from the moment the CLI starts, in every process
(a sweep's cells, a launcher's ranks), and DPO's FutureWarning unless LORATOOL_DEBUG=1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from loratool.cli import application
from loratool.model.bnb_cpu import KERNEL_HUB_MESSAGE, KERNEL_TRUST_LOGGER, KERNEL_TRUST_MESSAGE

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE, cwd=REPO)


def test_the_trust_check_line_of_that_kernel_is_dropped_and_no_other(caplog):
    application.silence_kernel_hub_warning()
    logger = logging.getLogger(KERNEL_TRUST_LOGGER)
    with caplog.at_level(logging.WARNING):
        # kernels/_internals/hf_hub.py's own call, offline
        logger.warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
            "Face Hub is in offline mode."
        )
        logger.warning(
            "Skipping publisher trust check for 'someone/other-kernel' because Hugging Face Hub is in offline mode."
        )
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'someone/other-kernel' because Hugging Face Hub is in offline mode."
    ]


def test_starting_the_cli_silences_both_lines_before_anything_imports_bitsandbytes():
    control = python("import bitsandbytes")
    if KERNEL_TRUST_MESSAGE not in control.stderr and KERNEL_HUB_MESSAGE not in control.stderr:
        pytest.skip("bitsandbytes prints neither line on this machine (no AVX512-BF16 or no `kernels`)")
    # What `loratool sweep` does before any quiet_libraries(): the CLI's modules, then what imports bitsandbytes.
    quiet = python("import loratool.cli\nimport bitsandbytes")
    assert quiet.returncode == 0, quiet.stderr
    assert KERNEL_TRUST_MESSAGE not in quiet.stderr and KERNEL_HUB_MESSAGE not in quiet.stderr


DPO_WARNING = (
    "`gradient_checkpointing_disable` is deprecated and will be removed in v6. Use "
    "`activation_checkpointing_disable` instead."
)


def test_dpo_s_checkpointing_warning_is_known_noise_and_debug_shows_it(monkeypatch):
    monkeypatch.delenv("LORATOOL_DEBUG", raising=False)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        application.quiet_libraries()
        warnings.warn(DPO_WARNING, FutureWarning, stacklevel=1)
        warnings.warn("`gradient_checkpointing_enable` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("some other FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["some other FutureWarning"]

    monkeypatch.setenv("LORATOOL_DEBUG", "1")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        application.quiet_libraries()
        warnings.warn(DPO_WARNING, FutureWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == [DPO_WARNING]
