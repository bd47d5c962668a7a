"""Tokenizing and masking, checked against the tokenizer's own apply_chat_template; chat templates."""

from __future__ import annotations

import pytest

from helpers.data import IGNORE, chatml_tokenizer, loss_ids, template_ids
from loratool.data.formats import Completion, Conversation, RowError
from loratool.data.templates import BUILTIN_TEMPLATES, apply_chat_template_choice, builtin_template
from loratool.data.tokenize import encode
from loratool.errors import LoratoolError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Switzerland? Zürich, maybe 🙂"},
    {"role": "assistant", "content": "Bern, not Zürich — 日本 is elsewhere."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
TOOLS = [{"name": "search_recipes", "description": "Search recipes", "parameters": {"type": "object"}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Find a chicken recipe."},
    {"role": "assistant", "content": '{"name": "search_recipes", "arguments": {"q": "chicken"}}'},
    {"role": "tool", "content": '{"recipes": ["stir fry"]}'},
    {"role": "assistant", "content": "Try the stir fry."},
]


@pytest.fixture()
def tok():
    return chatml_tokenizer()


def test_conversation_ids_equal_apply_chat_template_and_loss_is_the_answers_with_end_of_turn(tok):
    ids, labels = encode(Conversation(CONVERSATION), tok, completion_only_loss=True)
    assert ids == template_ids(tok, CONVERSATION)
    # ChatML writes no BOS, and this tokenizer puts one before text (like Llama's): it is put first, once.
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(loss_ids(ids, labels)) == "".join(answer + "<|im_end|>\n" for answer in ANSWERS)
    assert loss_ids(ids, labels).count(tok.eos_token_id) == len(ANSWERS)  # the model learns to stop


def test_only_tokens_inside_assistant_turns_carry_loss(tok):
    """Independent of how encode finds the turns: locate each message in the rendered text by search."""
    ids, labels = encode(Conversation(CONVERSATION), tok, completion_only_loss=True)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE  # the BOS put before the rendered text
    labels = labels[1:]
    cursor, regions = 0, []
    for message in CONVERSATION:
        start = text.index(message["content"], cursor)
        cursor = start + len(message["content"])
        end = cursor + len("<|im_end|>\n") if message["role"] == "assistant" else cursor
        regions.append((message["role"], start, end))
    for (start, _), label in zip(offsets, labels, strict=True):
        role = next((r for r, a, b in regions if a <= start < b), None)
        assert (label != IGNORE) == (role == "assistant"), (text[start : start + 10], role)


def test_without_completion_only_loss_every_token_but_the_first_carries_loss(tok):
    ids, labels = encode(Conversation(CONVERSATION), tok, completion_only_loss=False)
    assert labels[0] == IGNORE  # position 0 is never predicted
    assert labels[1:] == ids[1:]


def test_tools_are_passed_to_the_template(tok):
    apply_chat_template_choice(tok, "chatml")
    ids, labels = encode(Conversation(TOOL_CONVERSATION, tools=TOOLS), tok, completion_only_loss=True)
    assert ids == template_ids(tok, TOOL_CONVERSATION, tools=TOOLS)
    assert '"search_recipes"' in tok.decode(ids[: ids.index(tok.eos_token_id)])  # listed in the system turn
    expected = "".join(m["content"] + "<|im_end|>\n" for m in TOOL_CONVERSATION if m["role"] == "assistant")
    assert tok.decode(loss_ids(ids, labels)) == expected


def test_conversational_prompt_completion_trains_on_the_completion_turns_only(tok):
    messages = CONVERSATION[1:]
    ids, labels = encode(Conversation(messages, trained_from=3), tok, completion_only_loss=True)
    assert ids == template_ids(tok, messages)
    assert tok.decode(loss_ids(ids, labels)) == ANSWERS[1] + "<|im_end|>\n"


def test_conversation_without_assistant_turn_has_no_loss(tok):
    ids, labels = encode(Conversation(CONVERSATION[:2]), tok, completion_only_loss=True)
    assert ids and set(labels) == {IGNORE}


def test_conversation_opening_with_the_assistant(tok):
    messages = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]
    ids, labels = encode(Conversation(messages), tok, completion_only_loss=True)
    assert ids == template_ids(tok, messages)
    # Position 0 is never learned; the rest of the turn is.
    assert tok.decode(loss_ids(ids, labels)) == tok.decode(template_ids(tok, messages[:1])[1:])


# --- completions ------------------------------------------------------------------------------------------


def test_completion_masks_the_prompt_and_learns_completion_and_eos(tok):
    ids, labels = encode(Completion("Question: 2+2?\nAnswer:", " 4"), tok, completion_only_loss=True)
    prompt = tok("Question: 2+2?\nAnswer:")["input_ids"]
    answer = tok(" 4", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels == [IGNORE] * len(prompt) + answer + [tok.eos_token_id]
    assert tok.decode(loss_ids(ids, labels)) == " 4<|im_end|>"


def test_text_learns_everything_after_bos(tok):
    text = "Once upon a time, there was a tiny model."
    ids, labels = encode(Completion("", text), tok, completion_only_loss=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels[0] == IGNORE and labels[1:] == ids[1:]
    assert tok.decode(loss_ids(ids, labels)) == text + "<|im_end|>"


def test_completion_without_completion_only_loss(tok):
    ids, labels = encode(Completion("Q:", " A"), tok, completion_only_loss=False)
    assert labels[0] == IGNORE and labels[1:] == ids[1:]


def test_slow_tokenizer_is_refused():
    class SlowTokenizer:
        is_fast = False
        name_or_path = "some/model"

    with pytest.raises(LoratoolError) as err:
        encode(Completion("", "x"), SlowTokenizer(), completion_only_loss=True)
    assert "slow (Python) tokenizer" in err.value.message and "some/model" in err.value.message


# --- built-in templates -----------------------------------------------------------------------------------

SIMPLE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]
B, E = "<|begin_of_text|>", "<|im_end|>"  # the tiny tokenizer's bos_token and eos_token
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
        "A1<|im_end|>\nA2<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "llama2": (
        f"{B}[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 {E}{B}[INST] U2 [/INST] A2 {E}",
        f" A1 {E} A2 {E}",
        "[/INST]",
    ),
    "llama3": (
        f"{B}<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "U1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
        "A1<|eot_id|>A2<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (f"{B}[INST] S\n\nU1 [/INST] A1{E}[INST] U2 [/INST] A2{E}", f" A1{E} A2{E}", "[/INST]"),
    "zephyr": (
        f"{B}<|system|>\nS{E}\n<|user|>\nU1{E}\n<|assistant|>\nA1{E}\n<|user|>\nU2{E}\n<|assistant|>\nA2{E}\n",
        f"A1{E}\nA2{E}\n",
        "<|assistant|>\n",
    ),
    "gemma": (
        f"{B}<start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
        "A1<end_of_turn>\nA2<end_of_turn>\n",
        "<start_of_turn>model\n",
    ),
    "alpaca": (
        f"{B}S\n\n### Instruction:\nU1\n\n### Response:\nA1{E}\n\n### Instruction:\nU2\n\n### Response:\nA2{E}\n\n",
        f"A1{E}\n\nA2{E}\n\n",
        "### Response:\n",
    ),
}


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_template_renders_masks_and_stops(tok, name):
    full, learned, generation_prompt = EXPECTED[name]
    apply_chat_template_choice(tok, name)
    assert tok.chat_template == builtin_template(name)
    assert tok.apply_chat_template(SIMPLE, tokenize=False) == full
    assert tok.apply_chat_template(SIMPLE[:4], tokenize=False, add_generation_prompt=True).endswith(
        generation_prompt
    )

    ids, labels = encode(Conversation(SIMPLE), tok, completion_only_loss=True)
    assert ids == template_ids(tok, SIMPLE)
    assert tok.decode(loss_ids(ids, labels)) == learned
    # BOS from the template, or put first when the template has none (chatml): never doubled
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_template_with_tools_and_tool_turns(tok, name):
    apply_chat_template_choice(tok, name)
    conversation = Conversation(TOOL_CONVERSATION, tools=TOOLS)
    ids, labels = encode(conversation, tok, completion_only_loss=True)  # raises if not prefix-stable
    assert ids == template_ids(tok, TOOL_CONVERSATION, tools=TOOLS)
    assert "search_recipes" in tok.apply_chat_template(TOOL_CONVERSATION[:1], tools=TOOLS, tokenize=False)
    learned = tok.decode(loss_ids(ids, labels))
    assert "Try the stir fry." in learned and '"arguments"' in learned
    assert 'stir fry"]' not in learned  # the tool's result is read, not learned


def test_template_that_rewrites_earlier_turns_is_reported(tok):
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(LoratoolError) as err:
        encode(Conversation(SIMPLE), tok, completion_only_loss=True)
    assert "not prefix-stable" in err.value.message
    assert "chatml" in err.value.hint


def test_template_that_rejects_a_conversation_is_a_row_error(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(RowError) as err:
        encode(Conversation(SIMPLE), tok, completion_only_loss=True)
    assert "the chat template rejected this conversation: no system role" in err.value.reason


def test_missing_template_names_the_builtins():
    tok = chatml_tokenizer(chat_template=False)
    tok.name_or_path = "org/base-model"
    with pytest.raises(LoratoolError) as err:
        apply_chat_template_choice(tok, None)
    assert err.value.message.startswith("the tokenizer of org/base-model has no chat template")
    assert all(name in err.value.hint for name in BUILTIN_TEMPLATES) and ".jinja" in err.value.hint


def test_unknown_template_name(tok):
    with pytest.raises(LoratoolError) as err:
        apply_chat_template_choice(tok, "llama-3")
    assert "unknown template 'llama-3' — did you mean llama3?" in err.value.message
    assert "chatml" in err.value.hint


def test_template_file(tok, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}")
    apply_chat_template_choice(tok, str(path))
    assert tok.chat_template == path.read_text()
    ids, labels = encode(Conversation(SIMPLE[1:3]), tok, completion_only_loss=True)
    assert tok.decode(ids) == "<|begin_of_text|>[user] U1<|im_end|>[assistant] A1<|im_end|>"
    # No generation prompt in this template: the "[assistant] " header lies in the learned span.
    assert tok.decode(loss_ids(ids, labels)) == "[assistant] A1<|im_end|>"

    with pytest.raises(LoratoolError) as err:
        apply_chat_template_choice(tok, str(tmp_path / "missing.j2"))
    assert "template file not found" in err.value.message


def test_broken_template_file_fails_once_with_its_line(tok, tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(LoratoolError) as err:
        apply_chat_template_choice(tok, str(path))
    assert str(path) in err.value.message and "line" in err.value.message
