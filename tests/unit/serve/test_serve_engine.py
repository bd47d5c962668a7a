"""The built-in engine on a tiny model with two adapters: greedy answers equal `loratool generate`'s, alone,
in a mixed batch and when requests join a running batch; seeded sampling ignores the batch; the queue is
bounded, a cancelled job frees its slot, a drain ends what is left, a failed batch does not stop it."""

from __future__ import annotations

import threading
import time

import pytest

from helpers.generate import adapters as adapters  # a fixture, for pytest to find here
from loratool.generate.run import BASE, Sampling, load_adapters, render_for
from loratool.generate.target import resolve_target
from loratool.serve.engine import Engine, Job
from loratool.serve.http_errors import ApiError

PROMPTS = ["Spell the word backwards: falcon", "hi", "What is two plus two? Explain it slowly.", "x y z"]
NAMES = ["one", "two", BASE, "one"]
NEW = 24


@pytest.fixture(scope="module")
def loaded(tiny_llama, adapters):
    return load_adapters(
        resolve_target(tiny_llama), [f"{n}={p}" for n, p in adapters.items()], lambda _: None, warm_up=False
    )


@pytest.fixture(scope="module")
def references(loaded):
    """(prompt ids, `loratool generate`'s greedy ids) per prompt, each with its adapter."""
    out = []
    for name, text in zip(NAMES, PROMPTS, strict=True):
        loaded.use(name)
        ids = render_for(loaded, name, [{"role": "user", "content": text}], None, None)
        out.append((ids, loaded.generate([ids], Sampling(max_new_tokens=NEW))[0]))
    answers = [tuple(new) for _, new in out]
    assert len(set(answers[:3])) == 3  # the adapters and the base answer differently: mixing them can show
    return out


@pytest.fixture()
def engine(loaded):
    engine = Engine(lambda: loaded.model, pad_id=0, context=loaded.loaded.context, max_batch=8)
    engine.start()
    yield engine
    engine.stop()


def job(loaded, i: int, references, **options) -> Job:
    prompting = loaded.prompting_of(NAMES[i])
    settings = {"max_tokens": NEW, "stop_ids": frozenset(prompting.stop_ids), **options}
    return Job(NAMES[i], references[i][0], tokenizer=prompting.tokenizer, **settings)


def finished(jobs: list[Job], timeout: float = 60) -> list[Job]:
    deadline = time.monotonic() + timeout
    while any(j.finish is None for j in jobs):
        assert time.monotonic() < deadline, "the engine did not finish in time"
        time.sleep(0.005)
    return jobs


def test_greedy_alone_and_in_a_mixed_batch_equals_generate(loaded, references, engine):
    for i in range(len(PROMPTS)):
        alone = job(loaded, i, references)
        engine.submit(alone)
        assert finished([alone])[0].ids == references[i][1], NAMES[i]
    batch = [job(loaded, i, references) for i in range(len(PROMPTS))]
    for j in batch:
        engine.submit(j)
    assert [j.ids for j in finished(batch)] == [new for _, new in references]
    assert engine.peak_batch == len(PROMPTS)  # they were decoded together, adapters mixed


def test_requests_joining_a_running_batch_answer_as_alone(loaded, references, engine):
    # A short prompt that runs long: later rows are longer than its cache at first (the batch is padded),
    # shorter later on (they are padded).
    first = job(loaded, 1, references, stop_ids=frozenset(), max_tokens=60)
    engine.submit(first)
    while len(first.ids) < 3:
        time.sleep(0.001)
    later = [job(loaded, i % len(PROMPTS), references) for i in range(6)]
    for j in later:
        engine.submit(j)
        time.sleep(0.002)  # each joins at another step, with another cache length
    finished([first, *later])
    assert [j.ids for j in later] == [references[i % len(PROMPTS)][1] for i in range(6)]
    assert first.ids[: len(references[1][1])] == references[1][1]
    assert engine.peak_batch > 2
    assert engine.stats() == {"active": 0, "waiting": 0}


def test_seeded_sampling_does_not_depend_on_the_batch(loaded, references, engine):
    def sampled(seed: int, with_others: bool) -> list[int]:
        target = job(loaded, 0, references, temperature=1.0, top_p=0.9, seed=seed)
        others = (
            [job(loaded, i, references, temperature=0.8, seed=100 + i) for i in range(1, 4)]
            if with_others
            else []
        )
        for j in [*others, target]:
            engine.submit(j)
        return finished([target, *others])[0].ids

    alone = sampled(7, with_others=False)
    assert sampled(7, with_others=True) == alone
    assert alone != sampled(8, with_others=False)  # another seed samples another answer


def test_a_stop_text_ends_the_answer_where_it_appears(loaded, references, engine):
    prompting = loaded.prompting_of(NAMES[0])
    text = prompting.tokenizer.decode(references[0][1], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = job(loaded, 0, references, stop_texts=(stop,))
    engine.submit(stopped)
    finished([stopped])
    assert stopped.finish == "stop"
    assert stop in prompting.tokenizer.decode(stopped.ids, skip_special_tokens=True)
    assert stopped.ids == references[0][1][: len(stopped.ids)] and len(stopped.ids) < len(references[0][1])


def test_the_queue_is_bounded_and_a_cancelled_job_frees_its_slot(loaded, references):
    engine = Engine(lambda: loaded.model, pad_id=0, context=loaded.loaded.context, max_batch=1, max_queue=1)
    engine.start()
    try:
        running = job(loaded, 0, references, stop_ids=frozenset(), max_tokens=1500)
        waiting = job(loaded, 1, references)
        engine.submit(running)
        engine.submit(waiting)
        with pytest.raises(ApiError) as caught:
            engine.submit(job(loaded, 2, references))
        assert caught.value.status == 429 and "retry" in caught.value.message
        while not running.ids:
            time.sleep(0.001)
        engine.cancel(running)
        finished([running, waiting], timeout=30)
        assert running.finish == "cancelled" and len(running.ids) < 1500
        assert waiting.ids == references[1][1]  # it got the freed slot
        assert engine.stats() == {"active": 0, "waiting": 0}
    finally:
        engine.stop()


def test_draining_refuses_new_jobs_and_ends_the_rest_at_the_deadline(loaded, references):
    engine = Engine(lambda: loaded.model, pad_id=0, context=loaded.loaded.context)
    engine.start()
    heard: list[str | None] = []
    done = threading.Event()
    long = job(loaded, 0, references, stop_ids=frozenset(), max_tokens=2000)
    long.listener = lambda tokens, finish: (heard.append(finish), done.set() if finish else None)
    engine.submit(long)
    engine.drain(0.3)
    with pytest.raises(ApiError) as caught:
        engine.submit(job(loaded, 1, references))
    assert caught.value.status == 503
    assert done.wait(20) and long.finish == "shutdown" and heard[-1] == "shutdown"
    engine.stop()
    assert not engine._thread.is_alive()


def test_a_failed_batch_fails_its_jobs_and_the_engine_goes_on(loaded, references, engine):
    broken = Job(NAMES[0], [10**9], max_tokens=4, stop_ids=frozenset(), tokenizer=None)  # no such token
    engine.submit(broken)
    assert finished([broken])[0].finish == "error" and "generation failed" in broken.error
    after = job(loaded, 1, references)
    engine.submit(after)
    assert finished([after])[0].ids == references[1][1]
