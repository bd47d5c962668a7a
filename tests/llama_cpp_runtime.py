"""A real llama.cpp runtime for tests: greedy decoding of a GGUF file, compared with transformers.

Why node-llama-cpp: it ships llama.cpp as prebuilt CPU binaries on npm, so CI gets a real runtime in seconds
with no compiler and no access to anything but the npm registry. The pinned versions live in
``tests/llama_cpp/package.json`` + ``package-lock.json``; npm installs them once into
``.cache/llama-cpp-node/<hash of those files>/`` (gitignored), and ``tests/llama_cpp/greedy.mjs`` is run there.
Nothing is downloaded or compiled beyond the npm packages: install scripts are off, CUDA/Vulkan/other-OS
binaries (optional dependencies) are left out, and the script asks for the CPU build with building and
downloading disabled.

When node or npm is missing (or the install fails) the tests skip with the reason, except where a runtime is
required: CI (``CI`` set) or ``LORATOOL_REQUIRE_LLAMA_CPP=1``, where they fail instead, so a broken CI image
cannot turn the check into a silent skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
HARNESS_DIR = REPO / "tests" / "llama_cpp"
CACHE_DIR = REPO / ".cache" / "llama-cpp-node"
NODE_MIN_MAJOR = 20  # node-llama-cpp 3.x needs node 20+
INSTALL_TIMEOUT_S = 600  # a cold install fetches ~85 MB (117 packages); it took 6-12 s here
RUN_TIMEOUT_S = 300  # loading + decoding a 135M model on 2 cores takes a few seconds

# Keep node-llama-cpp from fetching llama.cpp sources or building at install or run time.
_NO_DOWNLOAD_ENV = {
    "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true",
    "NODE_LLAMA_CPP_POSTINSTALL": "skip",
    "NODE_LLAMA_CPP_GPU": "false",
}


def runtime_required() -> bool:
    """True where a missing runtime must fail the test instead of skipping it (CI, or asked for)."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("LORATOOL_REQUIRE_LLAMA_CPP") == "1"


def unavailable(reason: str) -> None:
    """Skip the test with ``reason`` locally; fail it where the runtime is required."""
    if runtime_required():
        pytest.fail(f"llama.cpp runtime required (CI or LORATOOL_REQUIRE_LLAMA_CPP=1) but {reason}")
    pytest.skip(f"llama.cpp runtime unavailable: {reason}")


def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"v(\d+)\.", out.strip())
    return int(match.group(1)) if match else None


def _lock_hash() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((HARNESS_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def install_runtime() -> Path:
    """Install the pinned node-llama-cpp once (per lock-file content) and return its directory.

    The install goes to a temporary sibling directory that is renamed into place only when npm has
    succeeded, so an interrupted install never looks complete; two sessions racing both succeed (the
    second rename loses and its copy is thrown away).
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable(f"{'node' if node is None else 'npm'} is not on PATH (install Node.js {NODE_MIN_MAJOR}+)")
    major = _node_major(node)
    if major is None or major < NODE_MIN_MAJOR:
        unavailable(f"node at {node} is version {major}, node-llama-cpp needs {NODE_MIN_MAJOR}+")

    target = CACHE_DIR / _lock_hash()
    if (target / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="installing-", dir=CACHE_DIR))
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(HARNESS_DIR / name, staging / name)
    # `npm ci`: exactly the lock file's versions. Optional dependencies are left out: they are node-llama-cpp's
    # binaries for other platforms and for CUDA/Vulkan, which these CPU tests never load.
    command = [npm, "ci", "--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund"]
    try:
        done = subprocess.run(
            command,
            cwd=staging,
            env={**os.environ, **_NO_DOWNLOAD_ENV},
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        unavailable(f"`{' '.join(command)}` took more than {INSTALL_TIMEOUT_S} s")
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        unavailable(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    try:
        staging.rename(target)
    except OSError:  # another session installed it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class LlamaCppResult:
    prompt_ids: list[int]  # what llama.cpp evaluated (its own tokenization of a prompt text)
    generated: list[int]  # greedy tokens; ends early only with an end-of-generation token, included
    add_bos: bool  # the GGUF's add-BOS flag as llama.cpp reads it
    bos: int | None
    eos: int | None
    log: list[str]  # llama.cpp's warnings and errors


def run_greedy(
    runtime: Path,
    gguf: Path,
    *,
    prompt: str | None = None,
    ids: list[int] | None = None,
    n: int = 16,
    context_size: int = 512,
    lora: Path | None = None,
) -> LlamaCppResult:
    """Greedy-decode ``n`` tokens of ``gguf`` in llama.cpp from a prompt text or from token ids.

    A model llama.cpp refuses fails the test with llama.cpp's own log, which is what an exporter needs.
    """
    if (prompt is None) == (ids is None):
        raise ValueError("give exactly one of prompt and ids")
    script = runtime / "greedy.mjs"
    # Copied on every call (it is tiny) so that the installed runtime never runs a stale script; it must sit
    # next to node_modules for ESM resolution to find node-llama-cpp.
    tmp = runtime / f".greedy-{os.getpid()}.mjs"
    shutil.copy2(HARNESS_DIR / "greedy.mjs", tmp)
    tmp.replace(script)
    args = ["node", str(script), str(gguf), "--n", str(n), "--context-size", str(context_size)]
    args += ["--prompt", prompt] if prompt is not None else ["--ids", ",".join(map(str, ids or []))]
    args += ["--lora", str(lora)] if lora is not None else []  # a GGUF LoRA adapter, applied at scale 1
    try:
        done = subprocess.run(
            args,
            cwd=runtime,
            env={**os.environ, **_NO_DOWNLOAD_ENV},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"llama.cpp greedy decoding of {gguf} took more than {RUN_TIMEOUT_S} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        pytest.fail(
            f"llama.cpp harness gave no JSON for {gguf} (exit {done.returncode}):\n"
            f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}"
        )
    result = json.loads(lines[-1])
    if "error" in result:
        log = "\n".join(result.get("log", []))
        pytest.fail(f"{result['error']}\nllama.cpp log:\n{log}\nstderr: {done.stderr[-2000:]}")
    return LlamaCppResult(
        prompt_ids=result["prompt_ids"],
        generated=result["generated"],
        add_bos=result["add_bos"],
        bos=result["bos"],
        eos=result["eos"],
        log=result["log"],
    )


# --- the transformers side ------------------------------------------------------------------------------


def greedy_transformers(model, prompt_ids: list[int], n: int, stop_ids: set[int]) -> list[int]:
    """Greedy tokens from transformers with the KV cache, ending after ``n`` tokens or a stop token."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=sorted(stop_ids) or None,
            pad_token_id=next(iter(stop_ids), 0),
            repetition_penalty=None,
        )
    return out[0, len(prompt_ids) :].tolist()


def teacher_forced_logits(model, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """transformers' next-token logits (float32) at each step of ``continuation`` after ``prompt_ids``."""
    import torch

    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(continuation)]


@dataclass(frozen=True)
class Agreement:
    """How llama.cpp's greedy tokens compare with transformers', margin-aware.

    ``exact``: positions (from the start) where both runtimes picked the same token before the first
    difference. ``not_near_argmax``: positions where, feeding llama.cpp's own tokens to transformers,
    llama.cpp's choice is not within ``tol`` (logit units) of transformers' best logit — a real disagreement,
    not a near-tie that float rounding may flip. ``first_diff_gap``: transformers' top-1 minus its logit for
    llama.cpp's token at the first difference (None when there is none).
    """

    exact: int
    not_near_argmax: list[int]
    first_diff_gap: float | None
    min_margin: float  # smallest top-1 minus top-2 gap along llama.cpp's path (how close the ties came)


def compare_greedy(
    model, prompt_ids: list[int], llama_tokens: list[int], hf_tokens: list[int], tol: float
) -> Agreement:
    """Compare the two greedy runs. Once the runs differ, their contexts differ, so later positions are
    checked by teacher forcing llama.cpp's tokens through transformers rather than by token equality."""
    import torch

    exact = 0
    for a, b in zip(llama_tokens, hf_tokens, strict=False):
        if a != b:
            break
        exact += 1
    logits = teacher_forced_logits(model, prompt_ids, llama_tokens)
    best = logits.max(dim=-1).values
    chosen = logits[torch.arange(len(llama_tokens)), torch.tensor(llama_tokens)]
    gaps = (best - chosen).tolist()
    top2 = logits.topk(2, dim=-1).values
    return Agreement(
        exact=exact,
        not_near_argmax=[i for i, gap in enumerate(gaps) if gap > tol],
        first_diff_gap=gaps[exact] if exact < len(llama_tokens) else None,
        min_margin=float((top2[:, 0] - top2[:, 1]).min()),
    )
