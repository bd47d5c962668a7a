"""Padding-free batches and packed rows give every token the loss it gets when its example runs
alone."""

from __future__ import annotations

import json

import pytest
import torch
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from loratool.data import build_datasets
from loratool.recipe import DataSection


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tiny_llama):
    """Six chat examples of different lengths, tokenized and masked by the data pipeline."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("pack") / "train.jsonl"
    rows = [
        {"instruction": "Say hi." + " please" * n, "input": "", "output": "Hi there!" + " Again." * (n % 3)}
        for n in (0, 5, 1, 12, 3, 8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = DataSection(train=[{"path": str(path), "format": "alpaca"}], max_length=128)
    return build_datasets(data, tokenizer, seed=0).train


ATTENTION = ["sdpa", "eager", "sdpa_per_example", "eager_per_example"]


def load(tiny_llama, attn):
    """`sdpa_per_example` / `eager_per_example`: loaded as sdpa / eager, then switched as load_model does."""
    from transformers import AutoModelForCausalLM

    from loratool.model.attention import use_per_example_attention

    stock = attn.removesuffix("_per_example")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=stock)
    if attn != stock:
        assert use_per_example_attention(model) == attn
    return model.eval()


def token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every loss-carrying token (labels != -100), in order."""
    # What the trainer passes: TRL's padding-free collator adds the example boundaries (cu_seq_lens_*).
    keys = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q")
    inputs = {k: batch[k] for k in keys if k in batch}
    with torch.no_grad():
        # As in training (load_model turns the cache off): with a KV cache, transformers does not look
        # for packed sequences in the position ids.
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    shift_logits, shift_labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = shift_labels != -100
    return torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")


def one_by_one(model, dataset) -> torch.Tensor:
    collate = DataCollatorForLanguageModeling(pad_token_id=0)
    return torch.cat([token_losses(model, collate([row])) for row in dataset])


@pytest.mark.parametrize("attn", ATTENTION)
def test_padding_free_batch_equals_examples_one_by_one(tiny_llama, examples, attn):
    model = load(tiny_llama, attn)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(examples))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    torch.testing.assert_close(token_losses(model, batch), one_by_one(model, examples), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_rows_equal_examples_one_by_one(tiny_llama, examples, attn):
    model = load(tiny_llama, attn)
    packed = pack_dataset(examples.select_columns(["input_ids", "labels"]), seq_length=96, strategy="bfd")
    assert len(packed) < len(examples)  # several examples really share a row
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed_losses = torch.cat([token_losses(model, collate([row])) for row in packed])
    alone = one_by_one(model, examples)
    # Packing reorders examples: compare the multiset of per-token losses and their sum.
    torch.testing.assert_close(packed_losses.sort().values, alone.sort().values, atol=1e-5, rtol=1e-5)
    assert packed_losses.numel() == alone.numel()


def test_padded_and_padding_free_batches_give_the_same_mean_loss(tiny_llama, examples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = list(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert padded["input_ids"].numel() > free["input_ids"].numel()  # the padding that is saved
    with torch.no_grad():
        loss_padded = model(
            **{k: padded[k] for k in ("input_ids", "attention_mask", "labels")}, use_cache=False
        ).loss
        loss_free = model(
            **{k: free[k] for k in ("input_ids", "position_ids", "labels")}, use_cache=False
        ).loss
    torch.testing.assert_close(loss_free, loss_padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_per_example"])
def test_without_position_resets_examples_would_leak(tiny_llama, examples, attn):
    """The control that shows the tests above can fail: one row without the position-id resets lets later
    examples attend to earlier ones, and their losses change."""
    model = load(tiny_llama, attn)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(examples))
    leaky = {k: v for k, v in batch.items() if not k.startswith("cu_seq_lens")}
    leaky["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    assert (token_losses(model, leaky) - one_by_one(model, examples)).abs().max() > 1e-3
