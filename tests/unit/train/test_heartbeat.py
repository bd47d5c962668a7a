"""How long a process of a multi-process run waits for the others, and how it names one that stopped
answering or failed: heartbeats of two "ranks" in one in-memory store (torch's HashStore), on a clock the
test moves. The launches themselves are in tests/slow/test_multiprocess_stops_slow.py."""

from __future__ import annotations

import json

import pytest

from loratool.errors import LoratoolError
from loratool.train import heartbeat
from loratool.train.heartbeat import Heartbeat, wait_limit

LIMIT_S = 15


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ranks():
    """Rank 0 and rank 1 of one run, beating in one store, with the clock they read."""
    from torch.distributed import HashStore

    store, clock = HashStore(), Clock()
    beats = [
        Heartbeat(store, rank, 2, LIMIT_S, clock=clock, host=f"h{rank}", pid=100 + rank, machine=str(rank))
        for rank in (0, 1)
    ]
    for beat in beats:
        beat.store.set(f"who/{beat.rank}", json.dumps(beat.me.__dict__))
        beat.beat_once()
    beats[0].beat_once()  # rank 0 has now heard rank 1's first beat, at the start time
    return beats, clock


def test_the_wait_is_the_recipes_else_a_minute_on_cpu_and_ten_on_cuda():
    assert wait_limit(None, cuda=False) == 60
    assert wait_limit(None, cuda=True) == 600
    assert wait_limit(15, cuda=True) == wait_limit(15, cuda=False) == 15
    import dataclasses

    from transformers import TrainingArguments

    library = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}["ddp_timeout"]
    assert wait_limit(None, cuda=True) < library  # below transformers' 30 minutes


def test_the_timeout_reaches_the_trainer_arguments(tmp_path):
    from loratool.recipe.schema import TrainingSection
    from loratool.train.arguments import trainer_fields

    def fields(**training):
        section = TrainingSection(output_dir=str(tmp_path), **training)
        return trainer_fields(section, checkpoints_dir=tmp_path, has_validation=False, bf16=False, fp16=False)

    assert fields(ddp_timeout=15)["ddp_timeout"] == 15
    assert fields()["ddp_timeout"] == heartbeat.wait_limit_here(None) < 1800


def test_a_rank_whose_beat_stops_is_named_after_the_limit(ranks):
    (zero, one), clock = ranks
    clock.now += LIMIT_S - 1
    zero.beat_once()  # rank 1 did not beat: quiet, but not for long enough
    assert zero.trouble() is None
    clock.now += 7
    zero.beat_once()
    problem = zero.trouble()
    assert isinstance(problem, LoratoolError)
    assert problem.message == (
        "rank 1 (host h1, pid 101) stopped answering 21 s ago (no heartbeat); stopping this rank too"
    )
    assert "--resume" in problem.hint and "ddp_timeout = 15 s" in problem.hint


def test_a_rank_that_keeps_beating_is_never_stale(ranks):
    (zero, one), clock = ranks
    for _ in range(10):
        clock.now += LIMIT_S - 1
        one.beat_once()
        zero.beat_once()
    assert zero.trouble() is None and one.trouble() is None


def test_a_beat_this_process_did_not_read_is_not_taken_for_a_hang(ranks):
    # This process's own reads stalled (its beat thread starved): the others are not blamed for it.
    (zero, one), clock = ranks
    clock.now += 10 * LIMIT_S
    assert zero.trouble() is None


def test_a_failed_rank_is_named_with_its_reason(ranks):
    (zero, one), clock = ranks
    one.publish_failure(LoratoolError("data.train[0]: data source not found: train.jsonl\n  - and more"))
    zero.beat_once()
    problem = zero.trouble()
    assert problem.message == (
        "rank 1 (host h1, pid 101) failed: data.train[0]: data source not found: train.jsonl; and more; "
        "stopping this rank too"
    )


def test_a_wait_ends_as_soon_as_another_rank_fails(ranks):
    (zero, one), _ = ranks
    one.publish_failure(ValueError("bad row"))  # no beat since: the wait reads the news itself
    with pytest.raises(LoratoolError, match=r"rank 1 \(host h1, pid 101\) failed: ValueError: bad row"):
        zero.wait_for("never-posted")


def test_a_rank_that_left_is_not_stale(ranks):
    (zero, one), clock = ranks
    one.leave()
    zero.beat_once()
    clock.now += 10 * LIMIT_S
    zero.beat_once()
    assert zero.trouble() is None


def test_waits_get_what_was_posted(ranks):
    (zero, one), _ = ranks
    zero.post("main-first/0", b"ok")
    assert one.wait_for("main-first/0") == b"ok"
    assert zero.next_key("main-first") == "main-first/0" and zero.next_key("main-first") == "main-first/1"
    assert zero.same_machine(0) and not zero.same_machine(1)


def test_a_failed_collective_is_explained_by_the_rank_behind_it(ranks, monkeypatch):
    (zero, one), _ = ranks
    monkeypatch.setattr(heartbeat, "_running", zero)
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms")
    bug = ValueError("a bug of this process")
    assert heartbeat.explain(bug) is bug  # nothing wrong elsewhere: the error is this process's own
    one.publish_failure(KeyboardInterrupt("terminated by signal 15"))
    zero.beat_once()
    explained = heartbeat.explain(gloo_timeout)
    assert isinstance(explained, LoratoolError) and explained.__cause__ is gloo_timeout
    assert "rank 1 (host h1, pid 101) failed: terminated by signal 15" in explained.message
    mine = LoratoolError("mine")
    assert heartbeat.explain(mine) is mine


def test_one_line_says_why_a_process_stopped():
    assert heartbeat.one_line(KeyboardInterrupt()) == "interrupted"
    assert (
        heartbeat.one_line(OSError(28, "No space left on device"))
        == "OSError: [Errno 28] No space left on device"
    )
    assert len(heartbeat.one_line(LoratoolError("x" * 2000))) == 500
