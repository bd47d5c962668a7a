"""The built-in engine: one thread runs the model, and requests join and leave a running batch between decode
steps, each with its own adapter (PEFT's mixed-adapter batches: `adapter_names=`), sampling and stops.

How a batch is held: one transformers DynamicCache for every row, padded on the left. Requests that arrive
together are prefilled together (left-padded among themselves, as `loratool generate` batches its prompts),
then their cache is padded on the left to the running batch's length, or the batch's to theirs, and joined
to it. The 2-D attention mask marks the padding and each row's position ids count its own tokens only, so a
row computes what it would compute alone. A finished row leaves the cache at once and the leading columns no
row uses any more are dropped: memory follows what is being answered.

Tokens are chosen as transformers' generate chooses them: greedy is the argmax of the last logits; sampling
goes through transformers' temperature and top-p warpers with a generator per request, seeded by its `seed`,
so that a seeded answer does not depend on what else shares its batch.

Rows on plain LoRA adapters, mixed or not, run `mixed.py`'s concatenated path (two matmuls per layer for
every mix); a batch with an adapter it does not handle (DoRA, modules_to_save...) runs PEFT's: `adapter_names=`
when mixed, `set_adapter` / `disable_adapter` when not.

A model whose cache is not plain key/value tensors per layer (a hybrid or a quantized cache) cannot have rows
spliced in: it is batched without joining (requests that arrive while a batch runs wait for it to end).

Bounds: at most `max_batch` rows decode together and `max_queue` wait; `submit` refuses beyond that (429).
A cancelled job (its client went away) leaves the batch at the next step. Loading and unloading adapters run
here too, between two steps (`call`), since PEFT changes the model's modules.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loratool.generate.run import BASE
from loratool.serve.http_errors import ApiError
from loratool.serve.mixed import MixedLora

PEFT_BASE = "__base__"  # PEFT's name, in adapter_names, for a row with no adapter
Listener = Callable[[list[int], "str | None"], None]


@dataclass(eq=False)
class Job:
    """One request's generation. The engine appends to `ids` and sets `finish`; `listener` hears each step
    (new ids, and the finish reason on the last call) from the engine's thread."""

    adapter: str  # the PEFT adapter name, or BASE
    prompt: list[int]
    max_tokens: int
    stop_ids: frozenset[int]  # tokens that end the answer (kept in `ids`)
    tokenizer: Any  # decodes `ids` to find the stop texts
    # Texts that end the answer: an end of turn spelled in several tokens, the request's `stop`.
    stop_texts: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    listener: Listener | None = None
    every_step: bool = True  # tell the listener each token (streaming), or only the finish
    ids: list[int] = field(default_factory=list)
    finish: str | None = None  # stop | length | cancelled | shutdown | error
    error: str | None = None
    cancelled: bool = False
    _generator: Any = None

    def generator(self, device: Any) -> Any:
        import torch

        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator


@dataclass
class _Chore:
    """Work for the engine's thread between two steps (load or unload an adapter), once `ready()`."""

    run: Callable[[], Any]
    ready: Callable[[], bool]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Engine:
    """Continuous batching on one model. `model_of()` returns the model to run (it changes when the first
    adapter is put on a plain model at run time)."""

    def __init__(
        self,
        model_of: Callable[[], Any],
        *,
        pad_id: int,
        context: int | None,
        max_batch: int = 8,
        max_queue: int = 64,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model_of = model_of
        self.pad_id = pad_id
        self.context = context
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.log = log
        self.splice = True  # whether rows may join a running batch (cleared for caches that cannot be padded)
        self.steps = 0  # decode steps run (a forward over the whole batch each)
        self.peak_batch = 0
        self.failed: str | None = None  # why the engine's thread stopped, if it did
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: list[Job] = []
        self._joining: list[Job] = []  # taken from the queue, being prefilled
        self._chores: list[_Chore] = []
        self._deadline: float | None = None  # draining: what is left at this time is cancelled
        self._stopping = False
        self._cache: Any = None
        self._mask: Any = None  # (rows, cache length) 1 = a real token
        self._positions: list[int] = []  # each row's next position id
        self._pending: list[int] = []  # each row's last chosen token, fed at the next step
        self._mixed = MixedLora()
        self._thread = threading.Thread(target=self._run, name="loratool-engine", daemon=True)

    # --- what the HTTP side calls (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._deadline is not None or self._stopping

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"active": len(self._rows) + len(self._joining), "waiting": len(self._waiting)}

    def submit(self, job: Job) -> None:
        """Queue `job`; refused with 503 while shutting down and 429 when the queue is full."""
        with self._lock:
            if self.draining:
                raise ApiError(
                    503, "the server is shutting down and takes no new requests", code="shutting_down"
                )
            if self.failed:
                raise ApiError(
                    503, f"the engine stopped ({self.failed}); restart the server", code="engine_failed"
                )
            answering = len(self._rows) + len(self._joining)
            if answering + len(self._waiting) >= self.max_batch + self.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy: {answering} requests are being answered and {len(self._waiting)} "
                    f"wait (at most {self.max_batch} + {self.max_queue}); retry in a moment",
                    code="queue_full",
                )
            self._waiting.append(job)
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop answering `job` (its client went away): a waiting job is dropped now, a running one at the
        next step."""
        with self._lock:
            if job.finish is not None:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
            self._lock.notify_all()

    def uses(self, adapter: str) -> bool:
        """Whether a running or waiting job uses `adapter`."""
        with self._lock:
            return any(job.adapter == adapter for job in (*self._rows, *self._joining, *self._waiting))

    def call(
        self, run: Callable[[], Any], ready: Callable[[], bool] = lambda: True
    ) -> concurrent.futures.Future:
        """Run `run` on the engine's thread between two steps, once `ready()`; its result in the future."""
        chore = _Chore(run, ready)
        with self._lock:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            self._chores.append(chore)
            self._lock.notify_all()
        return chore.future

    def drain(self, seconds: float) -> None:
        """Take no new jobs; what is still running or waiting in `seconds` is cancelled (finish "shutdown")."""
        with self._lock:
            if self._deadline is None:
                self._deadline = time.monotonic() + seconds
            self._lock.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """End every job ("shutdown") and the engine's thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine's thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # a bug here must not leave requests waiting for ever
            self.log(
                f"error: the engine stopped: {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}"
            )
            with self._lock:
                self.failed = f"{type(exc).__name__}: {exc}"
                for job in [*self._waiting, *self._rows, *self._joining]:
                    job.error = f"the engine stopped: {self.failed}"
                    self._finish(job, "error")
                self._waiting.clear()
        self._clear_batch()
        self._mixed.reset()  # the model as PEFT left it, for whoever uses it next

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._has_work():
                    self._lock.wait(0.1)  # a drain deadline may pass while idle
                if self._stopping:
                    for job in [*self._waiting, *self._rows]:
                        self._finish(job, "shutdown")
                    self._waiting.clear()
                    for chore in self._chores:
                        chore.future.set_exception(ApiError(503, "the server is shutting down"))
                    return
                chores = [chore for chore in self._chores if chore.ready()]
                for chore in chores:
                    self._chores.remove(chore)
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    for job in [*self._waiting, *self._rows]:
                        job.cancelled = True
                        self._finish(job, "shutdown")
                    self._waiting.clear()
                joining = self._joining = self._take_joining()
            for chore in chores:
                self._do_chore(chore)
            try:
                self._drop_cancelled()
                if joining:
                    self._join(joining)
                if self._rows:
                    self._step()
            except Exception as exc:  # a failed forward fails the jobs in it, not the server
                self._fail_batch([*self._rows, *joining], exc)
            with self._lock:
                self._joining = []

    def _has_work(self) -> bool:
        room = self._waiting and (len(self._rows) < self.max_batch if self.splice else not self._rows)
        late = (
            self._deadline is not None
            and time.monotonic() >= self._deadline
            and (self._waiting or self._rows)
        )
        ready = any(chore.ready() for chore in self._chores)
        return bool(self._stopping or room or self._rows or ready or late)

    def _take_joining(self) -> list[Job]:
        if not self.splice and self._rows:
            return []
        joining: list[Job] = []
        while self._waiting and len(self._rows) + len(joining) < self.max_batch:
            job = self._waiting.popleft()
            if not job.cancelled:
                joining.append(job)
        return joining

    def _do_chore(self, chore: _Chore) -> None:
        try:
            self._mixed.reset()  # PEFT's own state while the chore changes its adapters
            chore.future.set_result(chore.run())
        except BaseException as exc:  # handed to the caller, who reports it
            chore.future.set_exception(exc)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together and add the ones not finished by their first token to the batch."""
        import torch

        model = self.model_of()
        device = _device_of(model)
        width = max(len(job.prompt) for job in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt)) + j.prompt for j in jobs], device=device)
        mask = torch.tensor(
            [[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device
        )
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate numbers them
        cache = _new_cache()
        logits = _forward(model, ids, mask, positions, cache, [j.adapter for j in jobs], self._mixed)
        tokens = self._choose(logits, jobs)
        staying = [
            i
            for i, (job, token) in enumerate(zip(jobs, tokens, strict=True))
            if not self._advance(job, token)
        ]
        if not staying:
            return
        if len(staying) < len(jobs):
            _select_rows(cache, staying, device)
            mask = mask[staying]
        new_rows = [jobs[i] for i in staying]
        if self._cache is None:
            self._cache, self._mask = cache, mask
            self.splice = self.splice and _spliceable(cache)
        else:
            self._cache, self._mask = _concat_batches(self._cache, self._mask, cache, mask)
        self._rows += new_rows
        self._positions += [len(job.prompt) for job in new_rows]
        self._pending += [tokens[i] for i in staying]
        self.peak_batch = max(self.peak_batch, len(self._rows))
        self._trim()

    def _step(self) -> None:
        """One decode step for every row: feed each its last token, choose its next."""
        import torch

        model = self.model_of()
        device = _device_of(model)
        ids = torch.tensor(self._pending, device=device)[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        positions = torch.tensor(self._positions, device=device)[:, None]
        adapters = [job.adapter for job in self._rows]
        logits = _forward(model, ids, self._mask, positions, self._cache, adapters, self._mixed)
        self.steps += 1
        tokens = self._choose(logits, self._rows)
        self._positions = [p + 1 for p in self._positions]
        self._pending = tokens
        done = [self._advance(job, token) for job, token in zip(self._rows, tokens, strict=True)]
        self._keep([i for i, finished in enumerate(done) if not finished])

    def _drop_cancelled(self) -> None:
        gone = [i for i, job in enumerate(self._rows) if job.cancelled]
        if not gone:
            return
        for i in gone:
            self._finish(self._rows[i], "cancelled" if self._rows[i].finish is None else self._rows[i].finish)
        self._keep([i for i, job in enumerate(self._rows) if not job.cancelled])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows `keep` of the batch (a batch that cannot be spliced keeps its finished rows
        computing until all are done: its cache may not support dropping rows)."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._clear_batch()
            return
        if not self.splice:
            if all(job.finish is not None for job in self._rows):
                self._clear_batch()
            return
        _select_rows(self._cache, keep, self._mask.device)
        self._mask = self._mask[keep]
        self._rows = [self._rows[i] for i in keep]
        self._positions = [self._positions[i] for i in keep]
        self._pending = [self._pending[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drop the leading cache columns that no row uses (padding left by rows that have finished)."""
        if not self.splice or self._mask is None:
            return
        first = int(self._mask.any(dim=0).int().argmax())
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _clear_batch(self) -> None:
        self._cache = self._mask = None
        self._rows, self._positions, self._pending = [], [], []

    def _choose(self, logits: Any, jobs: list[Job]) -> list[int]:
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        chosen = logits.argmax(dim=-1).tolist()
        for i, job in enumerate(jobs):
            if job.temperature == 0:
                continue
            scores = TemperatureLogitsWarper(job.temperature)(None, logits[i : i + 1])
            if job.top_p < 1:
                scores = TopPLogitsWarper(job.top_p)(None, scores)
            probs = torch.softmax(scores, dim=-1)
            chosen[i] = int(torch.multinomial(probs, 1, generator=job.generator(logits.device)))
        return chosen

    def _advance(self, job: Job, token: int) -> bool:
        """Add `token` to `job`; whether the job is finished (it is told either way)."""
        if job.finish is not None:  # a finished row still computing in a batch that cannot drop rows
            return True
        job.ids.append(token)
        finish = None
        if token in job.stop_ids or (job.stop_texts and _reached_stop_text(job)):
            finish = "stop"
        elif len(job.ids) >= job.max_tokens:
            finish = "length"
        elif self.context is not None and len(job.prompt) + len(job.ids) >= self.context:
            finish = "length"
        if finish is None:
            if job.every_step:
                _tell(job, [token], None, self.log)
            return False
        job.finish = finish
        _tell(job, [token], finish, self.log)
        return True

    def _finish(self, job: Job, reason: str) -> None:
        if job.finish is None:
            job.finish = reason
            _tell(job, [], reason, self.log)

    def _fail_batch(self, jobs: list[Job], exc: Exception) -> None:
        self.log(f"error: generation failed: {type(exc).__name__}: {exc}")
        self.log(traceback.format_exc().rstrip())
        for job in jobs:
            if job.finish is None:
                job.error = f"generation failed: {type(exc).__name__}: {exc}"
                self._finish(job, "error")
        self._clear_batch()
        _free_accelerator_memory()


# --- the model and its cache ---------------------------------------------------------------------------------


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def _new_cache() -> Any:
    # No config: every layer a plain DynamicLayer (a sliding-window model keeps its whole past, which its
    # attention mask still windows), so that the rows of two caches can be padded and joined.
    from transformers import DynamicCache

    return DynamicCache()


def _spliceable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _forward(
    model: Any, ids: Any, mask: Any, positions: Any, cache: Any, adapters: list[str], mixed: MixedLora
) -> Any:
    """The last position's logits (float32) for each row, each row with its adapter."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    options: dict[str, Any] = {"attention_mask": mask, "position_ids": positions, "use_cache": True}
    names = _forward_names(type(plain))
    options["cache" if "cache" in names else "past_key_values"] = cache  # transformers 5 renamed it
    if "logits_to_keep" in names:  # what generate sets: the LM head runs on the last position only
        options["logits_to_keep"] = 1
    if hasattr(model, "peft_config"):
        if mixed.handles(model, adapters):
            with mixed.rows(model, adapters):
                return mixed.last_logits(model, ids, options)
        mixed.peft_path()
        distinct = set(adapters)
        if len(distinct) > 1:  # PEFT's mixed-adapter batch: each row through its own adapter
            options["adapter_names"] = [PEFT_BASE if name == BASE else name for name in adapters]
        elif BASE in distinct:  # one adapter for all rows: PEFT's plain path, as `loratool generate` runs
            with model.disable_adapter():
                return model(input_ids=ids, **options).logits[:, -1, :].float()
        elif model.active_adapter != adapters[0]:
            model.set_adapter(adapters[0])
    return model(input_ids=ids, **options).logits[:, -1, :].float()


_FORWARD_NAMES: dict[type, frozenset[str]] = {}


def _forward_names(model_class: type) -> frozenset[str]:
    if model_class not in _FORWARD_NAMES:
        import inspect

        _FORWARD_NAMES[model_class] = frozenset(inspect.signature(model_class.forward).parameters)
    return _FORWARD_NAMES[model_class]


def _select_rows(cache: Any, rows: list[int], device: Any) -> None:
    import torch

    index = torch.tensor(rows, device=device)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys[index], layer.values[index]


def _concat_batches(cache_a: Any, mask_a: Any, cache_b: Any, mask_b: Any) -> tuple[Any, Any]:
    """One batch from two: the shorter padded on the left (masked), then the rows of b after a's."""
    import torch
    from torch.nn.functional import pad

    width = max(mask_a.shape[1], mask_b.shape[1])
    extra_a, extra_b = width - mask_a.shape[1], width - mask_b.shape[1]
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        layer_a.keys = torch.cat(
            [pad(layer_a.keys, (0, 0, extra_a, 0)), pad(layer_b.keys, (0, 0, extra_b, 0))]
        )
        layer_a.values = torch.cat(
            [pad(layer_a.values, (0, 0, extra_a, 0)), pad(layer_b.values, (0, 0, extra_b, 0))]
        )
    return cache_a, torch.cat([pad(mask_a, (extra_a, 0)), pad(mask_b, (extra_b, 0))])


def _reached_stop_text(job: Job) -> bool:
    """Whether the answer's end now holds one of its stop texts (only the last tokens are decoded: a stop
    text of n characters lies within the last 2n + 4 tokens)."""
    window = 2 * max(len(text) for text in job.stop_texts) + 4
    tail = job.tokenizer.decode(job.ids[-window:], skip_special_tokens=True)
    return any(text and text in tail for text in job.stop_texts)


def _tell(job: Job, tokens: list[int], finish: str | None, log: Callable[[str], None]) -> None:
    if job.listener is None:
        return
    try:
        job.listener(tokens, finish)
    except Exception as exc:  # a listener's bug must not stop the batch
        log(f"warning: a request's listener failed: {type(exc).__name__}: {exc}")


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
