"""`loratool generate` and `loratool chat`: greedy answers equal transformers' own generate, several
adapters on one base answer like each adapter alone, a foreign adapter is refused, long prompts are cut
instead of crashing, and chat works on piped input — through the real CLI, on tiny models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import conftest
from loratool.cli import app
from loratool.generate.run import Sampling, fit_to_context, generate_ids, run_generate

PROMPT = "Spell the word backwards: falcon"


def cli(*args: str | Path, input: str | None = None):
    return CliRunner().invoke(app, [*map(str, args)], input=input)


def random_adapter(base: Path, out: Path, seed: int) -> Path:
    """Large random weights on every linear layer, so that adapters visibly change the answers."""
    return conftest.random_adapter(base, out, seed, scale=0.5, target_modules="all-linear")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(tiny_llama, tmp / name, seed) for name, seed in (("one", 1), ("two", 2))}


def reference_answer(
    base: Path,
    adapter: Path | None,
    prompt: str,
    max_new_tokens: int,
    *,
    tokenizer_dir: Path | None = None,
    system: str | None = None,
    tools: list | None = None,
) -> str:
    """transformers' own greedy generate on the chat-templated prompt (the template of `tokenizer_dir`,
    default the base's, with the BOS the tokenizer puts before text first), stopping at the tokenizer's EOS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    bos = tokenizer.bos_token_id
    if tokenizer("x")["input_ids"][:1] == [bos] and ids[0, 0] != bos:  # the BOS tokenizer(text) adds
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_greedy_answer_equals_transformers_generate(tiny_llama, adapters):
    records = run_generate(
        tiny_llama,
        prompts=[PROMPT],
        adapters=[f"one={adapters['one']}"],
        max_new_tokens=12,
        log=lambda _: None,
    )
    assert records[0]["adapter"] == "one"
    assert records[0]["answer"] == reference_answer(tiny_llama, adapters["one"], PROMPT, 12)
    assert records[0]["answer"]  # something was generated


def test_left_padded_batch_equals_prompts_one_by_one(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = [[1, 5, 9, 44, 7, 300, 12, 19, 20], [1, 8, 8], [1, 100, 200, 300, 400, 17]]
    sampling = Sampling(max_new_tokens=10)
    together = generate_ids(model, prompts, sampling, pad_id=0, stop_ids=[2], batch_size=8)
    alone = [generate_ids(model, [p], sampling, pad_id=0, stop_ids=[2])[0] for p in prompts]
    assert together == alone
    assert all(len(ids) == 10 or ids[-1] == 2 for ids in together)


def test_several_adapters_switch_per_prompt(tiny_llama, adapters):
    result = cli(
        "generate",
        tiny_llama,
        "--adapter",
        f"one={adapters['one']}",
        "--adapter",
        f"two={adapters['two']}",
        "--prompt",
        PROMPT,  # the first adapter answers prompts that name none
        "--prompt",
        f"@two: {PROMPT}",
        "--prompt",
        f"@base: {PROMPT}",
        "--max-new-tokens",
        "12",
    )
    assert result.exit_code == 0, result.output
    answers = dict(re.findall(r"^\[(\w+)\] .*\n(.*)$", result.output, flags=re.MULTILINE))
    assert set(answers) == {"one", "two", "base"}
    assert answers["one"] == reference_answer(tiny_llama, adapters["one"], PROMPT, 12)
    assert answers["two"] == reference_answer(tiny_llama, adapters["two"], PROMPT, 12)
    assert answers["base"] == reference_answer(tiny_llama, None, PROMPT, 12)
    assert len(set(answers.values())) == 3  # each adapter really answered
    assert re.search(r"adapter one loaded from .* in \d+ ms", result.output)
    assert re.search(r"adapter switches: 2, mean [\d.]+ ms", result.output)


def test_run_directory_with_an_extra_adapter(tmp_path, tiny_llama, adapters, smoke_data):
    from conftest import smoke_recipe, write_recipe

    recipe = smoke_recipe(
        tiny_llama, smoke_data, tmp_path / "run", training={"max_steps": 2, "save_steps": 2}
    )
    assert cli("train", write_recipe(tmp_path / "r.yaml", recipe)).exit_code == 0
    result = cli(
        "generate",
        tmp_path / "run",
        "--adapter",
        adapters["two"],
        "--prompt",
        PROMPT,
        "--prompt",
        f"@two: {PROMPT}",
    )
    assert result.exit_code == 0, result.output
    assert f"[run] {PROMPT}" in result.output and f"[two] {PROMPT}" in result.output


def test_adapter_of_another_base_is_refused(tmp_path, tiny_llama, tiny_model_factory):
    other = tiny_model_factory("llama", hidden_size=32)
    foreign = random_adapter(other, tmp_path / "foreign", seed=3)
    result = cli("generate", tiny_llama, "--adapter", f"x={foreign}", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert (
        f"adapter x ({foreign}) was trained on {other}, but the loaded base is {tiny_llama}" in result.output
    )
    assert "hint: pass as TARGET the base" in result.output and "Traceback" not in result.output


def test_adapter_with_same_shapes_but_other_weights_is_refused(tmp_path, tiny_llama, tiny_model_factory):
    other = tiny_model_factory("llama", seed=7)  # same architecture and sizes, other weights
    foreign = random_adapter(other, tmp_path / "foreign", seed=3)
    result = cli("generate", tiny_llama, "--adapter", f"x={foreign}", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert "their weights differ" in result.output


def test_too_long_prompt_is_cut_with_a_warning(tiny_model_factory):
    short = tiny_model_factory("llama", max_position_embeddings=48)
    long_prompt = " ".join(["falcon"] * 80)
    result = cli("generate", short, "--prompt", long_prompt, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: the prompt is \d+ tokens; its first \d+ were cut", result.output)
    assert fit_to_context(list(range(100)), 48, 8) == (list(range(60, 100)), 60)

    result = cli("generate", short, "--prompt", "hi", "--max-new-tokens", "48")
    assert result.exit_code == 1
    assert (
        "--max-new-tokens 48 leaves no room for a prompt: the model's context is 48 tokens" in result.output
    )


def test_adapter_for_other_shapes_is_refused_without_fingerprints(tmp_path, tiny_llama, tiny_model_factory):
    import json

    foreign = random_adapter(tiny_model_factory("llama", hidden_size=32), tmp_path / "foreign", seed=3)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"  # not on this machine: no fingerprint
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    result = cli("generate", tiny_llama, "--adapter", f"x={foreign}", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert "was trained on some-org/some-model, but the loaded base is" in result.output
    assert "shape mismatch" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "@nobody: hi"], "no adapter named 'nobody' (loaded: base)"),
        ([], "no prompt given"),
        (["--adapter", "/nonexistent/adapter", "--prompt", "hi"], "adapter directory not found"),
    ],
)
def test_generate_mistakes(tiny_llama, args, message):
    result = cli("generate", tiny_llama, *args)
    assert result.exit_code == 1 and message in result.output


def test_duplicate_adapter_names_are_refused(tiny_llama, adapters):
    result = cli(
        "generate",
        tiny_llama,
        "--adapter",
        f"a={adapters['one']}",
        "--adapter",
        f"a={adapters['two']}",
        "--prompt",
        "hi",
    )
    assert result.exit_code == 1 and "the name 'a' is already taken" in result.output


# --- chat ----------------------------------------------------------------------------------------------


def test_chat_with_piped_input(tiny_llama, adapters):
    script = f"{PROMPT}\n/adapter two\n/adapters\n/adapter nobody\n/reset\n/exit\nnever read\n"
    result = cli(
        "chat", tiny_llama, "--adapter", f"one={adapters['one']}", "--adapter", f"two={adapters['two']}",
        "--max-new-tokens", "12", input=script,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The first answer streamed is the greedy answer of the first adapter to the same single-turn prompt.
    assert reference_answer(tiny_llama, adapters["one"], PROMPT, 12) in result.output
    assert re.search(r"\(now answering with two; switched in [\d.]+ ms\)", result.output)
    assert "adapters: one, two (active), base" in result.output
    assert "no adapter named 'nobody'" in result.output and "(history cleared)" in result.output


def test_chat_keeps_the_history_within_the_context(tiny_model_factory):
    short = tiny_model_factory("llama", max_position_embeddings=64)
    lines = "\n".join(f"Tell me about the falcon number {i}, please." for i in range(6)) + "\n"
    result = cli("chat", short, "--max-new-tokens", "8", input=lines)
    assert result.exit_code == 0, result.output
    assert "oldest message(s) to stay within the context" in result.output


def test_sampling_is_reproducible_with_a_seed(tiny_llama, adapters):
    def sample(seed: int) -> str:
        records = run_generate(
            tiny_llama,
            prompts=[PROMPT],
            adapters=[f"one={adapters['one']}"],
            max_new_tokens=16,
            temperature=1.5,
            seed=seed,
            log=lambda _: None,
        )
        return records[0]["answer"]

    first = sample(1)
    assert sample(1) == first
    assert {sample(2), sample(3)} != {first}  # another seed samples another answer


# --- each adapter in its own format (issue 12) ------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def adapter_with_template(base: Path, out: Path, seed: int, template: str) -> Path:
    """A random adapter saved with the base's tokenizer under another (built-in) chat template, as a run
    trained with data.chat_template would save it."""
    from transformers import AutoTokenizer

    from loratool.data.templates import builtin_template

    adapter = random_adapter(base, out, seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = builtin_template(template)
    tokenizer.save_pretrained(adapter)
    return adapter


def test_each_adapter_is_prompted_with_its_own_template(tmp_path, tiny_llama, adapters):
    zephyr = adapter_with_template(tiny_llama, tmp_path / "zephyr", seed=5, template="zephyr")
    result = cli(
        "generate", tiny_llama, "--adapter", f"z={zephyr}", "--adapter", f"one={adapters['one']}",
        "--prompt", PROMPT, "--prompt", f"@one: {PROMPT}", "--prompt", f"@base: {PROMPT}",
        "--max-new-tokens", "12",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    answers = dict(re.findall(r"^\[(\w+)\] .*\n(.*)$", result.output, flags=re.MULTILINE))
    # z answers as it does alone under the zephyr template it was saved with, not the base's chatml
    assert answers["z"] == reference_answer(tiny_llama, zephyr, PROMPT, 12, tokenizer_dir=zephyr)
    assert answers["one"] == reference_answer(tiny_llama, adapters["one"], PROMPT, 12)
    assert answers["base"] == reference_answer(tiny_llama, None, PROMPT, 12)
    # the formats differ, and that is said once per adapter that differs from the first
    assert re.search(r"note: one is prompted with .*which differs from z's", result.output)
    assert re.search(r"note: base is prompted with .*which differs from z's", result.output)
    assert re.search(r"warmed up in [\d.]+s", result.output)


def test_tools_are_rendered_by_the_template(tmp_path, tiny_llama):
    import json

    chatml = adapter_with_template(tiny_llama, tmp_path / "chatml", seed=6, template="chatml")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    records = run_generate(
        tiny_llama,
        prompts=["What is the weather in Paris?"],
        adapters=[f"c={chatml}"],
        max_new_tokens=10,
        tools=tools,
        warm_up=False,
        log=lambda _: None,
    )
    expected = reference_answer(tiny_llama, chatml, "What is the weather in Paris?", 10, tokenizer_dir=chatml,
                                tools=TOOLS)  # fmt: skip
    assert records[0]["answer"] == expected
    without = reference_answer(tiny_llama, chatml, "What is the weather in Paris?", 10, tokenizer_dir=chatml)
    assert expected != without  # the tool definitions really were in the prompt

    # the tiny base's own template drops tools: refused, naming who and why
    result = cli("generate", tiny_llama, "--tools", tools, "--prompt", "hi")
    assert result.exit_code == 1
    assert "--tools: base is prompted with the model's own chat template, which does not write tool" in (
        result.output
    )
    tools.write_text('{"name": "x"}')
    result = cli("generate", tiny_llama, "--tools", tools, "--prompt", "hi")
    assert result.exit_code == 1 and "expected a non-empty JSON list of tool definitions" in result.output


def test_run_adapter_gets_its_system_prompt_and_a_merged_model_its_run_name(tmp_path, tiny_llama, smoke_data):
    from conftest import smoke_recipe, write_recipe
    from loratool.generate.run import load_adapters, render_for
    from loratool.generate.target import resolve_target

    recipe = smoke_recipe(
        tiny_llama, smoke_data, tmp_path / "calm", training={"max_steps": 2, "save_steps": 2}
    )
    recipe["data"]["train"][0]["system_prompt"] = "You are a calm falcon."
    assert cli("train", write_recipe(tmp_path / "r.yaml", recipe)).exit_code == 0
    loaded = load_adapters(resolve_target(tmp_path / "calm"), [], log=lambda _: None, warm_up=False)
    user = [{"role": "user", "content": "hi"}]
    text = loaded.prompting_of("calm").tokenizer.decode(render_for(loaded, "calm", user, None, None))
    assert "You are a calm falcon." in text  # the trained system prompt, unasked
    text = loaded.prompting_of("calm").tokenizer.decode(render_for(loaded, "calm", user, "Be brief.", None))
    assert "Be brief." in text and "calm falcon" not in text  # --system wins
    base_text = loaded.prompting_of("base").tokenizer.decode(render_for(loaded, "base", user, None, None))
    assert "calm falcon" not in base_text  # the base was not trained with it

    merged = cli("merge", "--adapter", tmp_path / "calm", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    result = cli("generate", tmp_path / "merged", "--prompt", PROMPT, "--prompt", f"@calm: {PROMPT}",
                 "--max-new-tokens", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count(f"[calm] {PROMPT}") == 2 and "[base]" not in result.output
