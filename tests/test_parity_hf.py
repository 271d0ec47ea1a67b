"""Parity of the qwen3export decoder against Hugging Face transformers (the eager reference).

Each case writes a transformers checkpoint with save_pretrained, loads the folder with our loader, and
compares logits, greedy generation through our KV cache, and the torch.export program.
"""

from __future__ import annotations

import pytest
import torch

import qwen3export
from qwen3export.graph_capture import capture
from qwen3export.generation import greedy_generate, left_pad, position_ids_from_mask
from qwen3export.spec import preset

VOCAB = 1024  # small vocab for the HF-side cases keeps them fast; presets cover the real 151936
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=10000.0,
            max_position_embeddings=512, eos_token_ids=(VOCAB - 1,), bos_token_id=VOCAB - 2,
            think_token_id=None, end_think_token_id=None)
MOE = dict(BASE, model_type="qwen3_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)

CASES = {
    "dense-tied": preset("tiny").replace(**BASE, tie_word_embeddings=True),
    "dense-untied-bias": preset("tiny").replace(**BASE, tie_word_embeddings=False, attention_bias=True),
    "moe-norm-topk": preset("tiny-moe").replace(**MOE, norm_topk_prob=True, mlp_only_layers=()),
    "moe-no-norm-topk": preset("tiny-moe").replace(**MOE, norm_topk_prob=False, mlp_only_layers=(),
                                                   tie_word_embeddings=True),
    # layers 0..3: sparse iff (i+1) % 2 == 0 and i not in mlp_only_layers -> only layer 1 is MoE
    "moe-mixed": preset("tiny-moe").replace(**{**MOE, "num_hidden_layers": 4}, norm_topk_prob=True,
                                            decoder_sparse_step=2, mlp_only_layers=(3,)),
}

PROMPTS = [[5, 17, 300, 42, 9, 77, 512], [900, 3, 64]]  # batch 2, left padded


def _load(hf_checkpoints, case, dtype="fp32"):
    folder, hf = hf_checkpoints(CASES[case], name=case)
    ours = qwen3export.load_model(folder, dtype=dtype)
    return ours, hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_checkpoints, case):
    ours, hf = _load(hf_checkpoints, case)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got, present = ours(ids, position_ids_from_mask(mask), mask, ours.empty_cache(2))
    real = mask.bool()  # padded positions are garbage in both; compare real tokens
    err = (got - ref)[real].abs().max().item()
    assert err <= 1e-4, f"max abs logits error {err}"
    assert len(present) == ours.spec.num_hidden_layers
    assert present[0][0].shape == (2, ours.spec.num_key_value_heads, ids.shape[1], ours.spec.head_dim)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_32_tokens_match_transformers_generate(hf_checkpoints, case):
    ours, hf = _load(hf_checkpoints, case)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                          min_new_tokens=32)[:, ids.shape[1]:]
    got, _, _ = greedy_generate(ours, ours.empty_cache(2), ids, mask, 32)
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("case", ["dense-tied", "moe-mixed"])
def test_exported_program_matches_eager(hf_checkpoints, case):
    ours, _ = _load(hf_checkpoints, case)
    ep = capture(ours)
    prog = ep.module()
    ids, mask = left_pad(PROMPTS)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        # prefill with an empty cache (past length 0), then one decode step over the cache
        ref_logits, ref_cache = ours(ids, pos, mask, ours.empty_cache(2))
        got_logits, got_cache = prog(ids, pos, mask, ours.empty_cache(2))
        assert (got_logits - ref_logits).abs().max().item() <= 1e-5
        nxt = ref_logits[:, -1:].argmax(-1)
        mask2 = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
        pos2 = position_ids_from_mask(mask2)[:, -1:]
        ref2, _ = ours(nxt, pos2, mask2, ref_cache)
        got2, _ = prog(nxt, pos2, mask2, got_cache)
        assert (got2 - ref2).abs().max().item() <= 1e-5
    # batch 1 through the same program: batch is dynamic
    with torch.no_grad():
        one = prog(ids[:1], pos[:1], mask[:1], ours.empty_cache(1))[0]
        assert (one - ours(ids[:1], pos[:1], mask[:1], ours.empty_cache(1))[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["dense-untied-bias", "moe-norm-topk"])
def test_bf16_close_to_transformers_bf16(hf_checkpoints, case):
    """bf16 weights and activations on both sides. Tolerance: logits within 2% of their largest
    magnitude (bf16 has an 8-bit mantissa; 2 layers accumulate a few ulps), and the same top-1 token
    wherever the reference's top-1/top-2 margin exceeds twice that tolerance (closer ties may flip)."""
    ours, hf = _load(hf_checkpoints, case, dtype="bf16")
    hf = hf.to(torch.bfloat16)
    try:
        ids, mask = left_pad(PROMPTS)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            got, _ = ours(ids, position_ids_from_mask(mask), mask, ours.empty_cache(2))
        real = mask.bool()
        ref, got = ref[real].float(), got[real].float()
        tol = 0.02 * ref.abs().max().item()
        assert (got - ref).abs().max().item() <= tol
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        assert clear.any()
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
        assert got.dtype == torch.float32 and ours.dtype == torch.bfloat16
    finally:
        hf.to(torch.float32)
