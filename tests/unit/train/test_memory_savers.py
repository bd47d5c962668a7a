"""What makes training lighter without changing what it learns, checked on single steps:
LoRA dropout that keeps masks instead of copies (lora_dropout.py), an LM head scored only where there
is loss (loss_positions.py), checkpointing every n-th decoder layer, cheap activations recomputed
instead of kept (cheap_recompute.py)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import REPO
from loratool.errors import LoratoolError
from loratool.recipe import validate_recipe
from loratool.train.memory.lora_dropout import _DropoutThenLinear, keep_mask, keep_masks_not_copies

# ------------------------------------------------------------------------------------------ dropout


def test_dropout_then_linear_is_linear_of_the_dropped_input_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16, requires_grad=True)
    weight = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(5)
    out = _DropoutThenLinear.apply(x, weight, 0.3)
    out.sin().sum().backward()

    torch.manual_seed(5)  # the same draw: the mask the function used
    kept = keep_mask(x, 0.3)
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = torch.nn.functional.linear(x2 * kept / 0.7, w2)
    reference.sin().sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-5, rtol=1e-5)
    assert 0 < (~kept).sum() < kept.numel()


def test_keep_mask_drops_at_rate_p_and_repeats_with_the_seed():
    x = torch.empty(1000, 1000)
    torch.manual_seed(0)
    for p in (0.05, 0.5):
        dropped = 1 - keep_mask(x, p).float().mean().item()
        assert dropped == pytest.approx(p, abs=0.003)  # 10^6 draws: the standard error is <= 0.0005
    torch.manual_seed(3)
    first, second = keep_mask(x, 0.1), keep_mask(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(x, 0.1), first) and not torch.equal(first, second)


def _peft_model(dropout: float, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    return get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=["0", "2"],
            init_lora_weights=False,
            **config,
        ),
    )


def _saved_bytes(model, x) -> int:
    """Bytes kept for the backward pass, counted by the benchmark script's own function."""
    spec = importlib.util.spec_from_file_location(
        "bench_memory_savers", REPO / "scripts" / "bench_memory_savers.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.saved_bytes(model, x)


def test_plain_lora_layers_keep_a_mask_not_a_copy_and_evaluate_as_before():
    peft_model = _peft_model(0.2)
    ours = copy.deepcopy(peft_model)
    assert keep_masks_not_copies(ours) == 2
    x = torch.randn(64, 10, 16)

    peft_model.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(x), ours(x))  # evaluation: no dropout either way, the same product

    peft_model.train(), ours.train()
    before, after = _saved_bytes(peft_model, x), _saved_bytes(ours, x)
    # The dropped copies (4 bytes a value; on CPU the float noise too) become 1-byte masks.
    assert after < 0.75 * before
    torch.manual_seed(1)
    loss = ours(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters() if p.requires_grad)


def test_a_deep_copy_trains_its_own_weights():
    ours = _peft_model(0.2)
    keep_masks_not_copies(ours)
    twin = copy.deepcopy(ours)
    twin.train()
    twin(torch.randn(4, 16)).sum().backward()
    layer, twin_layer = ours.base_model.model[0].lora_A["default"], twin.base_model.model[0].lora_A["default"]
    assert twin_layer.weight.grad is not None and layer.weight.grad is None


def test_variants_and_layers_without_dropout_keep_peft_dropout():
    assert keep_masks_not_copies(_peft_model(0.0)) == 0
    assert keep_masks_not_copies(_peft_model(0.2, use_dora=True)) == 0


# ---------------------------------------------------------------------------------------- LM head


def test_the_lm_head_scores_only_loss_positions_with_the_same_loss_and_gradients(tiny_llama, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    from loratool.train.memory.loss_positions import score_only_loss_positions

    # TRL's own predicate (a training run earlier in the session may have switched it), restored after.
    monkeypatch.setattr(utils, "_use_triton", chunked_logprob._use_triton)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    utils.add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    scored: list[int] = []
    kernel = utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Spy)
    torch.manual_seed(0)
    input_ids = torch.randint(0, 500, (2, 24))
    labels = input_ids.clone()
    labels[0, :15], labels[1, :9] = -100, -100  # prompts: no loss

    def step():
        model.zero_grad()
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads

    every, every_grads = step()
    assert scored[-1] == 2 * 23  # stock TRL on CPU: every position
    assert score_only_loss_positions()
    compact, compact_grads = step()
    loss_positions = int((labels[:, 1:] != -100).sum())
    assert scored[-1] == loss_positions == 9 + 15
    torch.testing.assert_close(compact.loss, every.loss, atol=1e-6, rtol=1e-6)
    for name, grad in every_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, atol=1e-6, rtol=1e-5)
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(compact.entropy[mask], every.entropy[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(compact.is_top1, every.is_top1)


# -------------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_takes_a_layer_interval():
    base = {"base_model": "m", "data": {"train": [{"path": "t.jsonl"}]}}
    for value, expected in ((None, 2), (True, True), (False, False), (3, 3)):
        training = {"output_dir": "o"} | ({} if value is None else {"gradient_checkpointing": value})
        assert validate_recipe({**base, "training": training}).training.gradient_checkpointing == expected
    with pytest.raises(LoratoolError, match="training.gradient_checkpointing"):
        validate_recipe({**base, "training": {"output_dir": "o", "gradient_checkpointing": -2}})


def test_trainer_checkpoints_every_nth_layer(tmp_path):
    from loratool.recipe import TrainingSection
    from loratool.train.arguments import trainer_fields

    def fields(value):
        section = TrainingSection(output_dir="o", gradient_checkpointing=value)
        return trainer_fields(section, checkpoints_dir=tmp_path, has_validation=False, bf16=False, fp16=False)

    assert fields(2)["activation_checkpointing"] is True
    assert fields(2)["activation_checkpointing_kwargs"]["every_n_layers"] == 2
    assert "every_n_layers" not in (fields(True).get("activation_checkpointing_kwargs") or {})
    assert fields(False)["activation_checkpointing"] is False


def test_a_transformers_without_every_n_layers_is_a_clear_error(monkeypatch, tmp_path):
    from transformers import PreTrainedModel

    from loratool.recipe import TrainingSection
    from loratool.train.arguments import trainer_fields

    def old_enable(self, activation_checkpointing_kwargs=None):  # the signature before every_n_layers
        pass

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", old_enable)
    section = TrainingSection(output_dir="o", gradient_checkpointing=2)
    with pytest.raises(
        LoratoolError, match="gradient_checkpointing: 2 checkpoints one decoder layer in 2"
    ) as info:
        trainer_fields(section, checkpoints_dir=tmp_path, has_validation=False, bf16=False, fp16=False)
    assert "upgrade transformers" in info.value.hint
    full = TrainingSection(output_dir="o", gradient_checkpointing=True)  # every layer needs nothing new
    assert trainer_fields(full, checkpoints_dir=tmp_path, has_validation=False, bf16=False, fp16=False)[
        "activation_checkpointing"
    ]


# ------------------------------------------------------------------------------ cheap recompute


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_memory_savers", REPO / "scripts" / "bench_memory_savers.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _flat_llama(path, dropout: float):
    """A LoRA (all linear layers) model on per-example attention, and one flattened row of three examples."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratool.model import attention

    attention.register()
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_per_example"),
        LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False),
    )
    keep_masks_not_copies(model)
    model.train()
    lengths = [30, 17, 45]
    bounds = torch.tensor([0, 30, 47, 92], dtype=torch.int32)
    ids = torch.randint(0, 500, (1, sum(lengths)))
    batch = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": 45,
        "max_length_k": 45,
        "use_cache": False,
    }
    return model, batch


def _loss_and_grads(model, batch):
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks for every model
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cheap_recompute_keeps_less_and_learns_exactly_the_same(tiny_model_factory, dropout):
    from loratool.train.memory.cheap_recompute import recompute_cheap_activations

    path = tiny_model_factory(num_layers=3, hidden_size=64, intermediate_size=176)
    stock, batch = _flat_llama(path, dropout)
    ours = copy.deepcopy(stock)
    assert recompute_cheap_activations(ours) == 3
    assert recompute_cheap_activations(ours) == 3  # idempotent: nothing wrapped twice

    bench = _bench()
    stock_bytes, our_bytes = bench.graph_bytes(stock, **batch), bench.graph_bytes(ours, **batch)
    # Per layer, the two norm outputs, act(gate) and act(gate) * up are rebuilt, not kept.
    assert our_bytes < 0.8 * stock_bytes
    loss, grads = _loss_and_grads(stock, batch)
    our_loss, our_grads = _loss_and_grads(ours, batch)
    assert torch.equal(our_loss, loss)
    assert grads.keys() == our_grads.keys() and len(grads) == 3 * 7 * 2
    for name, grad in grads.items():
        assert torch.equal(our_grads[name], grad), name

    # A forward pass that is never followed by a backward pass leaves nothing behind (no reference cycles).
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = ours(**batch)
        del out
    assert sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]") == 0


def test_checkpointed_layers_are_left_to_the_checkpoint(tiny_model_factory):
    from loratool.train.memory.cheap_recompute import recompute_cheap_activations

    path = tiny_model_factory(num_layers=3, hidden_size=64, intermediate_size=176)
    stock, batch = _flat_llama(path, 0.1)
    ours = copy.deepcopy(stock)
    recompute_cheap_activations(ours)
    for model in (stock, ours):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bench = _bench()
    # Every layer checkpointed: each keeps only its input, with or without notes (give or take a few bytes
    # of scalars that other code in the process may allocate lazily).
    assert bench.graph_bytes(ours, **batch) == pytest.approx(bench.graph_bytes(stock, **batch), rel=0.01)
    loss, grads = _loss_and_grads(stock, batch)
    our_loss, our_grads = _loss_and_grads(ours, batch)
    assert torch.equal(our_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(our_grads[name], grad), name


def test_an_mlp_that_is_not_act_times_up_keeps_its_tensors():
    """The product is replaced only when its autograd node reads exactly act's and up's outputs: an MLP that
    adds them (same module names) must keep its own tensors, or its gradients would be wrong."""
    from peft import LoraConfig, get_peft_model
    from transformers.modeling_layers import GradientCheckpointingLayer

    from loratool.train.memory.cheap_recompute import recompute_cheap_activations

    class MLP(torch.nn.Module):
        def __init__(self, add: bool):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
            self.down_proj, self.act_fn, self.add = torch.nn.Linear(32, 16), torch.nn.SiLU(), add

        def forward(self, x):
            act, up = self.act_fn(self.gate_proj(x)), self.up_proj(x)
            return self.down_proj(act + up if self.add else act * up)

    class Layer(GradientCheckpointingLayer):
        def __init__(self, add: bool):
            super().__init__()
            self.mlp = MLP(add)

        def forward(self, x):
            return x + self.mlp(x)

    bench = _bench()
    for add in (True, False):
        torch.manual_seed(0)
        stock = get_peft_model(
            torch.nn.Sequential(Layer(add)),
            LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False),
        )
        ours = copy.deepcopy(stock)
        recompute_cheap_activations(ours)
        x = torch.randn(64, 16)
        kept, our_kept = bench.graph_bytes(stock, x), bench.graph_bytes(ours, x)
        grads = []
        for model in (stock, ours):
            model.zero_grad()
            model(x).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
        if add:
            assert our_kept == kept
        else:  # the control: the same harness does replace a real gated product
            assert our_kept < kept


def test_the_lm_head_takes_small_vocabulary_tiles_on_cpu(monkeypatch):
    from trl.trainer import utils

    from loratool.train.memory.loss_positions import CPU_VOCAB_TILE, small_vocab_tiles_on_cpu

    monkeypatch.setattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    assert small_vocab_tiles_on_cpu()
    assert utils._CHUNKED_LOGPROB_CHUNK_SIZE == CPU_VOCAB_TILE == 4096
    monkeypatch.delattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")
    assert not small_vocab_tiles_on_cpu()  # a TRL without the setting: nothing to change


def test_a_deep_copy_keeps_its_own_notes(tiny_model_factory):
    """The wrappers are methods of their module: a copy made after `recompute_cheap_activations` runs its
    own layers (its gradients land on its own weights) and still takes notes."""
    from loratool.train.memory.cheap_recompute import recompute_cheap_activations

    path = tiny_model_factory(num_layers=3, hidden_size=64, intermediate_size=176)
    stock, batch = _flat_llama(path, 0.0)
    ours = copy.deepcopy(stock)
    recompute_cheap_activations(ours)
    twin = copy.deepcopy(ours)
    _, twin_grads = _loss_and_grads(twin, batch)
    assert all(p.grad is None for p in ours.parameters())
    _, grads = _loss_and_grads(stock, batch)
    assert all(torch.equal(twin_grads[name], grad) for name, grad in grads.items())
    bench = _bench()
    assert bench.graph_bytes(twin, **batch) < 0.8 * bench.graph_bytes(stock, **batch)
