"""Load stage, presets: seeded random weights whose statistics look like a trained Qwen3's where engines care.

Two named statistics (`--weight-stats`):
- "trained" (the default): what breaks engines in real checkpoints is there (measured on the tiny presets
  and on qwen3-0.6b's shapes by tests/test_synthetic_weights.py):
  * logits with std ~3 and a max of 15-35 per position (trained Qwen3 logits reach 20-35);
  * RMSNorm weights that are not 1 (log-normal around 1; the final norm around 3, which is where trained
    models get their logit scale from);
  * "massive activations" (Sun et al., 2024, arXiv:2402.17762): after the second layer, two fixed residual
    channels hold values in the thousands at "delimiter" tokens (here every token id = 3 mod 8), constant
    through the later layers, while the other channels stay of order 1; the norms' weights at those
    channels are small, as in trained models;
  * heavy-tailed linear weights (0.1% of entries x8), which is what makes low-bit quantization hard;
  * for MoE, router logits with a per-expert offset, so experts are loaded unevenly.
- "small": the first wave's draw: linear weights N(0, 0.02) (transformers' initializer_range), norm weights
  1 + N(0, 0.1). Logits come out near zero and nothing is an outlier; kept by name for comparisons.

Every tensor is a function of (seed, its name, the spec) alone, made on demand: a 235B preset streams.
"""

from __future__ import annotations

import re
import zlib

import torch

from .spec import ModelSpec

WEIGHT_STATS = ("trained", "small")
DEFAULT_WEIGHT_STATS = "trained"

DELIMITER_PERIOD, DELIMITER_PHASE = 8, 3  # token ids = 3 mod 8 carry the marker that triggers massive activations
MASSIVE_NEURON_GAIN = 4.0  # gate/up rows of the massive neuron: act = g*silu(g), g ~ 4 * 2 at a delimiter -> ~60
MASSIVE_WRITE = (24.0, -36.0)  # down_proj entries of the two massive channels: ~60 x 24..36 -> 1,400..2,200
MARKER_VALUE, DC_VALUE = 2.0, 1.0  # embedding columns of the marker and the always-on channel
LOGIT_SCALE = 3.0  # final norm weight median (untied): logits std ~3 (lm_head rows: unit norm x a log-normal)
OUTLIER_FRACTION, OUTLIER_GAIN = 1e-3, 8.0


def _generator(seed: int, key: str) -> torch.Generator:
    # torch's CPU generator keeps only 32 bits of a seed: fold (seed, key) into them
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))


def small_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The "small" statistics: N(0, 0.02) linear weights, 1 + N(0, 0.1) norm weights."""
    t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * t
    return 0.02 * t


class Channels:
    """The residual channels that carry structure: `dc` (always on, biases the router), `marker` (on at
    delimiter tokens, read by the massive neuron) and `massive` (two channels written by it)."""

    def __init__(self, spec: ModelSpec, seed: int):
        h = spec.hidden_size
        perm = torch.randperm(h, generator=_generator(seed, "channels")).tolist()
        self.dc, self.marker, self.massive = perm[0], perm[1], tuple(perm[2:4])
        self.reserved = (self.dc, self.marker, *self.massive)
        # the layer whose MLP writes the massive channels: the second one (the first of a 1-layer model)
        self.massive_layer = min(1, spec.num_hidden_layers - 1)
        inter = spec.moe_intermediate_size if spec.layer_is_moe(self.massive_layer) else spec.intermediate_size
        self.neuron = int(torch.randint(inter, (), generator=_generator(seed, "neuron")))


def _linear(shape: tuple[int, ...], g: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    """N(0, gain^2 / fan_in) with a heavy tail: 0.1% of the entries x8 (trained weights' outliers). Made in
    place, with the outliers drawn as indices: no temporary the size of the tensor (a streamed build's memory
    bound is 3x the largest parameter, tests/test_stream_memory.py)."""
    w = torch.randn(shape, generator=g, dtype=torch.float32).mul_(gain / shape[-1] ** 0.5)
    flat = w.view(-1)
    outliers = torch.randint(flat.numel(), (int(flat.numel() * OUTLIER_FRACTION),), generator=g)
    flat[outliers] *= OUTLIER_GAIN
    return w


def _lognormal(shape: tuple[int, ...], g: torch.Generator, sigma: float, median: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(sigma).exp_().mul_(median)


def embedding_scale(hidden: int) -> float:
    return min(1.0, 8.0 / hidden ** 0.5)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")


def trained_tensor(spec: ModelSpec, channels: Channels, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor with the "trained" statistics (see the module docstring); HF names."""
    g = _generator(seed, name)
    ch = channels
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        v, h = shape
        # embedding entries of min(1, 8/sqrt(H)): of the order of the residual stream the layers write, yet small
        # enough that a tied lm_head does not make every token's own logit the largest (that gap grows as
        # sqrt(H) x entry size); an untied lm_head has unit-norm rows
        rows = torch.randn(shape, generator=g, dtype=torch.float32)  # in place below: one tensor of memory
        rows.mul_(1 / h ** 0.5 if name == "lm_head.weight" else embedding_scale(h))
        rows.mul_(_lognormal((v, 1), g, 0.25))  # frequent tokens have larger rows -> a peaked softmax
        if name == "model.embed_tokens.weight":
            rows[:, ch.dc] = DC_VALUE
            marker = (torch.arange(v) % DELIMITER_PERIOD) == DELIMITER_PHASE
            rows[:, ch.marker] = torch.where(marker, MARKER_VALUE, 0.0)
        return rows
    if name == "model.norm.weight":
        h = spec.hidden_size
        scale = LOGIT_SCALE / (h ** 0.5 * embedding_scale(h) if spec.tie_word_embeddings else 1.0)
        # the massive channels keep the final norm's scale: at a delimiter they dominate the normalized state, and
        # their lm_head columns then give that position logits of the usual size (not a flat distribution)
        return _lognormal(shape, g, 0.1, scale)
    m = _LAYER.fullmatch(name)
    if m is None:
        raise KeyError(f"no trained-statistics rule for tensor {name}")
    layer, rest = int(m.group(1)), m.group(2)
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        w = _lognormal(shape, g, 0.25)
        w[list(ch.massive)] = 0.02
        w[ch.marker] = 1.0
        return w
    if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        return _lognormal(shape, g, 0.3, 1.3)  # scores std ~ 1.3^2: attention that is peaked, not one-hot
    if rest.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g, dtype=torch.float32)
    if rest == "mlp.gate.weight":  # router [E, H]: logits std ~2, plus a per-expert offset on the dc channel
        w = _linear(shape, g, 2.0)
        w[:, ch.dc] = 1.5 * torch.randn(shape[0], generator=g, dtype=torch.float32)
        return w
    w = _linear(shape, g)
    writes_residual = rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight") or (
        rest.startswith("mlp.experts.") and rest.endswith("down_proj.weight"))
    if writes_residual:  # [H, in]: the structured channels are written by nothing but the massive neuron
        w[list(ch.reserved)] = 0.0
        if layer == ch.massive_layer and "mlp" in rest:
            for c, value in zip(ch.massive, MASSIVE_WRITE):
                w[c, ch.neuron] = value
    elif layer == ch.massive_layer and (rest.endswith("gate_proj.weight") or rest.endswith("up_proj.weight")):
        # the massive neuron reads the marker only: act = g * silu(g) >= 0, ~0 off delimiters
        w[ch.neuron] = 0.0
        w[ch.neuron, ch.marker] = MASSIVE_NEURON_GAIN
    return w
