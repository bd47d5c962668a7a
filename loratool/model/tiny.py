"""Build tiny, randomly initialised causal LMs with a real trained tokenizer, entirely offline.

Why this exists: tests, CI smoke runs and benchmarks need a model directory that behaves exactly like a
hub checkpoint (``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` work, the
tokenizer has real BPE merges, special tokens, a BOS-prepending post-processor and a ChatML chat template)
but must never touch the network and must be small enough to train on a CPU in seconds. The weights are
random, so the model's outputs are meaningless; what is exercised is every code path around them.

Everything is deterministic: the same arguments give byte-identical weights and the same vocabulary, so a
benchmark or a regression test can be re-run and compared.

`build_real_structure_model` builds the same kind of directory with the structure of one real checkpoint
per architecture (REAL_CONFIGS: its vocabulary size, tied or untied head, norms, MLP activation, sliding
window and layer pattern), at tiny width and depth for tests or at the real widths for benchmarks
(`real_shape=True`): what a memory saver or a benchmark measured on one architecture can be checked on the
others without downloading any of them.

torch and transformers are imported inside the functions so that importing this module (for instance from
the CLI) stays cheap.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedConfig, PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "mistral", "qwen2")
# Also buildable, for the GGUF export tests of other families. Not in ARCHITECTURES, whose models all share
# one shape (untied head, head_dim = hidden / heads): Gemma ties its head and uses head_dim 256 here (the
# attention scale llama.cpp and transformers' GGUF reader both assume), qwen3 head_dim 128 (the one
# transformers' GGUF reader assumes), and gemma3_text has a sliding window
# of 16 tokens so that short tests cross it.
EXPORT_ARCHITECTURES = ("qwen3", "gemma2", "gemma3_text", "phi3")
# Gemma's special tokens (GEMMA_TOKENS) instead of the ChatML ones, and a tokenizer that adds <bos>.
GEMMA_ARCHITECTURES = ("gemma3_text",)

# One real checkpoint per architecture loratool ships recipes or a GGUF export for, and the fields of its
# config.json that give it its structure. The widths (hidden, MLP, heads, head_dim) and the depth are what
# build_real_structure_model shrinks unless real_shape=True; everything else is kept as published: the
# vocabulary (the LM head's cost, whatever the tokenizer holds), the tied or untied head, the norms' eps,
# the MLP activation, the sliding window and the rope bases. The model classes add the rest of the
# structure themselves (Qwen2's q/k/v biases, Qwen3's q/k norms, Phi-3's fused qkv and gate_up projections,
# Gemma 3's four norms per layer, scaled embeddings and 5:1 sliding/full layer pattern).
REAL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",  # the demo's base (recipes/smollm2-demo.yaml)
        {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
        },
    ),
    "mistral": (
        "mistralai/Mistral-7B-v0.1",  # recipes/mistral-7b-qlora.yaml
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "max_position_embeddings": 32768,
        },
    ),
    "qwen2": (
        "Qwen/Qwen2.5-0.5B-Instruct",  # the smallest Qwen2.5 (the 7B of recipes/qwen2.5-7b-qlora.yaml unties its head)
        {
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_position_embeddings": 32768,
        },
    ),
    "qwen3": (
        "Qwen/Qwen3-0.6B",
        {
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_position_embeddings": 40960,
        },
    ),
    "phi3": (
        "microsoft/Phi-3-mini-4k-instruct",
        {
            "vocab_size": 32064,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": 2047,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
        },
    ),
    "gemma3_text": (
        "google/gemma-3-270m",
        {
            "vocab_size": 262144,
            "hidden_size": 640,
            "intermediate_size": 2048,
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "tie_word_embeddings": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "sliding_window": 512,
            "max_position_embeddings": 32768,
        },
    ),
}
REAL_STRUCTURE_ARCHITECTURES = tuple(REAL_CONFIGS)
# Gemma 3 makes every 6th decoder layer full attention, the others sliding-window.
GEMMA3_FULL_ATTENTION_EVERY = 6
# The tiny width of build_real_structure_model: the width of build_tiny_model's defaults.
TINY_WIDTH = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}

# Special tokens. The ids are fixed by their order here (0..4) because the BPE trainer puts its special
# tokens first: pad=0, bos=1, eos=2, im_start=3, endoftext=4, whatever vocab_size is asked for.
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|im_end|>"  # ChatML end of turn doubles as end of sequence, as in Qwen-style chat models
IM_START_TOKEN = "<|im_start|>"
# Not used by the template. It is in the vocabulary because transformers 5 reloads a qwen2 checkpoint with
# Qwen2Tokenizer whatever tokenizer_config.json says, and that class makes "<|endoftext|>" its unk token: if
# the token were missing it would be appended, giving len(tokenizer) == config.vocab_size + 1.
ENDOFTEXT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, ENDOFTEXT_TOKEN)

# Gemma's special tokens, for the gemma3_text model: BOS <bos> prepended like Gemma's tokenizer, EOS <eos>,
# and the turn markers of Gemma's chat format. No <|im_start|>/<|im_end|>: ChatML on this vocabulary spells
# them in several ordinary tokens, as on the real Gemma.
GEMMA_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "extra": ("<start_of_turn>", "<end_of_turn>")}
_DEFAULT_TOKENS = {
    "pad": PAD_TOKEN,
    "bos": BOS_TOKEN,
    "eos": EOS_TOKEN,
    "extra": (IM_START_TOKEN, ENDOFTEXT_TOKEN),
}

# The Qwen2 pre-tokenization regex (GPT-4 style, single digits). Same reason as above: Qwen2Tokenizer
# rebuilds its pipeline with this split on reload, so training with it keeps all three architectures
# tokenizing identically before and after save/load.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The standard ChatML template (the same text Qwen2 / many fine-tuning recipes use).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The smallest vocabulary that still holds the 256 byte-level symbols plus the special tokens.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# Hand-written seed corpus: varied prose, instruction/answer pairs, numbers, punctuation, unicode and code,
# so that the learned merges look like those of a real tokenizer (common words, " the", "ing", "    ",
# "def", "()", digits...). It is a few KB; _corpus() adds programmatic variations so that vocabularies of
# several thousand tokens can be reached.
SEED_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was a bright cold day in April, and the clocks were striking thirteen.
In the beginning, the project was small: a single script, a handful of tests and a README.
Machine learning models learn patterns from data; they do not understand the world the way people do.
Fine-tuning adapts a pretrained language model to a new task with a small amount of labelled data.
Low-rank adaptation (LoRA) freezes the base weights and trains two small matrices per layer instead.
Quantization stores weights in 4 or 8 bits, which cuts memory use by a factor of 4 to 8.
The learning rate was 2e-4, the batch size was 16, and training ran for 3 epochs on 1,250 examples.
Please summarize the following paragraph in one sentence.
Translate "good morning" into French, Spanish and German.
Write a short poem about the sea, the wind and the stars.
Explain why the sky is blue to a ten-year-old child.
What is the capital of France? The capital of France is Paris.
What is 12 times 7? 12 times 7 is 84.
How many days are there in a leap year? There are 366 days in a leap year.
Give three tips for staying healthy. 1. Eat a balanced diet. 2. Exercise regularly. 3. Sleep well.
User: Can you help me write an email to my manager? Assistant: Of course! Here is a draft you can adapt.
Question: Who wrote "Pride and Prejudice"? Answer: Jane Austen wrote it in 1813.
Instruction: Classify the sentiment of this review as positive or negative. Review: I loved it! Answer: positive.
Instruction: Convert 100 degrees Fahrenheit to Celsius. Answer: 100 °F is about 37.8 °C.
Step 1: read the data. Step 2: clean it. Step 3: train the model. Step 4: evaluate the results.
Dr. Smith arrived at 9:30 a.m. on Monday, 14 March 2022, and left at 5:45 p.m.
The price rose from $19.99 to $24.50 (an increase of 22.6%) in less than a year.
Contact us at support@example.com or call +1 (555) 010-2030 between 8am and 6pm.
Version 2.13.0 was released on 2025-01-15; version 2.12.1 fixed a memory leak.
Wait... what? No! Yes; maybe: perhaps, perhaps not -- who knows? [citation needed] {braces} <angles>
She said, "I'll be there at noon," but he wasn't sure she'd make it.
Naïve café owners in Zürich serve crème brûlée; the façade of the Ångström building is blue.
Español: ¿Dónde está la biblioteca? Français : où est la gare ? Deutsch: Wo ist der Bahnhof?
日本語のテキストも少し含めます。中文也有一点。한국어도 조금. Ελληνικά και русский текст.
Emoji and symbols: ✓ ✗ → ← ≤ ≥ ± × ÷ ∞ π ∑ √ € £ ¥ © ® ™ 🙂 🚀 🎉
Tabs\tand\tspaces   are   whitespace; so are newlines.

Paragraphs are separated by blank lines.

def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Trainer:
    def __init__(self, model, optimizer, lr=1e-3):
        self.model = model
        self.optimizer = optimizer
        self.lr = lr

    def step(self, batch):
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


if __name__ == "__main__":
    print(f"fib(10) = {fibonacci(10)}")
    data = {"name": "tiny", "layers": [1, 2, 3], "ok": True, "value": None}
    import json
    print(json.dumps(data, indent=2))

for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
$ pip install --upgrade transformers && python -m pytest -q tests/
{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help you today?"}
"""

# Words used to generate extra sentences and word forms. Real English stems with suffixes and prefixes give
# thousands of distinct word types, which is what a BPE trainer needs to keep finding merges.
_STEMS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education model data train learn test run build read write speak open close start stop play move live "
    "believe bring happen provide sit stand lose pay meet include continue set change lead understand watch "
    "follow create spend grow offer remember love consider appear buy wait serve die send expect stay fall "
    "cut reach kill remain suggest raise pass sell require report decide pull return explain hope develop "
    "carry break receive agree support hit produce eat cover catch draw choose cause point listen realize "
    "place act mark view compute token layer weight matrix vector tensor batch epoch loss gradient optimize "
    "adapt quantize evaluate generate predict sample score measure load save parse format render template "
    "config option value default error warning message request response server client network memory "
    "device kernel thread process file folder path stream buffer cache index query table record field "
    "green blue red yellow black white bright dark light heavy small large quick slow happy sad strong "
    "clear simple complex public private local global final early late young old new good great high "
    "careful kind hard soft warm cold deep wide long short rich poor free busy quiet loud clean fresh"
).split()
_SUFFIXES = ("", "s", "ed", "ing", "er", "ly", "ness", "able")
_PREFIXES = ("", "un", "re", "pre")
_FUNCTION_WORDS = (
    "the a an of to in for on with at by from about as into like through after over between out against "
    "during without before under around among and but or so because if when while although that which who "
    "this these those it they we you he she I is are was were be been has have had do does did will would "
    "can could should may might must not no very also just only even still then there here now"
).split()


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """The training corpus: the seed text plus deterministic programmatic variations.

    Variations matter because a few KB of text only yields a few hundred BPE merges; benchmarks want
    vocabularies of several thousand tokens. A private, fixed-seed RNG keeps the corpus (and therefore the
    vocabulary) identical across runs and machines.
    """
    rng = random.Random(20240611)
    # The seed text is repeated so that its frequent pieces (" the", "ing", "    ") are merged first and a
    # small vocabulary looks like a real one; the generated lines mostly supply the long tail.
    lines = SEED_CORPUS.splitlines() * 8
    # Word forms: prefix + stem + suffix, written the way they appear in running text (leading space).
    forms = [p + s + x for s in _STEMS for p in _PREFIXES for x in _SUFFIXES]
    rng.shuffle(forms)
    for i in range(0, len(forms), 12):
        chunk = forms[i : i + 12]
        words = [
            w for pair in zip(chunk, rng.choices(_FUNCTION_WORDS, k=len(chunk)), strict=True) for w in pair
        ]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice((".", "!", "?", ";", ",", ":")))
    # Numbers, dates and prices. The split puts every digit in its own pre-token, so these lines teach
    # the pieces around numbers (" $", ".", "%", "-"), not multi-digit tokens.
    for n in range(0, 2000, 7):
        lines.append(
            f"Item {n} costs ${n * 1.25:.2f}, {n % 100}% off until {1950 + n % 75}-{1 + n % 12:02d}."
        )
    # Code: snake_case / CamelCase identifiers and common syntax, indented with 4 and 8 spaces.
    for i in range(0, len(_STEMS) - 2, 3):
        a, b, c = _STEMS[i : i + 3]
        lines.append(f"def {a}_{b}({c}, {a}_{c}=None):")
        lines.append(f"    {b} = {a.capitalize()}{c.capitalize()}({c}).{b}_{a}()")
        lines.append(f"        return [{a} for {a} in {b} if {a} is not None]  # {c}")
    return tuple(lines)


@lru_cache(maxsize=8)
def _train_backend(
    vocab_size: int, specials: tuple[str, ...] = SPECIAL_TOKENS, bos: str = BOS_TOKEN
) -> Tokenizer:
    """Train the byte-level BPE once per vocab_size and special tokens (cached: tests build many models
    with the same one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenizer + decoder: every byte sequence is representable, so any text round-trips.
    # The regex split comes first (ByteLevel's own GPT-2 regex is then off), as in Qwen2 / Llama-3.
    # add_prefix_space=False so that "hi" and " hi" stay different. No normalizer: keep text as given.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones not in the corpus
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Prepend BOS on tokenizer(text) like Llama tokenizers; add_special_tokens=False skips the template.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def build_tokenizer(vocab_size: int = 512, *, gemma: bool = False) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on the embedded corpus and wrap it for transformers.
    ``gemma=True`` gives it Gemma's special tokens (GEMMA_TOKENS) instead of the Llama/ChatML ones.

    ``vocab_size`` counts the special tokens. It is an upper bound: if the corpus runs out of merges the
    tokenizer is smaller (the embedded corpus tops out near 12,800 tokens). Use ``len(tokenizer)`` for the real size.
    No chat template is set here; build_tiny_model adds it.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _MIN_VOCAB:
        raise LoratoolError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer",
            hint=f"use at least {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)",
        )
    tokens = GEMMA_TOKENS if gemma else _DEFAULT_TOKENS
    specials = (tokens["pad"], tokens["bos"], tokens["eos"], *tokens["extra"])
    return PreTrainedTokenizerFast(
        # deep-copied by transformers: the cache stays clean
        tokenizer_object=_train_backend(vocab_size, specials, tokens["bos"]),
        bos_token=tokens["bos"],
        eos_token=tokens["eos"],
        pad_token=tokens["pad"],
        # transformers 5 renamed additional_special_tokens to extra_special_tokens (the old name still
        # works but is converted); use the new one.
        extra_special_tokens=list(tokens["extra"]),
        # No add_bos_token=True here on purpose: the BOS comes from the post-processor in tokenizer.json.
        # transformers 5 never saves add_bos_token (and drops it on load when tokenizer.json exists), so
        # passing it would make this in-memory tokenizer report add_bos_token=True and the reloaded one
        # False. Like real Llama-3 checkpoints, both report False while still prepending BOS: detect BOS by
        # encoding, not by that attribute.
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x for text like "a ." or "don 't"
        model_max_length=2048,
        padding_side="right",
    )


def _config_class(arch: str) -> type[PreTrainedConfig]:
    import transformers

    classes = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "phi3": "Phi3Config",
        "gemma2": "Gemma2Config",
        "gemma3_text": "Gemma3TextConfig",
    }
    if arch not in classes:
        raise LoratoolError(
            f"unknown architecture {arch!r}",
            hint=f"choose one of {', '.join(ARCHITECTURES + EXPORT_ARCHITECTURES)}",
        )
    return getattr(transformers, classes[arch])


def _make_config(arch: str, **kwargs: object) -> PreTrainedConfig:
    """The per-architecture config. Sliding-window attention is turned off so the Llama-shaped ones behave alike."""
    config_class = _config_class(arch)
    if arch == "llama":
        return config_class(**kwargs)
    if arch in ("mistral", "phi3"):
        return config_class(sliding_window=None, **kwargs)
    if arch == "qwen2":
        return config_class(use_sliding_window=False, sliding_window=None, **kwargs)
    if arch == "qwen3":
        # head_dim 128 as in every released Qwen3 (transformers' GGUF reader assumes it, too)
        return config_class(use_sliding_window=False, sliding_window=None, head_dim=128, **kwargs)
    gemma = {**kwargs, "tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256}
    if arch == "gemma2":
        return config_class(**gemma)
    return config_class(sliding_window=16, **gemma)  # gemma3_text


def build_tiny_model(
    output_dir: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Write a randomly initialised ``arch`` model plus its tokenizer to ``output_dir`` and return the path.

    The defaults give ~140K parameters, so a CPU forward/backward pass takes milliseconds. The model's
    vocab_size follows the trained tokenizer (``len(tokenizer)``, which may be below the requested
    ``vocab_size``), so every token id has an embedding row. Weights are float32 and depend only on the
    arguments (``seed`` included): two calls with the same arguments write identical safetensors.
    ``chat_template=False`` writes a "base model" tokenizer without a template.
    """
    if arch not in ARCHITECTURES + EXPORT_ARCHITECTURES:
        raise LoratoolError(
            f"unknown architecture {arch!r}",
            hint=f"choose one of {', '.join(ARCHITECTURES + EXPORT_ARCHITECTURES)}",
        )
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise LoratoolError(
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads} do not divide",
            hint="hidden_size must be a multiple of num_heads, and num_heads a multiple of num_kv_heads",
        )
    tokenizer = _tokenizer(arch, vocab_size, chat_template, max_position_embeddings)
    config = _make_config(
        arch,
        vocab_size=len(tokenizer),  # tokens, specials included
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,  # tokens
        tie_word_embeddings=False,
        dtype="float32",
        # Wider than the usual 0.02: the output head and final norm stay frozen under LoRA, and with
        # 0.02 on a 64-wide model no logit can exceed ~1.3, so no answer can ever become likely and the
        # loss plateaus near uniform. 0.1 lets a tiny model learn a task in a few dozen steps.
        initializer_range=0.1,
        **_token_ids(tokenizer),
    )
    return _write_model(Path(output_dir), config, tokenizer, seed)


def real_structure_config(
    arch: str, *, real_shape: bool = False, num_layers: int | None = None
) -> dict[str, Any]:
    """The config fields of REAL_CONFIGS[arch]'s checkpoint, shrunk to TINY_WIDTH and 2 decoder layers unless
    ``real_shape``; ``num_layers`` sets the depth either way. Tiny keeps the number of query heads per KV
    head (at least one KV head) and a head_dim of hidden / heads."""
    if arch not in REAL_CONFIGS:
        raise LoratoolError(
            f"no real structure recorded for {arch!r}",
            hint=f"choose one of {', '.join(REAL_STRUCTURE_ARCHITECTURES)}",
        )
    fields = dict(REAL_CONFIGS[arch][1])
    if not real_shape:
        heads = TINY_WIDTH["num_attention_heads"]
        per_kv_head = int(fields["num_attention_heads"]) // int(fields["num_key_value_heads"])
        fields.update(TINY_WIDTH, num_key_value_heads=max(1, heads // per_kv_head), num_hidden_layers=2)
        if "head_dim" in fields:
            fields["head_dim"] = TINY_WIDTH["hidden_size"] // heads
        if "query_pre_attn_scalar" in fields:  # Gemma scales the scores by head_dim ** -0.5 with this
            fields["query_pre_attn_scalar"] = fields["head_dim"]
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    if arch == "gemma3_text":
        # The real pattern, except that a model shallower than one period still gets its full-attention layer
        # (last), so that both kinds of layer run.
        depth = int(fields["num_hidden_layers"])
        fields["layer_types"] = [
            "full_attention"
            if (i + 1) % GEMMA3_FULL_ATTENTION_EVERY == 0 or i == depth - 1
            else "sliding_attention"
            for i in range(depth)
        ]
    return fields


def build_real_structure_model(
    output_dir: str | Path,
    arch: str,
    *,
    real_shape: bool = False,
    num_layers: int | None = None,
    vocab_size: int = 2000,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Write a random ``arch`` model with the structure of REAL_CONFIGS[arch]'s checkpoint
    (real_structure_config) and a trained tokenizer of ``vocab_size`` tokens; return the path.

    The model keeps the real vocabulary: its config's vocab_size is the checkpoint's (262,144 for
    Gemma 3) although the tokenizer uses only its first ``len(tokenizer)`` ids, as real checkpoints whose
    embedding is padded beyond their tokenizer do, so the LM head costs what the real one costs. Tiny
    width (the default) is for tests (Gemma 3: ~17M parameters, nearly all in the embedding);
    ``real_shape=True`` is for benchmarks (the real widths; ``num_layers`` to keep it short).
    Deterministic like build_tiny_model."""
    fields = real_structure_config(arch, real_shape=real_shape, num_layers=num_layers)
    tokenizer = _tokenizer(arch, vocab_size, chat_template, int(fields["max_position_embeddings"]))
    config = _config_class(arch)(
        **fields,
        dtype="float32",
        # build_tiny_model's reason for 0.1 holds at tiny width; at the real widths, the real init.
        initializer_range=0.02 if real_shape else 0.1,
        **_token_ids(tokenizer),
    )
    return _write_model(Path(output_dir), config, tokenizer, seed)


def _tokenizer(arch: str, vocab_size: int, chat_template: bool, max_length: int) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(vocab_size, gemma=arch in GEMMA_ARCHITECTURES)
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = max_length  # tokens
    return tokenizer


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # <|im_end|>: generation stops at the end of a turn
        "pad_token_id": tokenizer.pad_token_id,
    }


def _write_model(
    output_dir: Path, config: PreTrainedConfig, tokenizer: PreTrainedTokenizerFast, seed: int
) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**_token_ids(tokenizer))
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters stored in a model directory's safetensors files, without loading torch."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total
