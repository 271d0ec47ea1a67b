"""Capture stage: torch.export of the Qwen3 decoder with dynamic batch, sequence and cache length, in its three
forms: `capture` (a decoder with its weights), `capture_meta` (on the meta device, no weights: build --stream)
and `capture_rank` (one tp x ep rank with its collectives, on meta: parallel artifacts re-capture at load).

One ExportedProgram serves prefill (past length 0, many tokens) and decode (one token over the cache).
"""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram
from torch.utils._sympy.value_ranges import bound_sympy

from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.graphs.parallel import RankDecoder
from qwen3export.spec import ModelSpec

MAX_BATCH = 1024


def decoder_example_inputs(model: Qwen3Decoder, batch: int = 2, seq: int = 3, past: int = 2):
    """Inputs for tracing; sizes >= 2 so that no dimension is specialised to 0 or 1."""
    spec = model.spec
    input_ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = torch.zeros(batch, spec.num_key_value_heads, past, spec.head_dim, dtype=model.dtype)
    cache = tuple((kv.clone(), kv.clone()) for _ in range(spec.num_hidden_layers))
    return (input_ids, position_ids, attention_mask, cache)


def dynamic_shapes(model: Qwen3Decoder):
    spec = model.spec
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=spec.max_positions)
    past = Dim("past", min=0, max=spec.max_positions)
    kv = {0: batch, 2: past}
    # attention_mask length is past + seq: Dim.AUTO lets export derive that relation
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: Dim.AUTO},
            tuple((kv, kv) for _ in range(spec.num_hidden_layers)))


def capture(model: Qwen3Decoder, *, strict: bool = False) -> ExportedProgram:
    """torch.export the decoder: (input_ids, position_ids, attention_mask, past) -> (logits, present).

    The program has no graph breaks and no fallback ops: the MoE is written without data-dependent
    shapes (graphs/decoder.py SparseMoeBlock).
    """
    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, decoder_example_inputs(model), dynamic_shapes=dynamic_shapes(model),
                                 strict=strict)
    widen_derived_ranges(ep)
    return ep


def widen_derived_ranges(ep: ExportedProgram) -> None:
    """Recompute the range of derived sizes (attention_mask length = past + seq) from their parts.

    Export records the sum's range from the tracing hints (each part >= 2, so >= 4), which would make
    ep.module() refuse a one-token prefill (past 0 + seq 1). The graph itself is valid for any sum of
    valid parts, so the derived range is the sum of the parts' declared ranges.
    """
    rc = ep.range_constraints
    symbols = {k: v for k, v in rc.items() if k.is_Symbol}
    for expr in [k for k in rc if not k.is_Symbol]:
        if expr.free_symbols <= set(symbols):
            rc[expr] = bound_sympy(expr, symbols)


META = torch.device("meta")


def meta_decoder(spec: ModelSpec, dtype: torch.dtype) -> Qwen3Decoder:
    """The decoder with every parameter and buffer on the meta device (nothing allocated). The RoPE
    frequencies stay fp32 as in the eager module (reset_derived after the dtype move), so a bf16 graph
    computes cos/sin from fp32 frequencies as eager does and as the loader supplies them."""
    with META:
        module = Qwen3Decoder(spec)
    module = module.to(dtype)
    module.reset_derived()
    return module.eval()


def capture_meta(module: Qwen3Decoder) -> torch.export.ExportedProgram:
    """`capture` of a meta decoder: the same example inputs and dynamic shapes, on the meta device, so the
    program holds no weight (build --stream)."""
    ids, pos, mask, cache = decoder_example_inputs(module)
    inputs = (ids.to(META), pos.to(META), mask.to(META), tuple((k.to(META), v.to(META)) for k, v in cache))
    with torch.no_grad():
        ep = torch.export.export(module.eval(), inputs, dynamic_shapes=dynamic_shapes(module), strict=False)
    widen_derived_ranges(ep)
    return ep


def capture_rank(module: RankDecoder, *, strict: bool = False) -> torch.export.ExportedProgram:
    """torch.export one rank, dynamic batch / sequence / cache length as `capture` does.

    Needs no process group: the functional collectives have fake implementations and name their group
    by role, resolved only when the program runs.
    """
    spec, batch, seq, past = module.spec, 2, 3, 2
    device = module.model.embed_tokens.weight.device  # "meta": a weight-free capture (meta_rank_decoder)
    input_ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous().to(device)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64, device=device)
    kv = torch.zeros(batch, module.kv_heads, past, spec.head_dim, dtype=module.dtype, device=device)
    cache = tuple((kv.clone(), kv.clone()) for _ in range(spec.num_hidden_layers))
    with torch.no_grad():
        ep = torch.export.export(module.eval(), (input_ids, position_ids, attention_mask, cache),
                                 dynamic_shapes=dynamic_shapes(module), strict=strict)
    widen_derived_ranges(ep)
    return ep
