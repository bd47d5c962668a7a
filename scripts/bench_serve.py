"""Serving: the built-in engine of `loratool serve` (batched, adapters mixed) against one-request-at-a-time
serving (a loop over `loratool generate`'s routine), under 1, 4, 8 and 16 concurrent clients over 3 adapters.

Both sides answer the same requests: request i goes to adapter i % 3 with prompt i % len(PROMPTS), greedy,
`--max-tokens` new tokens at most (answers end at the end of turn as they would in use). The engine side is
the real server: `loratool serve` in a process of its own on a free 127.0.0.1 port, and clients that are threads
of the official openai client in this one, each sending its next request when its last answer arrives. The one-at-a-time side runs each
request through generate's routine (`Adapters.use` + `Adapters.generate`, what `loratool generate` does) and
measures its service time; its latencies under N clients are those of one FIFO worker fed by N such
clients, computed from the measured times (no HTTP on that side, which favours it a little).

Printed per client count: tokens/s of each side and the ratio, p50/p95 latency in seconds, and whether every
engine answer is the one generate gives. The one-at-a-time loop runs before and after the engine's rows and
the faster of the two counts (on a shared machine the slower one is the one other work disturbed). The load
average is printed too: torch's threads wait on each other when other processes hold the cores, which makes
every number noisy. Both sides compute with the thread count `loratool serve` picks (one per core but one)
unless `--threads N` says otherwise.

    python scripts/bench_serve.py [--smollm2] [--clients 1 4 8 16] [--requests 16] [--max-tokens 32] [--threads N]

Default model: a tiny random Llama (seconds); `--smollm2`: SmolLM2-135M-Instruct from scripts/fetch_smollm2.py
(.cache/smollm2), with 3 random LoRA adapters (r=8, all linear layers).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = [
    "Spell the word backwards: falcon",
    "Name three colours.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
]


def random_adapter(base: Path, out: Path, seed: int, scale: float) -> Path:
    """A LoRA adapter (r=8, every linear layer) whose B matrices are random: it changes every answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(scale * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def base_model(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, float]:
    """(what to serve, the checkpoint adapters are built on, the adapters' noise scale)."""
    if args.smollm2:
        if not SMOLLM2.is_file():
            sys.exit(f"{SMOLLM2} is missing: run `python scripts/fetch_smollm2.py` first")
        from loratool.model.gguf_base import resolve_base_model

        return SMOLLM2, Path(resolve_base_model(str(SMOLLM2), log=print)), 0.02
    from loratool.model.tiny import build_tiny_model

    tiny = build_tiny_model(workdir / "tiny-llama", hidden_size=128, num_layers=4, intermediate_size=256)
    return tiny, tiny, 0.5


def requests(count: int) -> list[tuple[str, str]]:
    return [(ADAPTERS[i % len(ADAPTERS)], PROMPTS[i % len(PROMPTS)]) for i in range(count)]


def one_at_a_time(
    adapters, asked: list[tuple[str, str]], max_tokens: int
) -> tuple[list[str], list[float], int]:
    """Each request through generate's routine, one after the other: answers, service times, new tokens.
    Run in a thread of its own, as the engine computes in one: on a loaded machine, torch's parallel regions
    issued from a process's main thread were seen running several times slower than from any other thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        return worker.submit(_one_at_a_time, adapters, asked, max_tokens).result()


def _one_at_a_time(
    adapters, asked: list[tuple[str, str]], max_tokens: int
) -> tuple[list[str], list[float], int]:
    from loratool.generate.run import Sampling, answer_text, render_for

    answers, seconds, tokens = [], [], 0
    for name, prompt in asked:
        started = time.perf_counter()
        adapters.use(name)
        ids = render_for(adapters, name, [{"role": "user", "content": prompt}], None, None)
        new = adapters.generate([ids], Sampling(max_new_tokens=max_tokens))[0]
        answers.append(answer_text(adapters.prompting_of(name).tokenizer, new))
        seconds.append(time.perf_counter() - started)
        tokens += len(new)
    return answers, seconds, tokens


def fifo_latencies(service: list[float], clients: int) -> tuple[list[float], float]:
    """Latencies of one worker serving `clients` closed-loop clients in FIFO order, and the makespan."""
    free_at, ready = 0.0, [0.0] * clients  # when the worker is free; when each client sends its next request
    latencies = []
    for i, seconds in enumerate(service):
        client = i % clients
        start = max(free_at, ready[client])
        free_at = start + seconds
        latencies.append(free_at - ready[client])
        ready[client] = free_at
    return latencies, free_at


def engine_side(url: str, asked: list[tuple[str, str]], clients: int, max_tokens: int):
    """Every request through the server by `clients` concurrent clients: answers, latencies, tokens, wall."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    answers: list[str | None] = [None] * len(asked)
    latencies: list[float] = [0.0] * len(asked)
    tokens = [0] * len(asked)

    def run(worker: int) -> None:
        for i in range(worker, len(asked), clients):
            name, prompt = asked[i]
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=max_tokens,
            )
            latencies[i] = time.perf_counter() - started
            answers[i] = reply.choices[0].message.content
            tokens[i] = reply.usage.completion_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return answers, latencies, sum(tokens), time.perf_counter() - started


def start_server(served: Path, extra: list[tuple[str, Path]], args: argparse.Namespace):
    """`loratool serve` in its own process (its own GIL, as in use); (the process, its base URL)."""
    command = [sys.executable, "-m", "loratool", "serve", str(served), "--port", "0", "--engine", "builtin",
               "--max-batch", str(max(args.clients)), "--max-tokens", str(args.max_tokens)]  # fmt: skip
    for name, path in extra:
        command += ["--adapter", f"{name}={path}"]
    command += ["--threads", str(args.threads)]  # torch's intra-op threads in the server
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 600
    while not any(line.startswith("serving on ") for line in lines):
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit("the server did not start:\n" + "".join(lines[-20:]))
        time.sleep(0.1)
    line = next(line for line in lines if line.startswith("serving on "))
    return process, line.split()[2].removesuffix("/v1")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of a tiny model"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--requests",
        type=int,
        default=48,
        help="requests per client count (each client sends its share in turn)",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of both sides (default: what `loratool serve` picks, one per core but one)",
    )
    args = parser.parse_args()

    import os

    import torch

    from loratool.serve.run import leave_a_core

    # Both sides compute with the same count: the server's default unless told (on 2 cores the loop over
    # generate was faster with 1 thread than with 2 as well, so this is not a handicap for it).
    args.threads = args.threads or leave_a_core(torch.get_num_threads())[0]
    torch.set_num_threads(args.threads)

    from loratool.generate.run import load_adapters
    from loratool.generate.target import resolve_target

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        served_path, checkpoint, scale = base_model(args, workdir)
        extra = [(n, random_adapter(checkpoint, workdir / n, seed, scale)) for seed, n in enumerate(ADAPTERS)]
        target = resolve_target(served_path)
        # The loop over generate runs here; the server loads its own copy in its own process.
        looped = load_adapters(target, [f"{n}={p}" for n, p in extra], lambda _: None)
        asked = requests(args.requests)
        expected, service, loop_tokens = one_at_a_time(looped, asked, args.max_tokens)
        print(f"model: {served_path.name}; adapters: {', '.join(ADAPTERS)}; {args.requests} requests per row, "
              f"at most {args.max_tokens} new tokens each, greedy; torch threads: {torch.get_num_threads()}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
        print(
            f"one at a time: {loop_tokens} tokens in {sum(service):.1f}s = {loop_tokens / sum(service):.1f} tokens/s"
        )
        header = "| clients | engine tok/s | one-at-a-time tok/s | ratio | engine p50 / p95 s | one-at-a-time p50 / p95 s | identical |"
        rows = [header, "|---|---|---|---|---|---|---|"]
        measured = []
        server, url = start_server(served_path, extra, args)
        try:
            engine_side(url, asked[:4], 4, args.max_tokens)  # warm-up: kernels, allocator, connections
            for clients in args.clients:
                answers, latencies, tokens, wall = engine_side(url, asked, clients, args.max_tokens)
                same = sum(a == e for a, e in zip(answers, expected, strict=True))
                measured.append((clients, tokens / wall, latencies, same))
                print(
                    f"{clients} clients: {tokens / wall:.1f} tokens/s, {same}/{len(asked)} as generate",
                    flush=True,
                )
        finally:
            server.terminate()  # SIGTERM: the server drains and exits
            server.wait(120)
        again, service_again, _ = one_at_a_time(looped, asked, args.max_tokens)
        print(f"one at a time, again: {loop_tokens} tokens in {sum(service_again):.1f}s")
        assert again == expected, "the loop over generate answered differently the second time"
        service = min(service, service_again, key=sum)
        loop_rate = loop_tokens / sum(service)
        for clients, rate, latencies, same in measured:
            waits, _ = fifo_latencies(service, clients)
            rows.append(
                f"| {clients} | {rate:.1f} | {loop_rate:.1f} | {rate / loop_rate:.2f}x | "
                f"{percentile(latencies, 0.5):.2f} / {percentile(latencies, 0.95):.2f} | "
                f"{percentile(waits, 0.5):.2f} / {percentile(waits, 0.95):.2f} | "
                f"{'yes' if same == len(asked) else f'NO ({len(asked) - same} differ)'} |"
            )
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
