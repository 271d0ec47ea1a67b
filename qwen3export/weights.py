"""Weights: safetensors checkpoints (single file or index + shards) or seeded random weights for presets.

Load stage of the pipeline. Tensors are read one at a time from memory-mapped safetensors (never
pickle) and copied straight into the module's parameters, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import WeightsError
from .spec import ModelSpec
from .synthetic_weights import DEFAULT_WEIGHT_STATS, WEIGHT_STATS, Channels, small_tensor, trained_tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise WeightsError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Qwen3 / Qwen3-MoE checkpoint."""
    h, d, v = spec.hidden_size, spec.head_dim, spec.vocab_size
    nq, nkv = spec.num_attention_heads, spec.num_key_value_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for li in range(spec.num_hidden_layers):
        p = f"model.layers.{li}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d)):
            out[p + f"self_attn.{proj}.weight"] = (rows, h)
            if spec.attention_bias:
                out[p + f"self_attn.{proj}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, nq * d)
        if spec.attention_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "self_attn.q_norm.weight"] = (d,)
        out[p + "self_attn.k_norm.weight"] = (d,)
        if spec.layer_is_moe(li):
            i = spec.moe_intermediate_size
            out[p + "mlp.gate.weight"] = (spec.num_experts, h)
            for e in range(spec.num_experts):
                q = p + f"mlp.experts.{e}."
                out[q + "gate_proj.weight"] = (i, h)
                out[q + "up_proj.weight"] = (i, h)
                out[q + "down_proj.weight"] = (h, i)
        else:
            i = spec.intermediate_size
            out[p + "mlp.gate_proj.weight"] = (i, h)
            out[p + "mlp.up_proj.weight"] = (i, h)
            out[p + "mlp.down_proj.weight"] = (h, i)
    return out


class WeightSource(Protocol):
    """Where a model's tensors come from, by Hugging Face name."""

    description: str

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class SafetensorsSource:
    """A Hugging Face folder: model.safetensors, or model.safetensors.index.json + shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.description = str(self.folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
                raise WeightsError(f"{index} is malformed (no 'weight_map' object); restore it from the "
                                   "checkpoint") from None
            self._where = {str(k): self.folder / str(v) for k, v in weight_map.items()}
        elif single.is_file():
            self._where = None
            self._files = [single]
        else:
            pickles = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.pt"))
            hint = (f" (found {pickles[0]}: pickle checkpoints are never loaded; convert to safetensors)"
                    if pickles else "")
            raise WeightsError(f"no model.safetensors or model.safetensors.index.json in {self.folder}{hint}")
        if self._where is not None:
            self._files = sorted(set(self._where.values()))
            for f in self._files:
                if not f.is_file():
                    raise WeightsError(f"shard {f.name} named in model.safetensors.index.json is missing "
                                       f"from {self.folder}; download it again")
        self._handles: dict[Path, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # safetensors header dtypes: F32, BF16, I32, ...
        self._file_of: dict[str, Path] = {}
        for f in self._files:
            h = self._open(f)
            for k in h.keys():
                sl = h.get_slice(k)
                self._shapes[k] = tuple(sl.get_shape())
                self._dtypes[k] = str(sl.get_dtype())
                self._file_of[k] = f
        if self._where is not None:
            for k, f in self._where.items():
                if self._file_of.get(k) != f:
                    raise WeightsError(f"tensor {k} is listed in model.safetensors.index.json under "
                                       f"{f.name} but that shard does not contain it")

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                size = f.stat().st_size if f.exists() else 0
                raise WeightsError(f"weight file {f.name} ({size} bytes) is unreadable or truncated ({e}); "
                                   "download it again") from None
        return self._handles[f]

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def get(self, name: str, integer_ok: bool = False) -> torch.Tensor:
        """The tensor, read now. Integer tensors are refused unless `integer_ok` (a pre-quantized format's codes,
        prequantized.py): a float weight stored as int32 would otherwise be silently converted."""
        f = self._file_of[name]
        if not integer_ok and self._dtypes[name] not in _FLOAT_DTYPES:
            raise WeightsError(f"tensor {name} in {f.name} is {self._dtypes[name]}, not a floating-point weight; "
                               "integer tensors belong to a quantized format (AWQ/GPTQ with quantization_config); "
                               "restore the checkpoint's float weights")
        try:
            t = self._open(f).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"tensor {name} in {f.name} cannot be read ({e}); download the shard again") from None
        check_finite(t, name, f.name)
        return t


_FINITE_CHUNK = 1 << 24  # elements checked at a time: a 622M-element embedding never needs a full-size mask


def check_finite(t: torch.Tensor, name: str, where: str) -> None:
    """Refuse a floating-point tensor holding NaN or Inf: an engine built from it would pass no honest gate
    (NaN compares False against every bound) and serve garbage."""
    if not t.is_floating_point() or t.dtype.itemsize == 1:  # fp8 codes are checked where they are dequantized
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if not torch.isfinite(chunk).all():
            bad = int((~torch.isfinite(chunk)).nonzero()[0]) + start
            value = flat[bad].item()
            raise WeightsError(f"tensor {name} in {where} holds {value} at flat index {bad}; the checkpoint is "
                               "corrupt: download or re-save it (a NaN/Inf weight gives a NaN engine)")


class RandomSource:
    """Deterministic random weights for a preset: each tensor from (seed, name), made on demand.

    `stats` names the statistics (synthetic_weights.py): "trained" (the default: logits std ~3 and max
    15-35, norms not 1, massive activations, uneven MoE routing) or "small" (N(0, 0.02), the first wave's).
    A tensor does not depend on which others were generated before it.
    """

    def __init__(self, spec: ModelSpec, seed: int = 0, stats: str = DEFAULT_WEIGHT_STATS):
        if stats not in WEIGHT_STATS:
            raise WeightsError(f"unknown weight statistics {stats!r}; choose one of {', '.join(WEIGHT_STATS)}")
        self.spec, self.seed, self.stats = spec, seed, stats
        self.description = f"preset {spec.name} (random weights with {stats} statistics, seed {seed})"
        self._shapes = expected_tensors(spec)
        self._channels = Channels(spec, seed) if stats == "trained" else None

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if self._channels is None:
            return small_tensor(name, shape, self.seed)
        return trained_tensor(self.spec, self._channels, name, shape, self.seed)


def check_names(spec: ModelSpec, source: WeightSource) -> None:
    """Every expected tensor present with the right shape and nothing unexpected; else name the first."""
    have = source.names()
    # the cheap checks first, from the headers alone: a config claiming a million layers or a 10^12 vocabulary
    # is refused here, before the expected-name table (or anything else) is built for it
    in_ckpt = {int(n.split(".")[2]) for n in have if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if len(in_ckpt) != spec.num_hidden_layers:
        raise WeightsError(f"config.json says num_hidden_layers {spec.num_hidden_layers} but {source.description} "
                           f"holds weights for {len(in_ckpt)} layers; the checkpoint does not match its config.json")
    if "model.embed_tokens.weight" in have and source.shape("model.embed_tokens.weight")[0] != spec.vocab_size:
        raise WeightsError(f"config.json says vocab_size {spec.vocab_size} but model.embed_tokens.weight has "
                           f"{source.shape('model.embed_tokens.weight')[0]} rows; the checkpoint does not match "
                           "its config.json")
    expected = expected_tensors(spec)
    if spec.tie_word_embeddings:
        have = have - {"lm_head.weight"}  # some tied checkpoints still store it; it is ignored
    missing = sorted(set(expected) - have)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"tensor {missing[0]}{more} is missing from {source.description}; "
                           "the checkpoint does not match its config.json")
    unexpected = sorted(have - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"unexpected tensor {unexpected[0]}{more} in {source.description}; "
                           "the checkpoint does not match its config.json")
    dtype_of = getattr(source, "dtype", None)  # a safetensors source: the header dtypes, before any read
    for name, shape in expected.items():
        if callable(dtype_of) and dtype_of(name) not in _FLOAT_DTYPES:
            raise WeightsError(f"tensor {name} in {source.description} is {dtype_of(name)}, not a floating-point "
                               "weight; integer tensors belong to a quantized format (AWQ/GPTQ with "
                               "quantization_config); restore the checkpoint's float weights")
        if tuple(source.shape(name)) != shape:
            raise WeightsError(f"tensor {name} has shape {list(source.shape(name))} but config.json "
                               f"implies {list(shape)}; the checkpoint does not match its config")


def module_assignments(spec: ModelSpec) -> Iterator[tuple[str, tuple[tuple[str, ...], ...], bool]]:
    """(Qwen3Decoder parameter, HF tensor names, stacked) for every parameter.

    Plain parameters take one tensor: ((name,),). Stacked expert parameters take one row of names per
    expert, concatenated along dim 0: gate then up for gate_up_proj [E, 2I, H] (transformers 5
    Qwen3MoeExperts layout), down for down_proj [E, H, I].
    """
    for name in expected_tensors(spec):
        if ".mlp.experts." not in name:
            yield name, ((name,),), False
    for li in spec.moe_layers:
        p = f"model.layers.{li}.mlp.experts."
        ex = range(spec.num_experts)
        yield p + "gate_up_proj", tuple((f"{p}{e}.gate_proj.weight", f"{p}{e}.up_proj.weight") for e in ex), True
        yield p + "down_proj", tuple((f"{p}{e}.down_proj.weight",) for e in ex), True


@torch.no_grad()
def load_into(module: torch.nn.Module, spec: ModelSpec, source: WeightSource, dtype: torch.dtype) -> None:
    """Copy every tensor from `source` into `module` (a Qwen3Decoder), converting to `dtype`."""
    check_names(spec, source)
    params = dict(module.named_parameters(remove_duplicate=False))
    for pname, rows, stacked in module_assignments(spec):
        dst = params[pname]
        if not stacked:
            dst.copy_(source.get(rows[0][0]).to(dtype))
            continue
        for e, names in enumerate(rows):  # one expert at a time keeps peak memory at one expert
            dst[e].copy_(torch.cat([source.get(n).to(dtype) for n in names], 0))


def save_hf_checkpoint(spec: ModelSpec, source: WeightSource, folder: str | Path, dtype: torch.dtype = torch.float32,
                       max_shard_bytes: int | None = None) -> Path:
    """Write `source` as a Hugging Face folder (config.json + safetensors, sharded with an index when
    max_shard_bytes is given), one shard in memory at a time. Used to hand a preset's random weights to
    other tools (transformers, benchmarks) bit for bit."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps({**spec.to_hf_config(), "torch_dtype": torch_dtype}, indent=2))
    shapes = expected_tensors(spec)
    shards: list[list[str]] = [[]]
    size = 0
    for n in sorted(shapes):
        nbytes = torch.Size(shapes[n]).numel() * dtype.itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    if len(shards) == 1:
        save_file({n: source.get(n).to(dtype).contiguous() for n in shards[0]}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: source.get(n).to(dtype).contiguous() for n in group}, str(folder / fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                    indent=2))
    return folder
