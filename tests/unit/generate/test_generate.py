"""Generation without the CLI: greedy answers equal transformers' own generate, left-padded
batches equal prompts one by one, and seeded sampling repeats."""

from __future__ import annotations

from helpers.generate import PROMPT, reference_answer

# a fixture, imported for pytest to find in this module
from helpers.generate import adapters as adapters
from loratool.generate.run import Sampling, generate_ids, run_generate


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
