"""Progress you can see without a terminal (issue 12): a line with rate and ETA for training steps and
validation batches, independent of logging_steps."""

from __future__ import annotations

import re
from types import SimpleNamespace

from loratool.progress import Heartbeat
from loratool.train.progress import ConciseProgress


def test_heartbeat_line_has_rate_and_eta():
    lines: list[str] = []
    beat = Heartbeat("merge verification", 10, every=0, write=lines.append)
    beat.tick(4, unit="shards")
    assert re.fullmatch(r"merge verification: 4/10 shards · .+ · ETA \d+:\d\d", lines[0]), lines
    assert beat.line(5, 10.0) == "merge verification: 5/10 steps · 2.0 s per step · ETA 0:10"
    assert beat.line(5, 10.0, "batches") == "merge verification: 5/10 batches · 2.0 s per batch · ETA 0:10"
    silent = Heartbeat("x", 3, every=3600, write=lines.append)
    silent.tick(1)
    assert len(lines) == 1  # shorter than `every`: nothing more printed


def test_training_and_validation_print_lines_without_a_terminal(capsys):
    progress = ConciseProgress(every=0)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=4, epoch=0.0)
    progress.on_train_begin(None, state, None)
    for step in (1, 2):
        state.global_step = step
        progress.on_step_end(None, state, None)
    for _ in range(3):
        progress.on_prediction_step(None, state, None, eval_dataloader=[0, 1, 2])
    progress.on_evaluate(None, state, None)
    out = capsys.readouterr().out
    assert re.search(r"^training \(step 2/4\): 2/4 steps · .* · ETA \d+:\d\d$", out, flags=re.MULTILINE), out
    assert re.search(r"^validation: 3/3 batches · ", out, flags=re.MULTILINE), out
    assert progress.evaluation is None  # the next validation pass counts from zero


def test_verification_passes_print_progress(monkeypatch, tiny_llama):
    """merge and export verification run the probe rows through whole models: they say how far they are."""
    import functools

    from transformers import AutoModelForCausalLM

    import loratool.merge.compare
    from loratool.merge.compare import probe_logits

    monkeypatch.setattr(loratool.merge.compare, "Heartbeat", functools.partial(Heartbeat, every=0))
    lines: list[str] = []
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    logits = probe_logits(model, [[1, 2, 3], [4, 5], [6]], "  verifying the merged model", lines.append)
    assert [t.shape[0] for t in logits] == [3, 2, 1]
    assert len(lines) == 3 and lines[-1].startswith("  verifying the merged model: 3/3 rows · ")


def test_a_long_silent_call_says_it_is_still_running_and_other_lines_keep_it_quiet():
    import time

    from loratool.progress import still_running

    lines: list[str] = []
    with still_running("loading base", lines.append, every=0.1):
        time.sleep(0.45)
    assert lines and all(line.startswith("loading base: still running, 0:00 so far") for line in lines)

    lines.clear()
    with still_running("loading base", lines.append, every=3.0) as write:
        for i in range(50):  # a step that reports by itself, every 20 ms (a loaded machine may stall it)
            write(f"converting: {i}")
            time.sleep(0.02)
    assert not [line for line in lines if "still running" in line] and len(lines) == 50

    lines.clear()
    with still_running("loading base", lines.append, every=5.0):
        pass  # a short call: nothing, and the side thread is gone at once
    assert lines == []
