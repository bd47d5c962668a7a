"""`loratool generate` and `loratool chat`, and the generation routine `eval` shares with them.

The base is loaded once (loratool.generate.target); the run's adapter and every `--adapter` are PEFT adapters on
that one base, switched with `set_adapter` (the reported switch cost is that call's wall time). A prompt
picks its adapter with an `@NAME:` prefix (`@base:` answers with every adapter switched off); prompts
without one go to the first adapter (the run's own, for a run TARGET).

Each adapter is prompted as it was trained (`Prompting`): with the chat template saved next to it (a run's
tokenizer, or a tokenizer saved with a bare adapter) and the system prompt its recipe gave every source;
`@base:` with the base's own template. When two of them differ, a note says so. `--tools FILE` passes
tool definitions to the template as training did (rows with `tools`). Prompts get the BOS the tokenizer
puts before text when the template leaves it out, as training rows do (data.templates.with_bos).
Generation stops at EOS or the template's end-of-turn token — or its end-of-turn text, when the vocabulary
spells it in several tokens (ChatML on Gemma); that text is cut from the answer. A merged model answers
under the name of its run.

`generate` and `chat` (and `eval`, around its generation) fold the active adapter into the base weights while
it answers (PEFT's `merge_adapter`; loratool.generate.fold says what folds and why): the tuned model then
generates about as fast as the base instead of paying PEFT's LoRA layers on every decoding step. A switch
unfolds it first. `serve` does not fold (a batch there mixes adapters).

The first generate call on a freshly loaded model is slower (kernel selection, allocator and KV-cache
warm-up): a one-token warm-up right after loading takes that cost, and its time is printed. A prompt that would not leave
`max_new_tokens` of room in the model's context is cut from the left, with a warning.

An `--adapter` that is an unsealed or damaged checkpoint of a run is loaded with a warning naming the newest
complete one (`warn_of_checkpoint`); merge refuses it unless --force.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.adapter.files import check_against_base, read_adapter
from loratool.data.templates import renders_tools, stop_texts, with_bos
from loratool.errors import LoratoolError
from loratool.generate.fold import Folding
from loratool.generate.target import Loaded, Target, load_target, resolve_target, stop_ids_of
from loratool.model.fingerprint import weights_fingerprint
from loratool.model.load import load_tokenizer, local_model_dir
from loratool.rundir.outputs import read_json
from loratool.rundir.records import RunDir, find_adapter, read_run, read_training_run

BASE = "base"  # the adapter name that means "no adapter"
_PICK = re.compile(r"^@([A-Za-z0-9_.\-]+):\s*(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. temperature 0 is greedy decoding (deterministic)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --- the shared routine --------------------------------------------------------------------------------


def fit_to_context(ids: list[int], context: int | None, max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt cut from the left so that prompt + max_new_tokens fits the context; and how many tokens
    were cut. The end of a prompt (the question, the generation prompt) matters most, so it is kept."""
    if context is None:
        return ids, 0
    if max_new_tokens >= context:
        raise LoratoolError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's context is "
            f"{context} tokens",
            hint=f"pass --max-new-tokens below {context}",
        )
    room = context - max_new_tokens
    if len(ids) <= room:
        return ids, 0
    return ids[len(ids) - room :], len(ids) - room


def generate_ids(
    model: Any,
    prompts: list[list[int]],
    sampling: Sampling,
    *,
    pad_id: int,
    stop_ids: list[int],
    batch_size: int = 8,
    streamer: Any = None,
    progress: Callable[[int], None] | None = None,
    stop_texts: list[str] | None = None,
    tokenizer: Any = None,
) -> list[list[int]]:
    """New token ids for each prompt (the stop token or stop text, if reached, included). Prompts go in
    batches of similar length, padded on the left so that every row's next token comes right after its
    prompt. `stop_texts` (an end of turn spelled in several tokens) need the `tokenizer`."""
    import torch
    from transformers import set_seed

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    set_seed(sampling.seed)
    options: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not sampling.greedy,
        "eos_token_id": stop_ids or None,
        "pad_token_id": pad_id,
        "use_cache": True,  # training loads set config.use_cache = False; generation wants the KV cache
    }
    if stop_texts:  # transformers' StopStringCriteria: it matches the text across token boundaries
        options.update(stop_strings=list(stop_texts), tokenizer=tokenizer)
    if sampling.greedy:  # a checkpoint's generation_config may carry sampling defaults: neutralise them
        options.update(temperature=None, top_p=None, top_k=None)
    else:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    for start in range(0, len(order), batch_size):
        if progress is not None:  # called with the prompts done so far (metrics.Heartbeat.tick)
            progress(start)
        batch = [prompts[i] for i in order[start : start + batch_size]]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            generated = model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **options)
        for row, index in zip(generated[:, width:].tolist(), order[start : start + batch_size], strict=True):
            row = _until_stop(row, stop_ids)
            span = stop_text_span(tokenizer, row, stop_texts) if stop_texts else None
            out[index] = row[: span[1]] if span else row
    return out


def _until_stop(row: list[int], stop_ids: list[int]) -> list[int]:
    """The generated ids up to and including the first stop token (after it, a batch pads)."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def stop_text_span(tokenizer: Any, ids: list[int], stop_texts: list[str]) -> tuple[int, int] | None:
    """Where the first stop text lies in `ids`, in tokens: (tokens wholly before it, tokens up to its end);
    None when no stop text is in their text."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    hits = [(text.find(stop), stop) for stop in stop_texts if stop and stop in text]
    if not hits:
        return None
    at, stop = min(hits)

    def tokens_reaching(chars: int) -> int:
        """The fewest leading tokens whose text is at least `chars` long (binary search: prefixes grow)."""
        low, high = 0, len(ids)
        while low < high:
            mid = (low + high) // 2
            if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= chars:
                high = mid
            else:
                low = mid + 1
        return low

    return tokens_reaching(at + 1) - 1, tokens_reaching(at + len(stop))


def answer_text(tokenizer: Any, ids: list[int], stop_texts: list[str] | None = None) -> str:
    """The decoded answer, without special tokens, and cut before the first stop text (an end of turn
    spelled in several tokens)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in stop_texts or ():
        text = text.split(stop, 1)[0] if stop else text
    return text.strip()


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None
) -> list[int]:
    """The conversation so far, rendered by the chat template with the assistant's generation prompt
    (and the tool definitions, as training rendered rows that have `tools`)."""
    if not tokenizer.chat_template:
        # A base model without a template: the last message is sent as raw text.
        return tokenizer(messages[-1]["content"])["input_ids"]

    options = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
    return tokenizer(with_bos(tokenizer, text), add_special_tokens=False)["input_ids"]


# --- several adapters on one base ----------------------------------------------------------------------


@dataclass
class Prompting:
    """How one adapter (or the base) is prompted: the tokenizer carrying the chat template it was trained
    with, the system prompt its training data had, and the tokens that end its answers."""

    tokenizer: Any
    system: str | None
    stop_ids: list[int]
    origin: str  # where the template comes from, in words
    stop_texts: list[str] = field(default_factory=list)  # an end of turn spelled in several tokens

    @property
    def template(self) -> str | None:
        template = self.tokenizer.chat_template
        return template if isinstance(template, str) or template is None else repr(template)

    def messages(self, history: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
        """The conversation with its system message: `system` (--system) wins over the trained one."""
        system = system if system is not None else self.system
        return ([{"role": "system", "content": system}] if system else []) + history

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> list[int]:
        return render_prompt(self.tokenizer, messages, tools)


@dataclass
class Adapters:
    """The loaded model and the adapters on it; `use(name)` activates one and returns the switch cost."""

    loaded: Loaded
    names: list[str]  # in load order; names[0] is the default
    load_ms: dict[str, float]
    active: str | None = None
    plain: str = BASE  # how the model with no adapter active is named (a merged model: its run's name)
    prompting: dict[str, Prompting] = field(default_factory=dict)
    sources: dict[str, Callable[[], Prompting]] = field(default_factory=dict)  # built on first use
    log: Callable[[str], None] = print
    folding: Folding | None = None  # folds the active adapter into the base weights; None: never (serve)

    @property
    def model(self) -> Any:
        return self.loaded.model

    def label(self, name: str) -> str:
        """The name answers are printed under."""
        return self.plain if name == BASE else name

    def use(self, name: str) -> float:
        """Activate adapter `name` (or BASE: none), folded in when folding. Returns the wall time of the
        switch (unfolding and folding included), in ms."""
        if name == self.active:
            return 0.0
        started = time.perf_counter()
        if self.folding is not None:
            self.folding.unfold()  # before set_adapter, which would unmerge it anyway (with a warning)
        if name != BASE:
            self.model.set_adapter(name)
            if self.folding is not None:
                self.folding.fold(name, self.label(name))
        self.active = name
        return 1000 * (time.perf_counter() - started)

    def prompting_of(self, name: str) -> Prompting:
        """How `name` is prompted; a note is printed when its template is not the default adapter's."""
        if name not in self.prompting:
            self.prompting[name] = self.sources[name]()
            first = self.names[0] if self.names else BASE
            if name != first and first in self.prompting:
                own, default = self.prompting[name], self.prompting[first]
                if own.template != default.template:
                    self.log(
                        f"note: {self.label(name)} is prompted with {own.origin}, which differs from "
                        f"{self.label(first)}'s ({default.origin}): each answers in the format it was trained on"
                    )
                if own.system != default.system and own.system:
                    self.log(f"note: {self.label(name)} gets the system prompt it was trained with")
        return self.prompting[name]

    def generate(self, prompts: list[list[int]], sampling: Sampling, streamer: Any = None) -> list[list[int]]:
        """Generate with the active adapter (with every adapter off for BASE)."""
        from contextlib import nullcontext

        prompting = self.prompting_of(self.active or BASE)
        off = self.model.disable_adapter() if self.active == BASE and self.names else nullcontext()
        with off:
            return generate_ids(
                self.model,
                prompts,
                sampling,
                pad_id=_pad_id(prompting.tokenizer, self.loaded.tokenizer),
                stop_ids=prompting.stop_ids,
                streamer=streamer,
                stop_texts=prompting.stop_texts,
                tokenizer=prompting.tokenizer,
            )

    def add(self, name: str, adapter_dir: Path) -> float:
        """Put one more adapter on the model, prompted as `--adapter NAME=DIR` is (its own tokenizer and system
        prompt); the load time in ms. A plain model becomes a PEFT model with its first adapter."""
        warn_of_checkpoint(name, adapter_dir, self.log)
        started = time.perf_counter()
        loaded = self.loaded
        if hasattr(loaded.model, "peft_config"):
            loaded.model.load_adapter(adapter_dir, adapter_name=name)
        else:
            from peft import PeftModel  # deferred: peft loads torch

            loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir, adapter_name=name)
        loaded.model.eval()
        self.names.append(name)
        self.sources[name] = _adapter_prompting_source(adapter_dir, loaded, self.sources[BASE])
        self.prompting_of(name)  # built now, not on the first answer
        return 1000 * (time.perf_counter() - started)

    def remove(self, name: str) -> None:
        """Take adapter `name` off the model; the last one leaves the plain base (no LoRA layers)."""
        if self.folding is not None:
            self.folding.unfold()
        loaded = self.loaded
        if len(self.names) == 1:
            loaded.model = loaded.model.unload()
        else:
            loaded.model.delete_adapter(name)
        loaded.model.eval()
        self.names.remove(name)
        self.sources.pop(name, None)
        self.prompting.pop(name, None)
        if self.active == name:
            self.active = None

    def warm_up(self) -> float:
        """One short generate: the first call on a fresh model pays for kernel selection and memory
        set-up (several times a later prompt's time on CPU); paid here, and said, not on the first answer."""
        started = time.perf_counter()
        tokenizer = self.loaded.tokenizer
        ids = tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
        generate_ids(self.model, [ids], Sampling(max_new_tokens=2), pad_id=_pad_id(tokenizer, tokenizer),
                     stop_ids=[])  # fmt: skip
        return time.perf_counter() - started


def _pad_id(tokenizer: Any, fallback: Any) -> int:
    for source in (tokenizer, fallback):
        for value in (source.pad_token_id, source.eos_token_id):
            if value is not None:
                return int(value)
    return 0


def parse_adapter_options(options: list[str], target: Target) -> list[tuple[str, Path]]:
    """`[NAME=]DIR` options as (name, adapter directory); names are unique and never `base`."""

    taken = {target.adapter_name} if target.kind == "run" else set()
    parsed = []
    for option in options:
        name, sep, path = option.partition("=")
        if not sep:
            name, path = "", option
        adapter_dir = find_adapter(Path(path))
        name = name.strip() or adapter_dir.name
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise LoratoolError(
                f"--adapter {option!r}: the name {name!r} may only hold letters, digits, '.', '_' and '-'",
                hint="name it explicitly: --adapter NAME=DIR",
            )
        if name == BASE or name in taken:
            raise LoratoolError(
                f"--adapter {option!r}: the name {name!r} is "
                + ("reserved for the base model" if name == BASE else "already taken"),
                hint="give it another name: --adapter NAME=DIR",
            )
        taken.add(name)
        parsed.append((name, adapter_dir))
    return parsed


def warn_of_checkpoint(name: str, adapter_dir: Path, log: Callable[[str], None]) -> None:
    """Warn when adapter `name` is a checkpoint that is unsealed (interrupted mid-save) or damaged since.

    A warning, where merge refuses unless --force: a merge writes a model that outlives the check and is
    shared as the run's, while an answer here is read at once, next to the warning; a half-written
    safetensors file still fails to load. Loading a checkpoint to look at it mid-run stays one step."""
    run = read_training_run(adapter_dir)
    if run.checkpoint is None or run.checkpoint_problem is None:
        return
    usable, _ = RunDir(run.record.path).latest_checkpoint() if run.record is not None else (None, [])
    instead = (
        f"the newest complete checkpoint is {usable}" if usable else "the run has no complete checkpoint"
    )
    log(
        f"warning: adapter {name}: the checkpoint {adapter_dir} is {run.checkpoint_problem}, so its weights "
        f"may be half written or not the ones the run saved; {instead}"
    )


def check_adapter_base(name: str, adapter_dir: Path, target: Target, loaded: Loaded) -> None:
    """Refuse an adapter trained on another base than the loaded one, naming both.

    Weights fingerprints (run.json) decide when both sides have one; otherwise the adapter's tensors must
    fit the loaded model's shapes (an adapter for another size or architecture is caught either way)."""

    run = read_training_run(adapter_dir)
    config = read_json(adapter_dir / "adapter_config.json")
    adapter_base = run.base.id or config.get("base_model_name_or_path") or "an unrecorded base"
    recorded = run.base.fingerprint
    if not recorded and config.get("base_model_name_or_path"):
        try:
            found = local_model_dir(
                config["base_model_name_or_path"], config.get("revision"), log=lambda _: None
            )
        except LoratoolError:  # a .gguf base named by its file name, not here: the shapes decide below
            found = None
        recorded = weights_fingerprint(found) if found is not None else None
    loaded_print = target.base_fingerprint
    mismatch = (
        f"adapter {name} ({adapter_dir}) was trained on {adapter_base}, but the loaded base is "
        f"{target.base_id}" + (" (a merged model)" if target.kind == "merged" else "")
    )
    hint = "pass as TARGET the base (or a run on the base) this adapter was trained on"
    if recorded and loaded_print and not target.base_matches(recorded):
        raise LoratoolError(
            f"{mismatch}: their weights differ (fingerprints {recorded[:31]}… and {loaded_print[:31]}…)",
            hint=hint,
        )
    if loaded.quantized:
        return  # packed 4-bit shapes say nothing; PEFT's own load checks the rest
    try:
        updates = read_adapter(adapter_dir).updates
    except LoratoolError:
        return  # an adapter feature the merge code does not read: PEFT's own load checks it
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    # The base's own tensor names: PEFT wraps targeted layers (base_layer) and saved modules
    # (original_module, plus a trained copy per adapter) of the adapters already loaded.
    shapes = {
        re.sub(r"\.(base_layer|original_module)(?=\.)", "", k): tuple(v.shape)
        for k, v in base.state_dict().items()
        if ".lora_" not in k and ".modules_to_save." not in k
    }
    try:
        check_against_base(updates, shapes)
    except LoratoolError as exc:
        raise LoratoolError(f"{mismatch}: {exc.message}", hint=hint) from None


def load_adapters(
    target: Target,
    options: list[str],
    log: Callable[[str], None],
    *,
    warm_up: bool = True,
    fold: bool = False,
) -> Adapters:
    """Load TARGET and put every `--adapter` on its base; each adapter's base is checked first. `fold`:
    the active adapter is folded into the base weights (loratool.generate.fold)."""
    extra = parse_adapter_options(options, target)
    loaded = load_target(target, log)
    names = [target.adapter_name] if target.kind == "run" else []
    load_ms: dict[str, float] = {}
    log(f"loaded in {loaded.load_seconds:.1f}s ({loaded.device}, {loaded.dtype})")
    sources: dict[str, Callable[[], Prompting]] = {}
    own = Prompting(
        loaded.tokenizer, _run_system(target), loaded.stop_ids, _own_origin(target), loaded.stop_texts
    )
    if target.kind == "run":
        sources[target.adapter_name] = lambda: own
        sources[BASE] = lambda: _run_base_prompting(target, loaded, log)
    else:
        sources[BASE] = lambda: own
    for name, adapter_dir in extra:
        warn_of_checkpoint(name, adapter_dir, log)
        check_adapter_base(name, adapter_dir, target, loaded)
        started = time.perf_counter()
        try:
            if names:
                loaded.model.load_adapter(adapter_dir, adapter_name=name)
            else:
                from peft import PeftModel

                loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir, adapter_name=name).eval()
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise LoratoolError(
                f"adapter {name} ({adapter_dir}) does not fit the loaded base {target.base_id}: {first}",
                hint="pass as TARGET the base (or a run on the base) this adapter was trained on",
            ) from None
        load_ms[name] = 1000 * (time.perf_counter() - started)
        names.append(name)
        sources[name] = _adapter_prompting_source(adapter_dir, loaded, sources[BASE])
        log(f"adapter {name} loaded from {adapter_dir} in {load_ms[name]:.0f} ms")
    adapters = Adapters(loaded, names, load_ms, plain=plain_name(target), sources=sources, log=log)
    if fold and names:
        adapters.folding = Folding(loaded.model, loaded.quantized, log)
    adapters.use(names[0] if names else BASE)
    adapters.prompting_of(adapters.active or BASE)
    if warm_up:
        seconds = adapters.warm_up()
        log(f"warmed up in {seconds:.1f}s (the first generate on a fresh model sets up kernels and memory)")
    return adapters


def plain_name(target: Target) -> str:
    """How answers of TARGET with no adapter active are labelled: a merged model by its run's name."""
    if target.kind != "merged":
        return BASE
    adapter_path = target.merge.adapter.path if target.merge is not None else None
    return _safe_name(Path(adapter_path).name if adapter_path else target.path.name)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "merged"


def trained_system(system_prompts: list[str | None]) -> str | None:
    """The system prompt training put before conversations: the sources' `system_prompt` when they all
    agree (sources with different ones, or only some with one, have no single prompt to repeat)."""
    distinct = set(system_prompts)
    return distinct.pop() if len(distinct) == 1 else None


def _run_system(target: Target) -> str | None:
    if target.recipe is None:
        return None
    return trained_system([source.system_prompt for source in target.recipe.data.train])


def _own_origin(target: Target) -> str:
    if target.kind == "base":
        return "the model's own chat template"
    return f"the chat template its run trained with ({target.run_dir or target.path})"


def _run_base_prompting(target: Target, loaded: Loaded, log: Callable[[str], None]) -> Prompting:
    """The base of a run target, prompted with the base's own tokenizer and template."""

    assert target.recipe is not None
    tokenizer = load_tokenizer(target.recipe.base_model, target.recipe.model, log)
    origin = (
        "the base's own chat template"
        if tokenizer.chat_template
        else "raw text (the base has no chat template)"
    )

    return Prompting(tokenizer, None, stop_ids_of(tokenizer, loaded.model), origin, stop_texts(tokenizer))


def _adapter_prompting_source(
    adapter_dir: Path, loaded: Loaded, base: Callable[[], Prompting]
) -> Callable[[], Prompting]:
    """How an extra adapter is prompted: with the tokenizer saved next to it (a run's, or a bare adapter's)
    and its run's system prompt; an adapter saved without a tokenizer: like the base."""

    def build() -> Prompting:
        from transformers import AutoTokenizer

        if not (adapter_dir / "tokenizer_config.json").is_file():
            fallback = base()
            return Prompting(fallback.tokenizer, fallback.system, fallback.stop_ids,
                             f"{fallback.origin} (no tokenizer was saved with {adapter_dir})",
                             fallback.stop_texts)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        record = read_run(adapter_dir)
        recipe = record.recipe() if record is not None else None
        system = trained_system([s.system_prompt for s in recipe.data.train]) if recipe is not None else None
        origin = f"the chat template saved with it ({adapter_dir})"
        return Prompting(
            tokenizer, system, stop_ids_of(tokenizer, loaded.model), origin, stop_texts(tokenizer)
        )

    return build


def read_tools(path: Path | None) -> list[Any] | None:
    """`--tools FILE`: a JSON list of tool definitions ({"type": "function", "function": {...}}), or an
    object with a "tools" list — the shape training rows carry in their `tools` field."""
    import json

    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoratoolError(f"--tools {path}: cannot read it: {exc.strerror or exc}",
                            hint="pass a JSON file with a list of tool definitions") from None  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoratoolError(f"--tools {path}: not valid JSON: {exc}",
                            hint="pass a JSON file with a list of tool definitions") from None  # fmt: skip
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        raise LoratoolError(
            f"--tools {path}: expected a non-empty JSON list of tool definitions (objects)",
            hint='e.g. [{"type": "function", "function": {"name": "get_weather", "description": "...", '
            '"parameters": {"type": "object", "properties": {...}}}}]',
        )
    return value


def render_for(
    adapters: Adapters,
    name: str,
    history: list[dict[str, Any]],
    system: str | None,
    tools: list[Any] | None,
) -> list[int]:
    """The prompt for adapter `name`, in the format it was trained on; tools refused by its template."""

    prompting = adapters.prompting_of(name)
    if tools and not (prompting.tokenizer.chat_template and renders_tools(prompting.tokenizer)):
        raise LoratoolError(
            f"--tools: {adapters.label(name)} is prompted with {prompting.origin}, which does not write tool "
            "definitions into the prompt",
            hint="drop --tools for this adapter, or train with a chat template that renders `tools`",
        )
    return prompting.render(prompting.messages(history, system), tools)


def pick_adapter(prompt: str, adapters: list[str], plain: str = BASE) -> tuple[str | None, str]:
    """`@NAME: text` -> (NAME, text); a plain prompt -> (None, prompt). `@PLAIN:` (a merged model's run
    name) is the model with no adapter, like `@base:`."""
    match = _PICK.match(prompt)
    if match is None:
        return None, prompt
    name, text = match.group(1), match.group(2)
    if name == plain:
        return BASE, text
    if name != BASE and name not in adapters:
        known = ", ".join([*adapters, plain])
        raise LoratoolError(
            f"--prompt {prompt[:40]!r}: no adapter named {name!r} (loaded: {known})",
            hint="load it with --adapter NAME=DIR, or pick one of the names above",
        )
    return name, text


# --- generate ------------------------------------------------------------------------------------------


def run_generate(
    target: str | Path,
    *,
    prompts: list[str],
    adapters: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    tools: Path | None = None,
    warm_up: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Answer each prompt with the adapter it names (see module docstring); returns one record per prompt."""
    if not prompts:
        raise LoratoolError(
            "no prompt given", hint='pass --prompt "..." (repeatable; "@NAME: ..." picks an adapter)'
        )
    tool_list = read_tools(tools)
    resolved = resolve_target(target)
    known = [resolved.adapter_name] if resolved.kind == "run" else []
    known += [name for name, _ in parse_adapter_options(adapters, resolved)]
    plain = plain_name(resolved)
    picked = [pick_adapter(p, known, plain) for p in prompts]  # refuse an unknown name before loading
    loaded = load_adapters(resolved, adapters, log, warm_up=warm_up, fold=True)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    records = []
    if not loaded.loaded.tokenizer.chat_template:
        log("note: this model has no chat template; prompts are sent as raw text")
    for name, text in picked:
        name = name or (loaded.names[0] if loaded.names else BASE)
        switch_ms = loaded.use(name)
        rendered = render_for(loaded, name, [{"role": "user", "content": text}], system, tool_list)
        ids, cut = fit_to_context(rendered, loaded.loaded.context, max_new_tokens)
        if cut:
            log(
                f"warning: the prompt is {len(ids) + cut} tokens; its first {cut} were cut so that it and "
                f"{max_new_tokens} new tokens fit the model's context of {loaded.loaded.context}"
            )
        started = time.perf_counter()
        new_ids = loaded.generate([ids], sampling)[0]
        seconds = time.perf_counter() - started
        answer = answer_text(loaded.prompting_of(name).tokenizer, new_ids)
        label = loaded.label(name)
        log(f"[{label}] {text}")
        log(answer)
        log(
            f"({len(new_ids)} tokens in {seconds:.2f}s"
            + (f"; switched adapter in {switch_ms:.2f} ms" if switch_ms else "")
            + ")"
        )
        records.append(
            {
                "adapter": label,
                "prompt": text,
                "answer": answer,
                "new_tokens": len(new_ids),
                "switch_ms": switch_ms,
            }
        )
    switches = [r["switch_ms"] for r in records if r["switch_ms"]]
    if switches:
        log(
            f"adapter switches: {len(switches)}, mean {sum(switches) / len(switches):.2f} ms, "
            f"max {max(switches):.2f} ms (set_adapter"
            + (", unfold and fold" if loaded.folding is not None else "")
            + "; the base stays loaded)"
        )
    return records


# --- chat ----------------------------------------------------------------------------------------------

CHAT_HELP = "commands: /adapter NAME (base = no adapter), /adapters, /reset, /exit"


def run_chat(
    target: str | Path,
    *,
    adapters: list[str],
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    tools: Path | None = None,
    log: Callable[[str], None] = print,
    write: Callable[[str], None] | None = None,
) -> None:
    """An interactive conversation on stdin/stdout, answers streamed token by token. The history is kept
    within the context by dropping the oldest turns. Works with piped input (one message per line).
    Each adapter is prompted with its own template and system prompt (`/adapter` switches both)."""
    write = write or (lambda text: print(text, end="", flush=True))
    tool_list = read_tools(tools)
    resolved = resolve_target(target)
    loaded = load_adapters(resolved, adapters, log, fold=True)
    if not loaded.prompting_of(loaded.active or BASE).tokenizer.chat_template:
        raise LoratoolError(
            f"{resolved.path} has no chat template, so there is no conversation format to chat in",
            hint='use `loratool generate TARGET --prompt "..."` for raw-text completion',
        )
    sampling = Sampling(max_new_tokens, temperature, top_p)
    history: list[dict[str, str]] = []
    log(f"chatting with {loaded.label(loaded.active or BASE)} · {CHAT_HELP}")
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            write("> ")
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _chat_command(line, loaded, history, log):
                break
            continue
        history.append({"role": "user", "content": line})
        name = loaded.active or BASE
        ids, dropped, cut = _fit_history(
            lambda turns, n=name: render_for(loaded, n, turns, system, tool_list),
            history,
            loaded.loaded.context,
            max_new_tokens,
        )
        if dropped:
            log(f"(dropped the {dropped} oldest message(s) to stay within the context)")
        if cut:
            log(f"warning: the message is too long for the context; its first {cut} tokens were cut")
        prompting = loaded.prompting_of(name)
        streamer = _streamer(prompting.tokenizer, write, prompting.stop_texts)
        new_ids = loaded.generate([ids], sampling, streamer=streamer)[0]
        history.append(
            {"role": "assistant", "content": answer_text(prompting.tokenizer, new_ids, prompting.stop_texts)}
        )


def _chat_command(
    line: str, adapters: Adapters, history: list[dict[str, str]], log: Callable[[str], None]
) -> bool:
    """Handle a /command; False means leave the chat."""
    command, _, argument = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        history.clear()
        log("(history cleared)")
    elif command == "/adapters":
        log(
            "adapters: "
            + ", ".join(
                f"{adapters.label(n)}{' (active)' if n == adapters.active else ''}"
                for n in [*adapters.names, BASE]
            )
        )
    elif command == "/adapter":
        name = argument.strip()
        name = BASE if name == adapters.plain else name
        if name != BASE and name not in adapters.names:
            log(f"no adapter named {name!r}; loaded: {', '.join([*adapters.names, adapters.plain])}")
        else:
            switch_ms = adapters.use(name)
            adapters.prompting_of(name)
            log(f"(now answering with {adapters.label(name)}; switched in {switch_ms:.2f} ms)")
    else:
        log(f"unknown command {command}; {CHAT_HELP}")
    return True


def _fit_history(
    render: Callable[[list[dict[str, str]]], list[int]],
    history: list[dict[str, str]],
    context: int | None,
    max_new_tokens: int,
) -> tuple[list[int], int, int]:
    """The rendered conversation within the context: oldest messages dropped first (the system message
    and the newest user message are kept), then the newest message cut from the left if still too long.
    Returns (ids, messages dropped, tokens cut)."""
    dropped = 0
    while True:
        ids = render(history)
        if context is None or len(ids) + max_new_tokens <= context or len(history) == 1:
            break
        count = min(2, len(history) - 1)  # a user message and its answer
        del history[:count]
        dropped += count
    ids, cut = fit_to_context(ids, context, max_new_tokens)
    return ids, dropped, cut


def _streamer(tokenizer: Any, write: Callable[[str], None], stop_texts: list[str] | None = None) -> Any:
    """A transformers TextStreamer that writes through `write` (the CLI's output), ending with a newline.
    A stop text (an end of turn spelled in several tokens) is not written: text that may be its start is
    held back until it is known not to be."""
    from transformers import TextStreamer

    stops = [stop for stop in stop_texts or () if stop]

    class Streamer(TextStreamer):
        pending, stopped = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.stopped:
                return write("\n") if stream_end else None
            self.pending += text
            hits = [self.pending.find(stop) for stop in stops if stop in self.pending]
            if hits:
                self.pending, self.stopped = self.pending[: min(hits)].rstrip(), True
            keep = 0 if self.stopped or stream_end else held_back(self.pending, stops)
            write(self.pending[: len(self.pending) - keep] + ("\n" if stream_end else ""))
            self.pending = self.pending[len(self.pending) - keep :]

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop text."""
    return max(
        (n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])),
        default=0,
    )
