"""The sampling graph: (logits, state, params, uniforms) -> (next_token, new_state), exported next to the
decoder (DESIGN §4). Penalties, temperature, top-k/top-p/min-p as transformers' logits processors,
inverse-CDF sampling from an input uniform, and Qwen3 thinking-mode control (budget, forced early stop).

Bit-identical token ids in torch and ONNX Runtime: every decision is made from values computed with
correctly rounded IEEE operations only (+, -, *, /, floor, comparisons, sequential cumsum) in the same
order on both sides; `exp` is our own polynomial for that reason, and nothing depends on how a sort
orders ties (torch.sort and ONNX TopK need not agree there).

Cost (issue 18): three paths chosen inside the graph (torch.cond -> ONNX If), each giving the token of the
full-vocabulary path: every row greedy -> ArgMax (first maximum); every row greedy or 0 < top_k < K with no
tie across the K = TOPK_CANDIDATES-th candidate -> filtering and inverse CDF on TopK's K candidates;
otherwise (top_k 0, top_k >= K, ties reaching past K) the full sort of the vocabulary. Penalties read and
write only the tokens in the state's id lists. benchmarks/sampling_cpu.py times them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from qwen3export.errors import InputError

from .sampling_params import (PARAM_DTYPES, PARAM_NAMES, QWEN3_DEFAULTS, SamplingParams, check_params,
                              read_generation_config, sampling_defaults, stack_params)
from .sampling_state import (EARLY_STOP_TEXT, PAD_ID, STATE_NAMES, SamplingVocab, check_early_stop, check_logits,
                             early_stop_ids, initial_state, mask_ids, pad_ids)

__all__ = [
    "EARLY_STOP_TEXT", "INPUT_NAMES", "OUTPUT_NAMES", "PARAM_NAMES", "QWEN3_DEFAULTS", "STATE_NAMES",
    "SamplingGraph", "SamplingParams", "SamplingSession", "SamplingVocab", "capture_sampling",
    "check_logits", "check_params", "draw_uniforms", "early_stop_ids", "emit_sampling_onnx",
    "initial_state", "mask_ids", "pad_ids", "PAD_ID", "read_generation_config", "sample_step", "sampling_defaults",
    "stack_params",
]

OPSET = 18
SAMPLING_FILE = "sampling.onnx"
MAX_BATCH = 1024  # as the decoder's capture (capture.py)
MAX_IDS = 1 << 22  # longest seen/generated id list (prompt + output tokens) the capture allows
BATCH = "batch_size"  # symbolic batch dimension of the ONNX interface (as the decoder's)
INPUT_NAMES = ("logits", *STATE_NAMES, *PARAM_NAMES, "uniforms")
OUTPUT_NAMES = ("next_token", *(f"new_{n}" for n in STATE_NAMES))


def _f32(x: float) -> float:
    """x rounded to float32, so that a constant means the same in torch's and ONNX's float32 arithmetic."""
    return float(np.float32(x))


# exp by Cody-Waite range reduction, exp(d) = 2^n * exp(r), |r| <= ln2/2, in float32 (the precision of
# transformers' softmax). Constants as float32 values; LN2_HI/LN2_LO from fdlibm e_expf.c (ln2_hi has
# 9 trailing zero bits, so n * LN2_HI is exact for the |n| <= 116 used here).
LOG2E = _f32(1.4426950408889634)
LN2_HI = _f32(6.9314575195e-01)
LN2_LO = _f32(1.4286067653e-06)
EXP_FLOOR = -80.0  # exp(-80) ~ 1.8e-35 is a normal float32 (min 1.2e-38); lighter tokens weigh 0
# Taylor coefficients 1/7! … 1/2!, 1, 1: truncation (ln2/2)^8 / 8! ~ 5e-9, below float32's 6e-8
_EXP_COEFFS = tuple(_f32(1.0 / float(np.prod(np.arange(1, k + 1)))) for k in range(7, -1, -1))
_POW2 = torch.tensor([2.0 ** -i for i in range(117)], dtype=torch.float32)  # 2^-i for i = -n in [0, 116]


def exp_f32(d: torch.Tensor) -> torch.Tensor:
    """exp(d) for float32 d <= 0 (-inf allowed -> 0) from +, *, floor, a table lookup and where only.

    Each of those is correctly rounded in IEEE 754, so torch and ONNX Runtime (CPU or CUDA) return the
    same bits, which their library exps (Sleef, MLAS, CUDA) do not promise. Accurate to a few float32 ulp;
    tokens more than 80 nats below the best (relative weight < 2e-35) weigh 0.
    """
    dc = torch.where(d >= EXP_FLOOR, d, EXP_FLOOR)
    n = torch.floor(dc * LOG2E + 0.5)  # integer-valued, in [-116, 0]
    r = (dc - n * LN2_HI) - n * LN2_LO  # |r| <= ln2/2 (+ rounding)
    p = torch.full_like(r, _EXP_COEFFS[0])
    for c in _EXP_COEFFS[1:]:
        p = p * r + c  # Horner: separate mul and add in both runtimes, never a fused multiply-add
    scale = _POW2.to(d.device)[(-n).to(torch.int64)]  # 2^n looked up: exact, no pow/ldexp
    return torch.where(d >= EXP_FLOOR, p * scale, 0.0)


def _scatter_ids(scores: torch.Tensor, ids: torch.Tensor, update) -> torch.Tensor:
    """scores [B, V] with update(value) written at each id of ids [B, N] (PAD_ID = -1 pads; duplicates fine).

    Pads are pointed at token 0 and write what any real entry for token 0 writes (update(value) when the
    row lists 0, the value unchanged otherwise), so the result does not depend on the order in which
    ScatterElements/scatter apply duplicate indices.
    """
    lists_zero = (ids == 0).any(dim=-1, keepdim=True)  # [B, 1]
    idx = ids.clamp(min=0)  # [B, N]
    val = scores.gather(1, idx)  # [B, N]
    return scores.scatter(1, idx, torch.where((ids >= 0) | lists_zero, update(val), val))


def penalize(logits: torch.Tensor, seen_ids: torch.Tensor, generated_ids: torch.Tensor,
             repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor) -> torch.Tensor:
    """Penalised scores [B, V] f32 from logits [B, V] f32, id lists [B, S] / [B, G] int64 (-1 pads, repeats
    allowed) and penalties [B]; only the listed tokens are read and written.

    Repetition penalty over prompt + output tokens (`seen_ids`) exactly as transformers'
    RepetitionPenaltyLogitsProcessor (negative scores times the penalty, others divided by it); then the
    presence penalty subtracted from output tokens (`generated_ids`), vLLM's apply_penalties order and rule
    (vllm/model_executor/layers/utils.py; the OpenAI API's definition).
    """
    rp = repetition_penalty[:, None]  # [B, 1]
    s = _scatter_ids(logits, seen_ids, lambda x: torch.where(x < 0, x * rp, x / rp))
    return _scatter_ids(s, generated_ids, lambda x: x - presence_penalty[:, None])


def filter_weights(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """Unnormalised float32 sampling weights [B, V] (p_i / p_max) of penalised scores [B, V] f32; params [B].

    transformers' order and rules (generation/utils.py _get_logits_processor): TemperatureLogitsWarper,
    TopKLogitsWarper (drop x < k-th largest), TopPLogitsWarper (keep a token iff the mass above it is
    < top_p), MinPLogitsWarper (drop p < min_p * p_max). Ties at a top-p boundary are all kept
    (transformers keeps whichever the sort put last, which is order-dependent). Greedy rows
    (temperature 0) get weight 1 on every maximum and 0 elsewhere.

    Everything is computed in descending order and scattered back. The sort's order among tied scores
    differs between torch and ONNX TopK, but tied scores get identical weights and keep-decisions, so the
    scattered result is the same for any tie order.
    """
    v = scores.shape[-1]
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    x = scores / t[:, None]  # [B, V] f32, as TemperatureLogitsWarper
    srt, order = torch.sort(x, dim=-1, descending=True)  # [B, V] values, [B, V] vocabulary ids
    m = srt[:, :1]  # [B, 1] best score, always kept
    # top-k: threshold = k-th largest value; k > V keeps everything, k = 0 is off
    kth_pos = (top_k.clamp(min=1, max=v) - 1)[:, None]  # [B, 1]
    kth = torch.where(top_k[:, None] > 0, srt.gather(1, kth_pos), float("-inf"))  # [B, 1]
    w = exp_f32(srt - m)  # [B, V] p_i / p_max, non-increasing
    keep = srt >= kth
    # top-p on the top-k survivors, which are a prefix: position j is kept iff the weight before it is
    # < top_p * total; float64 sums, exclusive sums by shifting (no subtraction)
    cum = torch.cumsum(torch.where(keep, w, 0.0).double(), dim=-1)  # [B, V] sequential in both runtimes
    above = torch.cat((torch.zeros_like(cum[:, :1]), cum[:, :-1]), dim=-1)  # [B, V]
    n_p = (above < top_p.double()[:, None] * cum[:, -1:]).sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    tp = srt.gather(1, n_p - 1)  # [B, 1] smallest kept value: every token tied with it is kept too
    # top_p = 1 is off, as in transformers (which skips the warper): the sums above would drop tokens
    # lighter than the total's rounding, which are no part of the top-p rule
    tp = torch.where(top_p[:, None] >= 1, float("-inf"), tp)
    keep = keep & (srt >= tp) & (w >= min_p[:, None])  # min-p: p_i >= min_p * p_max
    w = torch.where(keep, w, 0.0)
    w = torch.where((temperature == 0)[:, None], (srt == m).to(w.dtype), w)
    return torch.zeros_like(w).scatter(1, order, w)  # [B, V] back in vocabulary order


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token [B] int64: the first index whose cumulative weight (vocabulary order) exceeds u * total.

    Only tokens with positive weight can be chosen (the cumulative sum steps there); u = 0 picks the
    first of them, so greedy rows take the first maximum, like argmax; u = 1 (outside the drawn range
    [0, 1), but harmless) picks the last. The uniforms are float32, so no probability is resolved finer
    than 2^-24.
    """
    cum = torch.cumsum(weights.double(), dim=-1)  # [B, V] f64
    total = cum[:, -1:]  # [B, 1]
    target = uniforms.clamp(0.0, 1.0).double()[:, None] * total  # [B, 1]
    return ((cum <= target) & (cum < total)).sum(-1)


# Candidates of the top-k fast path: a row with 0 < top_k < TOPK_CANDIDATES is sampled from the TopK of its
# scores, not from a sort of the whole vocabulary (Qwen3's recommended top_k is 20; transformers' default 50)
TOPK_CANDIDATES = 128


def topk_pick(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor, uniforms: torch.Tensor, cand_s: torch.Tensor,
              cand_ids: torch.Tensor) -> torch.Tensor:
    """Token [B] int64 of filter_weights + inverse_cdf computed on the K = cand_s.shape[1] largest scores
    only (cand_s [B, K] descending, cand_ids [B, K] their ids, in any order among ties); exact when
    `topk_complete` holds for every sampling row.

    Why it is the same token: the kept set lies inside the candidates (every token outside scores below
    the k-th value), so the full path's sorted weights are these K followed by zeros: its top-p sums,
    counts and thresholds are the same numbers from the same additions. Its inverse CDF adds the kept
    weights in vocabulary order with zeros between them, which changes no partial sum, and picks the
    first kept token whose cumulative weight exceeds u * total: here the candidates are put in id order
    (ids are distinct, so that order does not depend on how TopK ordered ties) and the same rule picks
    among them. A total of 0 (possible only with +-inf scores) picks token 0 as the full path does.
    Greedy rows (weight 1 on each maximum, u = 0) get the first maximum in id order, as argmax does.
    """
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    x = cand_s / t[:, None]  # [B, K]: division by t > 0 is monotone, so still descending
    k = x.shape[-1]
    m = x[:, :1]
    kth_pos = (top_k.clamp(min=1, max=k) - 1)[:, None]
    kth = torch.where(top_k[:, None] > 0, x.gather(1, kth_pos), float("-inf"))
    w = exp_f32(x - m)
    keep = x >= kth
    cum = torch.cumsum(torch.where(keep, w, 0.0).double(), dim=-1)
    above = torch.cat((torch.zeros_like(cum[:, :1]), cum[:, :-1]), dim=-1)
    n_p = (above < top_p.double()[:, None] * cum[:, -1:]).sum(-1, keepdim=True).clamp(min=1)
    tp = x.gather(1, n_p - 1)
    tp = torch.where(top_p[:, None] >= 1, float("-inf"), tp)
    keep = keep & (x >= tp) & (w >= min_p[:, None])
    w = torch.where(keep, w, 0.0)
    w = torch.where((temperature == 0)[:, None], (x == m).to(w.dtype), w)
    ids, order = torch.sort(cand_ids, dim=-1)  # distinct ids: a unique order, the vocabulary's
    w = w.gather(1, order)
    cum = torch.cumsum(w.double(), dim=-1)  # [B, K] the full path's partial sums at the kept tokens
    total = cum[:, -1:]
    u = torch.where(temperature == 0, torch.zeros_like(uniforms), uniforms)
    target = u.clamp(0.0, 1.0).double()[:, None] * total
    j = ((cum <= target) & (cum < total)).sum(-1, keepdim=True).clamp(max=k - 1)  # [B, 1]
    return torch.where(total[:, 0] > 0, ids.gather(1, j)[:, 0], torch.zeros_like(ids[:, 0]))


def topk_complete(cand_s: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  vocab_size: int) -> torch.Tensor:
    """[B] bool: the row's kept set lies inside its K candidates, so topk_pick gives the full path's token.

    K is the whole vocabulary, or: a greedy row's last candidate scores strictly below its maximum (every
    maximum is a candidate); a sampling row has 0 < top_k < K and its last candidate scores strictly
    below the k-th (after temperature). Then no token outside the candidates ties with the threshold, so
    none can be kept, whatever order TopK gave to ties.
    """
    k = cand_s.shape[-1]
    greedy = temperature == 0
    if k >= vocab_size:
        return greedy | (top_k > 0)
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = cand_s / t[:, None]
    kk = torch.where(greedy, torch.ones_like(top_k), top_k.clamp(min=1, max=k))
    kth = x.gather(1, (kk - 1)[:, None])[:, 0]
    return (greedy | ((top_k > 0) & (top_k < k))) & (x[:, -1] < kth)


def _greedy(scores, temperature, top_k, top_p, min_p, uniforms):
    return torch.argmax(scores, dim=-1)  # the first maximum, as the full path's greedy rule (u = 0)


def full_path(scores, temperature, top_k, top_p, min_p, uniforms):
    w = filter_weights(scores, temperature, top_k, top_p, min_p)  # [B, V] f32
    return inverse_cdf(w, torch.where(temperature == 0, torch.zeros_like(uniforms), uniforms))


class _Sample(nn.Module):
    """Sampling for a batch with at least one non-greedy row: the top-k fast path when every row allows
    it (topk_complete), else the full-vocabulary path. Greedy rows get the first maximum on both."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.k = min(vocab_size, TOPK_CANDIDATES)

    def forward(self, scores, temperature, top_k, top_p, min_p, uniforms):
        cand_s, cand_ids = torch.topk(scores, self.k, dim=-1)  # [B, K] descending; tie order unspecified
        ok = topk_complete(cand_s, temperature, top_k, self.vocab_size).all()

        def fast(scores, temperature, top_k, top_p, min_p, uniforms, cand_s, cand_ids):
            return topk_pick(scores, temperature, top_k, top_p, min_p, uniforms, cand_s, cand_ids)

        def full(scores, temperature, top_k, top_p, min_p, uniforms, cand_s, cand_ids):
            return full_path(scores, temperature, top_k, top_p, min_p, uniforms)

        return torch.cond(ok, fast, full, (scores, temperature, top_k, top_p, min_p, uniforms, cand_s, cand_ids))


class SamplingGraph(nn.Module):
    """One sampling step for a batch; inputs and outputs in INPUT_NAMES / OUTPUT_NAMES order.

    Thinking control (when the vocabulary has `<think>`/`</think>`):
    - enable_thinking false: `<think>` gets -inf, so it is never produced; a row already inside thinking
      (its prompt opened `<think>`) is treated as having budget 0 and is closed at once by the forced
      sequence.
    - think_spent counts tokens the model samples while inside thinking, `</think>` excluded; forced
      tokens do not count. At the start of a step, a row inside thinking with think_spent >= budget
      (budget >= 0) and not yet forcing begins the forced sequence; it emits one forced token per step,
      the last `</think>` ends thinking, then sampling resumes. So with budget N exactly N sampled tokens
      lie between `<think>` and the forced sequence, unless the model closes `</think>` itself first
      (then nothing is forced). The count is per generation (not reset by a second `<think>`).
    """

    def __init__(self, vocab: SamplingVocab, early_stop: Sequence[int] | None = None):
        super().__init__()
        self.vocab = vocab
        self.vocab_size = vocab.vocab_size
        if vocab.has_thinking:
            ids = check_early_stop(early_stop if early_stop is not None else (vocab.end_think_id,), vocab)
        else:
            ids = (0,)  # unused placeholder: no row can ever be inside thinking
        self.early_stop = ids
        self.sample = _Sample(self.vocab_size)
        self.register_buffer("forced_ids", torch.tensor(ids, dtype=torch.int64), persistent=False)  # [L]

    def forward(self, logits, seen_ids, generated_ids, in_think, think_spent, forced_pos, temperature, top_k, top_p,
                min_p, repetition_penalty, presence_penalty, enable_thinking, thinking_budget, uniforms):
        """logits [B, V] f32; state as STATE_NAMES; params [B] as PARAM_DTYPES; uniforms [B] f32 in [0, 1)
        -> (next_token [B] int64, *new state)."""
        s = penalize(logits, seen_ids, generated_ids, repetition_penalty, presence_penalty)  # [B, V] f32
        if self.vocab.has_thinking:  # thinking off: <think> gets -inf (one column written)
            think = torch.full_like(think_spent, self.vocab.think_id)[:, None]  # [B, 1]
            s = s.scatter(1, think, torch.where(enable_thinking[:, None], s.gather(1, think), float("-inf")))
        # all rows greedy: argmax; else the top-k candidates when they suffice, else the whole vocabulary
        token = torch.cond((temperature == 0).all(), _greedy, self.sample,
                           (s, temperature, top_k, top_p, min_p, uniforms))  # [B] int64

        if self.vocab.has_thinking:
            budget = torch.where(enable_thinking, thinking_budget, torch.zeros_like(thinking_budget))
            start = in_think & (budget >= 0) & (think_spent >= budget) & (forced_pos < 0)  # [B]
            forcing = (forced_pos >= 0) | start
            pos = forced_pos.clamp(min=0, max=len(self.early_stop) - 1)  # start -> 0
            token = torch.where(forcing, self.forced_ids[pos], token)
            forced_pos = torch.where(forcing & (pos + 1 < len(self.early_stop)), pos + 1, -1)
            end = token == self.vocab.end_think_id
            think_spent = think_spent + (in_think & ~forcing & ~end).to(torch.int64)
            in_think = (in_think | (token == self.vocab.think_id)) & ~end
        new = token[:, None]  # [B, 1] appended to both id lists
        return (token, torch.cat((seen_ids, new), dim=1), torch.cat((generated_ids, new), dim=1), in_think,
                think_spent, forced_pos)


# ---------------------------------------------------------------------- capture and emit
def sampling_example_inputs(graph: SamplingGraph, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; batch >= 2 so that the dimension is not specialised."""
    g = torch.Generator().manual_seed(0)
    state = initial_state([[0, 1, 2, 3, 4]] * batch, graph.vocab)  # 5 seen ids, 3 generated: no size is
    state["generated_ids"] = torch.tensor([[0, -1, 2]] * batch)  # 0 or 1, none equals another (dynamic)
    params = SamplingParams().to_tensors(batch)
    return (torch.randn(batch, graph.vocab_size, generator=g), *(state[n] for n in STATE_NAMES),
            *(params[n] for n in PARAM_NAMES), torch.rand(batch, generator=g))


def capture_sampling(graph: SamplingGraph) -> ExportedProgram:
    """torch.export of the sampling graph with a dynamic batch (vocabulary fixed by the model)."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    lists = {"seen_ids": Dim("seen", min=1, max=MAX_IDS), "generated_ids": Dim("generated", min=1, max=MAX_IDS)}
    shapes = tuple({0: batch, 1: lists[n]} if n in lists else {0: batch} for n in INPUT_NAMES)
    with torch.no_grad():
        return torch.export.export(graph.eval(), sampling_example_inputs(graph), dynamic_shapes=shapes, strict=False)


def io_shapes(vocab_size: int) -> dict[str, list[str | int]]:
    """The ONNX interface's shapes with the symbolic batch dimension."""
    second = {"logits": vocab_size, "seen_ids": "seen_len", "generated_ids": "generated_len",
              "new_seen_ids": "new_seen_len", "new_generated_ids": "new_generated_len"}
    return {n: [BATCH, second[n]] if n in second else [BATCH] for n in (*INPUT_NAMES, *OUTPUT_NAMES)}


def emit_sampling_onnx(graph: SamplingGraph, path: Path, ep: ExportedProgram | None = None) -> dict[str, Any]:
    """Write the sampling graph as ONNX (opset 18) at `path`, check that ONNX Runtime's CPU provider loads
    it, and return its engine entry for the manifest. `ep`: the graph's capture, when already made."""
    import onnx_ir as ir  # lazy: the ONNX toolchain, needed at export only
    import onnxruntime as ort  # lazy: loads onnxruntime

    ep = capture_sampling(graph) if ep is None else ep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES), optimize=True, verbose=False)
    shapes = io_shapes(graph.vocab_size)
    for value in (*program.model.graph.inputs, *program.model.graph.outputs):
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in shapes[value.name]])
    path = Path(path)
    program.save(str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # raises if ORT cannot load it
    return {"file": path.name, "opset": OPSET, "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
            "shapes": shapes, "early_stop_ids": list(graph.early_stop)}


# ---------------------------------------------------------------------- host side, one step
class SamplingSession:
    """An ONNX Runtime session over sampling.onnx, callable like SamplingGraph (torch tensors in and out)."""

    def __init__(self, path: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        import onnxruntime as ort  # lazy: loads onnxruntime

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        self.vocab_size = self.session.get_inputs()[0].shape[1]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {n: np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t)
                for n, t in zip(INPUT_NAMES, inputs)}
        return tuple(torch.from_numpy(o) for o in self.session.run(list(OUTPUT_NAMES), feed))


def draw_uniforms(rng: np.random.Generator | torch.Generator, batch: int) -> torch.Tensor:
    """[batch] float32 uniforms in [0, 1), the graph's only source of randomness."""
    if isinstance(rng, torch.Generator):
        return torch.rand(batch, generator=rng, dtype=torch.float32)
    return torch.from_numpy(rng.random(batch, dtype=np.float32))


def sample_step(engine: SamplingGraph | SamplingSession | Any, logits: torch.Tensor,
                state: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                rng: np.random.Generator | torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One sampling step -> (next_token [B] int64, new state). `engine` is a SamplingGraph, an exported
    program's module or a SamplingSession; logits and parameters are checked first (InputError)."""
    check_logits(logits, getattr(engine, "vocab_size", None))
    check_params(params)
    batch = logits.shape[0]
    for n in STATE_NAMES:
        if n not in state or state[n].shape[0] != batch:
            raise InputError(f"sampling state {n} must have one row per logits row ({batch}); "
                             "build it with initial_state")
    params = {n: torch.as_tensor(params[n], dtype=PARAM_DTYPES[n]) for n in PARAM_NAMES}
    if params["temperature"].shape[0] != batch:
        raise InputError(f"sampling parameters have {params['temperature'].shape[0]} rows, logits {batch}")
    args = (logits, *(state[n] for n in STATE_NAMES), *(params[n] for n in PARAM_NAMES),
            draw_uniforms(rng, batch))
    with torch.no_grad():
        out = engine(*args)
    return out[0], dict(zip(STATE_NAMES, out[1:]))
