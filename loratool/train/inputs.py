"""Can every input of a recipe be found? Checked before anything loads, and reported in one error.

The inputs are the base model, the tokenizer (when `model.tokenizer` names another one) and every data
source. A local path must exist, and be what is wanted (a model directory, a .gguf file, a data file or
directory: a FIFO, a device or a symbolic link loop is named for what it is); a relative one names each
place it was looked for (next to the recipe file, then in the working directory: the recipe loader
resolves it against the first when it exists there).

A hub id needs the hub, or the local Hugging Face cache under HF_HUB_OFFLINE=1. Without that variable,
transformers and datasets retry an unreachable hub for about a minute before failing (58 s and 12 lines
of warnings on a machine without network), so when a hub id is needed one short TCP connection to the
hub (or to the proxy in HTTPS_PROXY) decides within `PROBE_SECONDS` whether it answers. Whether a hub id
exists or is gated is left to the loaders: only the hub can say, and their errors say what to do.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from loratool.data.sources import looks_like_hub_id, not_a_data_file
from loratool.errors import LoratoolError
from loratool.model.gguf_base import is_gguf
from loratool.model.load import check_base_model_exists, looks_like_local_path, path_kind

if TYPE_CHECKING:
    from loratool.recipe import Recipe

PROBE_SECONDS = 3.0  # a reachable hub answers a TCP connect in well under a second, even far away
DEFAULT_ENDPOINT = "https://huggingface.co"
GATED_HINT = (
    "a gated repository (Llama, Gemma, ...) also needs `hf auth login` with a token of an account that "
    "accepted the model's licence on its hub page"
)


@dataclass(frozen=True)
class HubInput:
    """One input that is read from the hub: what it is in the recipe, its id, and whether it is cached."""

    key: str  # base_model, model.tokenizer, data.train[0].path
    repo_id: str
    cached: bool
    local_places: tuple[Path, ...]  # where a local directory of that name was looked for first


def check_inputs(recipe: Recipe, log: Callable[[str], None] = print) -> None:
    """Raise one LoratoolError naming every input of `recipe` that cannot be resolved; return quietly
    when all can. A single problem is raised as it is; several are listed one per line."""

    problems: list[LoratoolError] = []
    hub: list[HubInput] = []
    directory = recipe.directory

    def model_input(key: str, name: str, revision: str | None, cache_files: tuple[str, ...]) -> None:
        places = candidates(name, directory)
        read_from = Path(name).expanduser()  # what the loaders open (the recipe loader made it absolute
        # when it exists next to the recipe)
        if is_gguf(name) or looks_like_local_path(name):
            try:
                check_base_model_exists(name, key)  # a directory (a file for .gguf), or what is there
            except LoratoolError as exc:
                problems.append(exc if os.path.lexists(read_from) else _with_places(exc, name, places))
        else:
            hub.append(HubInput(key, name, model_in_cache(name, revision, cache_files), places))

    model_input("base_model", recipe.base_model, recipe.model.revision, ("config.json",))
    if recipe.model.tokenizer:
        model_input(
            "model.tokenizer",
            recipe.model.tokenizer,
            recipe.model.revision,
            ("tokenizer_config.json", "tokenizer.json"),
        )
    for split in ("train", "validation"):
        sources = getattr(recipe.data, split)
        if not isinstance(sources, list):
            continue  # validation: a fraction split off train, or nothing
        for index, source in enumerate(sources):
            key = f"data.{split}[{index}].path"
            places = candidates(source.path, directory)
            there = next((p for p in places if os.path.lexists(p)), None)
            if there is not None:
                kind = path_kind(there)  # never opened: a FIFO would block
                if kind is not None:
                    problems.append(not_a_data_file(there, kind, key=f"{key}:"))
                continue
            if looks_like_hub_id(source.path):
                hub.append(HubInput(key, source.path, dataset_in_cache(source.path), places))
            else:
                problems.append(_missing_data(key, source.path, places))

    if hub:
        problems += _hub_problems(hub)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = "\n".join(f"  - {p.message}" for p in problems)
        hints = list(dict.fromkeys(p.hint for p in problems if p.hint))
        raise LoratoolError(
            f"{len(problems)} inputs of the recipe cannot be resolved:\n{lines}",
            hint="\n      ".join(hints) if hints else None,
        )


def candidates(path: str, directory: Path | None) -> list[Path]:
    """Where a path from the recipe is looked for: itself when absolute (or ~); else next to the recipe
    file, then in the working directory."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    places = [Path.cwd() / given]
    if directory is not None and directory.resolve() != Path.cwd().resolve():
        places.insert(0, directory / given)
    return [Path(os.path.normpath(p)) for p in places]


def _looked_in(path: str, places: list[Path]) -> str:
    if len(places) < 2:
        return ""
    return (
        f"'{path}' was looked for at {places[0]} (next to the recipe) and {places[1]} (working directory); "
    )


def _with_places(exc: LoratoolError, path: str, places: list[Path]) -> LoratoolError:
    return LoratoolError(exc.message, hint=_looked_in(path, places) + (exc.hint or ""))


def _missing_data(key: str, path: str, places: list[Path]) -> LoratoolError:
    """A data path that is no file or directory (and cannot be a hub id): every place looked, and what
    the nearest existing directory holds (a typo shows at a glance)."""
    where = _looked_in(path, places) or f"no file or directory at {places[0]}; "
    listing = ""
    for place in places:
        if place.parent.is_dir():
            near = sorted(p.name + ("/" if p.is_dir() else "") for p in place.parent.iterdir())
            near = [n for n in near if not n.startswith(".")]
            shown = ", ".join(near[:8]) + (f", ... ({len(near)} in all)" if len(near) > 8 else "")
            listing = f"{place.parent} contains: {shown}; " if near else f"{place.parent} is empty; "
            break
    return LoratoolError(
        f"{key}: data source not found: {places[-1]}",
        hint=where + listing + "give the path of a .json, .jsonl, .csv, .parquet or .txt file, a directory "
        "of them, or a hub dataset id (org/name)",
    )


# --- the hub -------------------------------------------------------------------------------------------


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or its older names) as the libraries read it."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE") for n in names)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to the hub (or to the HTTPS proxy, when one is set) opens within
    `timeout` seconds; else why not, in a few words. Name resolution runs inside the same time limit:
    without network it can hang far longer than the connect itself."""
    url = urlsplit(endpoint())
    proxy = url.scheme == "https" and (
        os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    )
    target = urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else url
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or type(exc).__name__)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    via = f" through the proxy {host}:{port}" if proxy else ""
    if not outcome:
        return f"no answer within {timeout:g} s{via}"
    return None if outcome[0] is None else f"{outcome[0].lower()}{via}"


def hub_cache() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def model_in_cache(repo_id: str, revision: str | None, files: tuple[str, ...]) -> bool:
    """Whether one of `files` of the hub model `repo_id` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        try:
            found = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache(), revision=revision)
        except Exception:  # an id the hub would refuse (bad characters): certainly not cached
            return False
        if isinstance(found, str):
            return True
    return False


def dataset_in_cache(repo_id: str) -> bool:
    """Whether the hub dataset `repo_id` was downloaded (hub cache) or prepared (datasets' cache) here."""
    if (hub_cache() / f"datasets--{repo_id.replace('/', '--')}").is_dir():
        return True
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or str(hub_cache().parent / "datasets")
    return (Path(datasets_cache).expanduser() / repo_id.replace("/", "___")).is_dir()


def _hub_problems(hub: list[HubInput]) -> list[LoratoolError]:
    """Offline: every hub input missing from the cache. Online: none, unless the probe finds the hub
    unreachable; then every hub input, each saying whether the cache has it."""
    if offline_mode():
        return [
            LoratoolError(
                f"{item.key}: '{item.repo_id}' is read as a hub id, HF_HUB_OFFLINE is set and it is not in "
                f"the local cache ({hub_cache()}){_not_local(item)}",
                hint="download it once with network (`hf download ID`; for a dataset add --repo-type "
                "dataset), or point the recipe at a local path; " + GATED_HINT,
            )
            for item in hub
            if not item.cached
        ]
    reason = hub_unreachable()
    if reason is None:
        return []
    if all(item.cached for item in hub):
        todo = "everything needed is in the cache: set HF_HUB_OFFLINE=1 to use it without the network"
    else:
        todo = (
            "set HF_HUB_OFFLINE=1 to use what the Hugging Face cache holds; for the rest, connect to the "
            "network (behind a proxy: set HTTPS_PROXY) or point the recipe at local paths"
        )
    return [
        LoratoolError(
            f"{item.key}: '{item.repo_id}' is read as a hub id, and the hub ({endpoint()}) cannot be reached "
            f"({reason}); it is {'' if item.cached else 'not '}in the local cache{_not_local(item)}",
            hint=f"{todo}; {GATED_HINT}",
        )
        for item in hub
    ]


def _not_local(item: HubInput) -> str:
    """A hub id that may have been meant as a relative path: say where no such path was found."""
    if "/" not in item.repo_id and not item.key.startswith("data."):
        return ""
    return f" (and no file or directory exists at {' or '.join(str(p) for p in item.local_places)})"
