"""The command line's shape, read from the Typer commands themselves: every command answers --help with
all its options, and generate and chat take the same sampling options (so a drift in one fails here)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from loratool import __version__
from loratool.cli import app

# The order `loratool --help` lists them in: the order of the data flow.
COMMANDS = [
    "train",
    "data",
    "plan",
    "sweep",
    "launch",
    "recipe-reference",
    "recipe-schema",
    "merge",
    "export",
    "eval",
    "generate",
    "chat",
    "serve",
]


def commands() -> dict[str, Any]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def options_of(command: str) -> dict[str, dict[str, Any]]:
    """Option name -> what the command declares for it: type, default, bounds, repeatable, flag, metavar."""
    typer_command = commands()[command]
    hints = typing.get_type_hints(inspect.unwrap(typer_command.callback))  # the types, Annotated stripped
    return {
        param.opts[0]: {
            "type": hints[param.name],
            "default": param.default,
            "min": param.min,
            "max": param.max,
            "multiple": param.multiple,
            "flag": param.is_flag,
            "metavar": param.metavar,
        }
        for param in typer_command.params
        if param.param_type_name == "option"
    }


def test_every_command_is_registered_in_order() -> None:
    assert list(commands()) == COMMANDS
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    section = result.output.split("Commands:", 1)[1]
    assert [line.split()[0] for line in section.splitlines() if line.strip()] == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_lists_its_options(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output
    params = commands()[command].params
    for param in params:
        if param.param_type_name == "argument":
            assert param.metavar in result.output
        for name in [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else []:
            assert name in result.output, f"{command} --help does not list {name}"


def test_generate_and_chat_take_the_same_sampling_options() -> None:
    generate, chat = options_of("generate"), options_of("chat")
    # generate alone takes its prompts as options, and a seed.
    assert set(generate) - set(chat) == {"--prompt", "--seed"}
    assert set(chat) <= set(generate)
    for name in chat:
        g, c = generate[name], chat[name]
        if (
            name == "--max-new-tokens"
        ):  # the one default each command sets itself: a chat answer may be longer
            assert (g.pop("default"), c.pop("default")) == (256, 512)
        assert g == c, name
    assert (generate["--temperature"]["default"], generate["--top-p"]["default"]) == (0.0, 1.0)


def test_every_generating_command_is_greedy_by_default() -> None:
    sampling = ("--temperature", "--top-p", "--seed")
    generate = {name: options_of("generate")[name] for name in sampling}
    for command in ("eval", "chat"):
        options = options_of(command)
        for name in sampling:
            if name in options:
                assert options[name] == generate[name], f"{command} {name}"
    assert generate["--temperature"]["default"] == 0.0 and generate["--temperature"]["min"] == 0.0


def test_python_dash_m_loratool_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loratool", "--version"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"loratool {__version__}"
