"""The Typer app every command registers on, and what all commands share: `main()`, `--version`, the
mapping of errors to one message and an exit code, and the silencing of known library noise.

(Not named app.py: that module would shadow `loratool.cli.app`, the Typer app itself.)
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from loratool import __version__
from loratool.errors import LoratoolError
from loratool.model import threads
from loratool.model.bnb_cpu import silence_kernel_hub_warning

if TYPE_CHECKING:
    from loratool.recipe import Recipe

# On AVX512-BF16 CPUs, importing bitsandbytes (peft does, on every command) logs that it cannot load a fused CPU
# kernel that loratool turns off anyway (loratool/model/bnb_cpu.py), and offline the `kernels` package first
# logs that it skips that kernel's trust check: not even LORATOOL_DEBUG=1 needs those lines. The filters go on
# here, when the CLI starts, because some commands import the training stages (and so bitsandbytes) before
# they call quiet_libraries, and a launcher's or sweep's every process starts here too. (Only `logging` is
# imported for it: `--help` stays light.)
silence_kernel_hub_warning()

app = typer.Typer(
    help="Fine-tune causal language models with LoRA and QLoRA from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])
INTERNAL_ERROR = (
    3  # exit codes: 0 done, 1 user-fixable error, 2 usage error, 3 internal error, 130 interrupted
)


def debug_enabled() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0", "false")


def reports_errors(command: F) -> F:
    """Map every failure to one clean message and an exit code: 1 for what the user can fix, 3 for an
    internal error, 130 for an interrupt (2, a usage error, comes from the option parser itself).
    LORATOOL_DEBUG=1 shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LoratoolError as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing that looks finished was written", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            typer.echo(
                "hint: this is probably a loratool bug; rerun with LORATOOL_DEBUG=1 for the traceback",
                err=True,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper  # type: ignore[return-value]


# (category, message regex) of library warnings that say nothing a loratool user can act on.
KNOWN_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # peft and trl still call transformers' old names for activation checkpointing (loratool's own recipe key
    # keeps the familiar name and maps it); DPO's trainer turns it off and on around its reference pass
    # (trl/models/utils.py: `gradient_checkpointing_disable`).
    (FutureWarning, r".*`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"),
    # The trainer asks for pinned memory by default; on a CPU-only machine there is nothing to pin.
    (UserWarning, r".*'pin_memory' argument is set as true but no accelerator is found"),
)


def start_libraries() -> None:
    """What a command that computes does before torch loads: the CPU threads for how busy the cores are
    (model/threads.py; said when it departs from torch's default), then the library noise silenced."""
    if OWNS_PROCESS and "torch" not in sys.modules:  # a process that lives on keeps its own threads
        choice = threads.choose()
        threads.apply(choice)
        # Said when loratool departs from the default (a user's OMP_NUM_THREADS is theirs to know), by one
        # process of a launch; on stderr, since `plan --json` and `data --json` print JSON.
        if choice.contended and os.environ.get("RANK", "0") == "0":
            typer.echo(choice.describe(), err=True)
    quiet_libraries()


def quiet_libraries() -> None:
    """Known library noise and info logs drown the few lines that matter; LORATOOL_DEBUG=1 brings them
    back. Only the warnings named here are hidden: any other library warning is printed (and lands in a
    run's train.log), since it may be the one that explains a bad result."""
    # (bitsandbytes' hub-kernel lines are silenced when the CLI starts: see the top of this module.)
    if debug_enabled():
        return
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; the training bar is ours
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # transformers' GGUF reader draws its own tqdm bar, which disable_progress_bar() does not reach; it is
    # silenced where a GGUF file is read (importing the reader here would cost every command a second).
    from loratool.model import gguf_base  # deferred: `loratool --help` loads no stage

    gguf_base.QUIET_READER = True


# The optimizers (training.optim) that are torch's own; every other name may be bitsandbytes' (adamw_8bit,
# paged_*, lion*, ademamix*, rmsprop_bnb*) or a package built on it (galore_adamw_8bit).
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def uses_bitsandbytes(recipe: Recipe) -> bool:
    """Whether training this recipe may use bitsandbytes: a 4- or 8-bit base, an optimizer that is not
    torch's own, or LoftQ (PEFT quantizes with bitsandbytes when it can, and with other numbers without it)."""
    init = recipe.lora.init_lora_weights
    return (
        recipe.is_quantized()
        or (recipe.lora.method != "lorafa" and recipe.training.optim not in TORCH_OPTIMIZERS)
        or (isinstance(init, str) and init.startswith("loftq"))
    )


def skip_bitsandbytes_unless_used(recipe: Recipe) -> bool:
    """Make bitsandbytes unimportable in this process when training `recipe` cannot use it; call it after
    the recipe loads and before the training stages are imported. Returns whether it did.

    `import peft` imports bitsandbytes (peft/helpers.py), and bitsandbytes' import wraps its CPU kernels in
    torch.compile, which imports torch._inductor: on the tiny smoke recipe, 0.8 of the 7.0 CPU seconds from
    launch to the first training step (scripts/bench_startup.py --block-bitsandbytes). peft and transformers
    treat a bitsandbytes that cannot be imported as not installed, which is all a plain LoRA run needs."""
    if uses_bitsandbytes(recipe) or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # `import bitsandbytes` now raises ImportError
    return True


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"loratool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Fine-tune causal language models with LoRA and QLoRA from YAML recipes."""


# True in a `loratool` process (the console script, `python -m loratool`), False where the app is called in
# a process that lives on (a test's CliRunner): only the first may change what the process can import.
OWNS_PROCESS = False


def main() -> None:
    global OWNS_PROCESS
    OWNS_PROCESS = True
    app(prog_name="loratool")
