"""Per-example attention in flattened batches (loratool/model/attention.py): the same numbers as the stock
implementation with the dense block-diagonal mask, no attention across examples, and the stock path for
everything that is not a flattened training row (padded batches, generation with a KV cache)."""

from __future__ import annotations

import pytest
import torch

from loratool.model.attention import PER_EXAMPLE, register, use_per_example_attention
from loratool.train.sft import packed_rows_per_batch

LENGTHS = [5, 11, 1, 7, 16]


def load(model_dir, attn):
    """A tiny Llama with `attn`; the per-example names load the stock one and switch, as load_model does."""
    from transformers import AutoModelForCausalLM

    stock = attn.removesuffix("_per_example")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=stock, dtype=torch.float32)
    if attn != stock:
        assert use_per_example_attention(model) == attn
    return model.eval()


def flattened(lengths, vocab=500, seed=0):
    """One padding-free row as TRL's collator builds it: position ids restart, cu_seq_lens mark the ends."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "position_ids": position_ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}


def block_diagonal(lengths) -> torch.Tensor:
    """The dense mask transformers builds for a packed row: causal within each example, nothing across."""
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(sum(lengths), sum(lengths), dtype=torch.bool).tril()
    return (causal & (example[:, None] == example[None, :]))[None, None]


@pytest.mark.parametrize("stock_name", ["sdpa", "eager"])
@pytest.mark.parametrize("with_cu_seq_lens", [True, False])
def test_per_example_attention_equals_stock_with_the_block_diagonal_mask(
    tiny_llama, stock_name, with_cu_seq_lens
):
    from transformers import AttentionInterface

    register()
    model = load(tiny_llama, stock_name)
    module = model.model.layers[0].self_attn
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, module.head_dim
    generator = torch.Generator().manual_seed(0)
    length = sum(LENGTHS)
    query = torch.randn(1, heads, length, dim, generator=generator)
    key = torch.randn(1, kv_heads, length, dim, generator=generator)
    value = torch.randn(1, kv_heads, length, dim, generator=generator)
    batch = flattened(LENGTHS)
    kwargs = {"position_ids": batch["position_ids"], "scaling": module.scaling, "dropout": 0.0}
    if with_cu_seq_lens:
        kwargs |= {"cu_seq_lens_q": batch["cu_seq_lens_q"], "cu_seq_lens_k": batch["cu_seq_lens_k"]}

    mask = block_diagonal(LENGTHS)
    if stock_name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward as stock

        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    else:
        stock = AttentionInterface()["sdpa"]
    expected, _ = stock(module, query, key, value, mask, **kwargs)
    per_example = AttentionInterface()[PER_EXAMPLE[stock_name]]
    got, _ = per_example(module, query, key, value, None, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa_per_example", "eager_per_example"])
def test_no_attention_across_examples(tiny_llama, attn):
    """Changing every token of the third example changes its logits and no other example's."""
    model = load(tiny_llama, attn)
    batch = flattened(LENGTHS)
    changed = {k: v.clone() for k, v in batch.items()}
    start, end = sum(LENGTHS[:3]), sum(LENGTHS[:4])
    changed["input_ids"][0, start:end] = (changed["input_ids"][0, start:end] + 7) % 500
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits
        after = model(**changed, use_cache=False).logits
    others = torch.ones(sum(LENGTHS), dtype=torch.bool)
    others[start:end] = False
    torch.testing.assert_close(after[0, others], before[0, others], atol=1e-6, rtol=1e-6)
    assert (after[0, start:end] - before[0, start:end]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa_per_example", "eager_per_example"])
def test_flattened_logits_equal_the_stock_implementation(tiny_llama, attn):
    stock = load(tiny_llama, attn.removesuffix("_per_example"))
    model = load(tiny_llama, attn)
    batch = flattened(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch, use_cache=False).logits,
            stock(**batch, use_cache=False).logits,
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("attn", ["sdpa_per_example", "eager_per_example"])
def test_padded_batches_and_generation_take_the_stock_path(tiny_llama, attn):
    """Evaluation and generation: left padding with an attention mask, a KV cache, one token at a time."""
    from transformers import AutoTokenizer

    stock = load(tiny_llama, attn.removesuffix("_per_example"))
    model = load(tiny_llama, attn)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, padding_side="left")
    inputs = tokenizer(["Say hi to the model please.", "Hi"], return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, atol=1e-5, rtol=1e-5)
    settings = {
        "max_new_tokens": 6,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": tokenizer.pad_token_id,
    }
    assert torch.equal(model.generate(**inputs, **settings), stock.generate(**inputs, **settings))
    single = tokenizer(["Say hi to the model please."], return_tensors="pt")
    assert torch.equal(model.generate(**single, **settings), stock.generate(**single, **settings))


def test_load_model_uses_per_example_attention_only_for_flattened_batches(tiny_llama, tmp_path):
    from loratool.model.hardware import detect
    from loratool.model.load import load_model
    from loratool.recipe import validate_recipe

    def attention(**data):
        recipe = validate_recipe(
            {
                "base_model": str(tiny_llama),
                "model": {"attn_implementation": data.pop("attn", None)},
                "data": {"train": [{"path": "x.jsonl"}], **data},
                "training": {"output_dir": str(tmp_path / "out")},
            }
        )
        return load_model(recipe, detect(), log=lambda _: None).config._attn_implementation

    assert attention() == "sdpa_per_example"
    assert attention(packing=True) == "sdpa_per_example"
    assert attention(attn="eager") == "eager_per_example"
    assert attention(padding_free=False) == "sdpa"
    assert attention(padding_free=False, attn="eager") == "eager"


def test_packed_rows_per_batch_hold_at_least_a_batch_of_examples():
    from loratool.recipe import DataSection, TrainingSection
    from loratool.train.sft import packed_rows

    def rows(batch: int, lengths: list[int], max_length: int) -> int:
        data = DataSection(train=[{"path": "x.jsonl"}], max_length=max_length, packing=True)
        return packed_rows_per_batch(
            TrainingSection(output_dir="o", per_device_train_batch_size=batch), data, lengths
        )

    # Two examples of 200 fit a row of 512, three do not: 1,000 rows for 2,000 examples.
    assert packed_rows([200] * 2000, 512) == 1000
    assert rows(8, [200] * 2000, 512) == 4
    assert rows(7, [200] * 2000, 512) == 4  # 3.5 rows: rounded up, never fewer examples than a batch
    assert rows(1, [200] * 2000, 512) == 1
    # Examples longer than half a row each take a row of their own (the SmolLM2 demo: ~94 tokens in rows
    # of 128): as many rows as examples, not 8 * 94 / 128 = 5.9.
    assert packed_rows([94] * 480, 128) == 480
    assert rows(8, [94] * 480, 128) == 8
    # Short examples share rows: 5 of 100 per row of 512.
    assert rows(8, [100] * 50, 512) == 2


WINDOW = 8
LONG_LENGTHS = [5, 19, 8, 1, 23]  # two examples longer than the window, one exactly at it


def windowed_model(model_type: str, attn: str):
    """A random model whose layers attend within a sliding window of WINDOW tokens (Gemma 3: 5 of its 6
    layers, the 6th attends to the whole example; Mistral: every layer)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig

    shape = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, sliding_window=WINDOW)  # fmt: skip
    if model_type == "gemma3_text":
        config = Gemma3TextConfig(num_hidden_layers=6, head_dim=8, query_pre_attn_scalar=8, **shape)
    else:
        config = MistralConfig(num_hidden_layers=2, **shape)
    torch.manual_seed(0)
    stock = attn.removesuffix("_per_example")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=stock, dtype=torch.float32).eval()
    if attn != stock:
        assert use_per_example_attention(model) == attn
    return model


@pytest.mark.parametrize("model_type", ["gemma3_text", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa_per_example", "eager_per_example"])
def test_sliding_windows_apply_within_each_example_without_the_dense_mask(model_type, attn, monkeypatch):
    """Each example of a flattened row gets the logits it gets alone (the window cuts the long ones),
    and the per-example path builds no dense mask over the row for it."""
    from transformers.masking_utils import AttentionMaskInterface

    model = windowed_model(model_type, attn)
    batch = flattened(LONG_LENGTHS)
    built = []
    stock_mask = AttentionMaskInterface()[attn]

    def spy(*args, **kwargs):
        mask = stock_mask(*args, **kwargs)
        built.append(mask)
        return mask

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, attn, spy)
    with torch.no_grad():
        row = model(**batch, use_cache=False).logits[0]
        assert built and all(mask is None for mask in built)  # no (sum of lengths)^2 mask for any layer
        start = 0
        for n in LONG_LENGTHS:
            alone = model(input_ids=batch["input_ids"][:, start : start + n], use_cache=False).logits[0]
            torch.testing.assert_close(row[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    # and the window really cuts: the same long example without the window gives other logits
    model.config.sliding_window = 1000
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            layer.self_attn.sliding_window = None
    with torch.no_grad():
        wide = model(input_ids=batch["input_ids"][:, 5:24], use_cache=False).logits[0]
    assert not torch.allclose(wide[-1], row[23], atol=1e-4)
