"""ModelSpec: the validated shape of a Qwen3 model, from a Hugging Face config.json or a preset.

First stage of the pipeline (load): every later stage takes a ModelSpec and never re-reads config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from qwen3export.graphs.rope import QWEN3_NATIVE_CONTEXT, normalise_rope_scaling, scaled_max_positions

from . import tokens
from .errors import ConfigError

MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and hyper-parameters of a Qwen3 dense or MoE decoder.

    Field names follow Hugging Face's Qwen3Config / Qwen3MoeConfig. `num_experts == 0` means dense.
    """

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # None (plain RoPE) or {"rope_type": "yarn"|"linear", "factor": …, …} (graphs/rope.py)
    rope_scaling: dict[str, Any] | None = None
    # MoE (model_type "qwen3_moe"); zeros for dense models
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # token ids (Qwen3 tokenizer; see tokens.py)
    bos_token_id: int | None = tokens.ENDOFTEXT
    eos_token_ids: tuple[int, ...] = tokens.STOP_IDS
    think_token_id: int | None = tokens.THINK  # None: the vocabulary has no thinking tokens
    end_think_token_id: int | None = tokens.END_THINK

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived facts
    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe" and self.num_experts > 0

    def layer_is_moe(self, idx: int) -> bool:
        """transformers Qwen3MoeDecoderLayer: sparse iff not in mlp_only_layers and (idx+1) % step == 0."""
        return (
            self.is_moe
            and idx not in self.mlp_only_layers
            and (idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.layer_is_moe(i))

    @property
    def max_positions(self) -> int:
        """Longest sequence (prompt + generated) the model serves, with RoPE scaling applied."""
        return scaled_max_positions(self.max_position_embeddings, self.rope_scaling)

    def param_count(self) -> int:
        """Number of parameters (embedding and lm_head counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2) + 2 * d + h
        if self.attention_bias:
            attn += d * (self.num_attention_heads + 2 * self.num_key_value_heads) + h
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for i in range(self.num_hidden_layers):
            if self.layer_is_moe(i):
                mlp = self.num_experts * h + self.num_experts * 3 * h * self.moe_intermediate_size
            else:
                mlp = 3 * h * self.intermediate_size
            total += attn + mlp + h
        return total

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, fld: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{fld}' {why} (model '{self.name}')")

        need(self.model_type in MODEL_TYPES, "model_type",
             f"is {self.model_type!r}; qwen3export handles {', '.join(MODEL_TYPES)}")
        for fld in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, fld)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, fld,
                 f"must be a positive integer, got {v!r}")
            need(v <= LIMITS[fld], fld, f"is {v:,}, above {LIMITS[fld]:,} (no Qwen3 model has that)")
        for v in (*self.eos_token_ids, self.bos_token_id, self.think_token_id, self.end_think_token_id):
            need(v is None or (isinstance(v, int) and not isinstance(v, bool)), "eos_token_id",
                 f"holds {v!r}, which is not a token id")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads}) for grouped-query attention")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embedding, got {self.head_dim}")
        need(isinstance(self.rms_norm_eps, float) and 0 < self.rms_norm_eps < 1, "rms_norm_eps",
             f"must be a float in (0, 1), got {self.rms_norm_eps!r}")
        need(isinstance(self.rope_theta, float) and self.rope_theta > 0, "rope_theta",
             f"must be a positive number, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            need(normalise_rope_scaling(self.rope_scaling, QWEN3_NATIVE_CONTEXT) == self.rope_scaling,
                 "rope_scaling", "must be a normalised dict (use graphs.rope.normalise_rope_scaling)")
        has_dense = any(not self.layer_is_moe(i) for i in range(self.num_hidden_layers))
        if self.model_type == "qwen3" or has_dense:
            need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0,
                 "intermediate_size", f"must be a positive integer, got {self.intermediate_size!r}")
        if self.model_type == "qwen3_moe":
            need(isinstance(self.num_experts, int) and self.num_experts > 0, "num_experts",
                 f"must be a positive integer for qwen3_moe, got {self.num_experts!r}")
            need(isinstance(self.num_experts_per_tok, int) and self.num_experts_per_tok > 0,
                 "num_experts_per_tok", f"must be a positive integer, got {self.num_experts_per_tok!r}")
            need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"({self.num_experts_per_tok}) must not exceed num_experts ({self.num_experts})")
            need(isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                 "moe_intermediate_size", f"must be a positive integer, got {self.moe_intermediate_size!r}")
            need(isinstance(self.decoder_sparse_step, int) and self.decoder_sparse_step > 0,
                 "decoder_sparse_step", f"must be a positive integer, got {self.decoder_sparse_step!r}")
            bad = [i for i in self.mlp_only_layers
                   if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            need(not bad, "mlp_only_layers",
                 f"has layer indices {bad} outside 0..{self.num_hidden_layers - 1}")
        else:
            need(self.num_experts == 0, "num_experts", "must be 0 for a dense qwen3 model")
        for fld in ("bos_token_id", "think_token_id", "end_think_token_id"):
            v = getattr(self, fld)
            need(v is None or 0 <= v < self.vocab_size, fld,
                 f"({v}) must be a token id below vocab_size ({self.vocab_size})")
        for v in self.eos_token_ids:
            need(0 <= v < self.vocab_size, "eos_token_id",
                 f"({v}) must be a token id below vocab_size ({self.vocab_size})")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if not isinstance(d, dict):
            raise ConfigError("model spec is not a JSON object; rebuild the artifact")
        d = dict(d)
        try:
            d["mlp_only_layers"] = tuple(d.get("mlp_only_layers", ()))
            d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = set(d) - names
            if unknown:
                raise ConfigError(f"model spec has unknown fields {sorted(unknown)}; rebuild the artifact")
            return cls(**d)
        except (TypeError, ValueError) as e:  # a field of the wrong JSON type or a missing one
            raise ConfigError(f"model spec is malformed ({str(e)[:80]}); rebuild the artifact") from None

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face config.json dict describing this model (used to write test checkpoints)."""
        cfg: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if self.model_type == "qwen3_moe":
            cfg.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size,
                       norm_topk_prob=self.norm_topk_prob,
                       decoder_sparse_step=self.decoder_sparse_step,
                       mlp_only_layers=list(self.mlp_only_layers))
        return cfg


def _field(cfg: dict[str, Any], key: str, default: Any = ..., *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise ConfigError(f"config.json is missing required field '{key}'")
    return default


def spec_from_hf_config(cfg: dict[str, Any], name: str = "model",
                        think_ids: tuple[int | None, int | None] | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed Hugging Face config.json (Qwen3Config / Qwen3MoeConfig).

    `think_ids` are the ids of `<think>`/`</think>` read from the folder's tokenizer.json; without one,
    Qwen3's ids (151667/151668) are assumed when the vocabulary is large enough to hold them.
    """
    check_config_types(cfg)
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config field 'model_type' is {model_type!r}; qwen3export handles "
                          f"{', '.join(MODEL_TYPES)} (Qwen3 dense and Qwen3-MoE checkpoints)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config field 'hidden_act' is {act!r}; Qwen3 uses 'silu'")
    if cfg.get("use_sliding_window"):
        raise ConfigError("config field 'use_sliding_window' is true; sliding-window attention is not "
                          "supported (released Qwen3 checkpoints set it false)")
    if cfg.get("quantization_config"):
        qm = cfg["quantization_config"].get("quant_method", "?") if isinstance(
            cfg["quantization_config"], dict) else "?"
        raise ConfigError(f"config.json has quantization_config (quant_method {qm!r}); pre-quantized "
                          "checkpoints are not supported yet: use the bf16/fp16 checkpoint")
    # transformers 5 nests rope_theta and the scaling in rope_parameters; released checkpoints keep
    # rope_theta top-level and add "rope_scaling" for YaRN (Qwen3 model cards, "Processing Long Texts")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError("config field 'rope_parameters' must be an object")
    rope_theta = _field(cfg, "rope_theta", rope.get("rope_theta", 1_000_000.0))
    raw_scaling = cfg.get("rope_scaling")
    if raw_scaling is None and rope.get("rope_type", "default") != "default":
        raw_scaling = rope
    rope_scaling = normalise_rope_scaling(raw_scaling, QWEN3_NATIVE_CONTEXT)
    hidden = _field(cfg, "hidden_size")
    heads = _field(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim")
    if head_dim is None:  # transformers' fallback when the field is absent
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            raise ConfigError("config.json lacks 'head_dim' and hidden_size/num_attention_heads are invalid")
        head_dim = hidden // heads
    if think_ids is None:
        vocab = cfg.get("vocab_size")
        fits = isinstance(vocab, int) and vocab > tokens.END_THINK
        think_ids = (tokens.THINK, tokens.END_THINK) if fits else (None, None)
    eos = cfg.get("eos_token_id", list(tokens.STOP_IDS))
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    try:
        kwargs: dict[str, Any] = dict(
            name=name,
            model_type=model_type,
            vocab_size=_field(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_field(cfg, "intermediate_size", 0),
            num_hidden_layers=_field(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_field(cfg, "num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=float(_field(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=_field(cfg, "max_position_embeddings", 40960),
            tie_word_embeddings=bool(_field(cfg, "tie_word_embeddings", False)),
            attention_bias=bool(_field(cfg, "attention_bias", False)),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            think_token_id=think_ids[0],
            end_think_token_id=think_ids[1],
        )
        if model_type == "qwen3_moe":
            kwargs.update(
                num_experts=_field(cfg, "num_experts", ..., "num_local_experts"),
                num_experts_per_tok=_field(cfg, "num_experts_per_tok"),
                moe_intermediate_size=_field(cfg, "moe_intermediate_size"),
                # transformers' default is False; released MoE checkpoints say true: always read it
                norm_topk_prob=bool(_field(cfg, "norm_topk_prob", False)),
                decoder_sparse_step=_field(cfg, "decoder_sparse_step", 1),
                mlp_only_layers=tuple(_field(cfg, "mlp_only_layers", [])),
            )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a field of the wrong type: {e}") from None
    return ModelSpec(**kwargs)


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: point --model at a Hugging Face Qwen3 folder or a preset name")
    try:
        if path.stat().st_size > 16 << 20:
            raise ConfigError(f"{path} is {path.stat().st_size:,} bytes, not a model config; restore the checkpoint's "
                              "config.json")
        cfg = json.loads(path.read_bytes())
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not valid JSON ({str(e)[:80]}); restore the checkpoint's config.json") from None
    check_config_types(cfg, path)
    return cfg


# JSON types of the config.json fields qwen3export reads (Qwen3Config / Qwen3MoeConfig), checked before any use:
# a field of the wrong type is one line naming it, never a TypeError deep in the build
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts", "num_local_experts",
               "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "bos_token_id")
_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "norm_topk_prob", "use_sliding_window")
_OBJECT_FIELDS = ("rope_scaling", "rope_parameters", "quantization_config")
# sizes past these are no Qwen3 (the largest has vocab 151,936, hidden 8,192, 94 layers, 128 experts): refused
# before anything is planned or allocated
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
          "max_position_embeddings": 1 << 24, "num_experts": 4096, "num_local_experts": 4096,
          "num_experts_per_tok": 4096, "moe_intermediate_size": 1 << 18}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config_types(cfg: Any, path: Path | str = "config.json") -> None:
    """config.json's top-level JSON types and sizes, before any field is used (ConfigError naming the field)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object, not a JSON {type(cfg).__name__}; restore the "
                          "checkpoint's config.json")

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"config field '{key}' must be {want}, got {json.dumps(cfg[key])[:60]} ({path})")

    for key in _INT_FIELDS:
        if cfg.get(key) is not None and not _is_int(cfg[key]):
            raise bad(key, "an integer")
    for key in _NUMBER_FIELDS:
        if cfg.get(key) is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))):
            raise bad(key, "a number")
    for key in _BOOL_FIELDS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    for key in _OBJECT_FIELDS:
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise bad(key, "a JSON object")
    for key in ("model_type", "hidden_act"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise bad(key, "a string")
    eos = cfg.get("eos_token_id")
    if eos is not None and not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(v) for v in eos))):
        raise bad("eos_token_id", "a token id or a list of token ids")
    layers = cfg.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(_is_int(v) for v in layers)):
        raise bad("mlp_only_layers", "a list of layer indices")
    for key, limit in LIMITS.items():
        if _is_int(cfg.get(key)) and not 0 < cfg[key] <= limit:
            raise ConfigError(f"config field '{key}' is {cfg[key]:,}, outside 1..{limit:,} (no Qwen3 model has "
                              f"that); restore the checkpoint's config.json ({path})")


# ---------------------------------------------------------------------- presets
# Real shapes from the config.json files of the Qwen/Qwen3-* repositories on the Hugging Face Hub
# (all: vocab 151936, head_dim 128, rope_theta 1e6, max_position_embeddings 40960, rms_norm_eps 1e-6).
_QWEN3 = dict(model_type="qwen3", vocab_size=tokens.VOCAB_SIZE, head_dim=128,
              rope_theta=1_000_000.0, max_position_embeddings=40960)
_QWEN3_MOE = dict(_QWEN3, model_type="qwen3_moe", norm_topk_prob=True, decoder_sparse_step=1,
                  num_experts=128, num_experts_per_tok=8)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny presets: real vocabulary and special-token ids (thinking control is testable), tiny
    # layers. head_dim (32) != hidden/heads (16) on purpose: catches converters that assume it.
    "tiny": dict(_QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
    # layer 0 dense (mlp_only_layers), layers 1-2 MoE: both kinds of block in one graph
    "tiny-moe": dict(_QWEN3_MOE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     mlp_only_layers=(0,)),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8),
    "qwen3-30b-a3b": dict(_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, moe_intermediate_size=768),
    "qwen3-235b-a22b": dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288,
                            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                            moe_intermediate_size=1536),
}


def preset(name: str, **overrides: Any) -> ModelSpec:
    """A named preset's ModelSpec; `overrides` (e.g. num_hidden_layers=2) replace fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelSpec(name=name, **{**PRESETS[name], **overrides})


__all__ = ["ModelSpec", "PRESETS", "preset", "spec_from_hf_config", "read_config"]


def read_think_ids(folder: Path) -> tuple[int | None, int | None] | None:
    """Ids of `<think>`/`</think>` from the folder's tokenizer.json, or None when it has none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for any parse failure
        raise ConfigError(f"{path} cannot be parsed ({e}); restore the checkpoint's tokenizer.json") from None
    return tok.token_to_id("<think>"), tok.token_to_id("</think>")


def resolve_spec(model: str | Path, **overrides: Any) -> ModelSpec:
    """Only the ModelSpec (a folder's config.json, or a preset with field overrides); no weight file is opened."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        cfg = read_config(path)
        cfg.pop("quantization_config", None)  # the spec is the model's shapes; weights are not read here
        spec = spec_from_hf_config(cfg, name=path.resolve().name, think_ids=read_think_ids(path))
        return spec.replace(**overrides) if overrides else spec
    if text in PRESETS:
        return preset(text, **overrides)
    raise unknown_model(text)


def unknown_model(text: str) -> ConfigError:
    """--model names neither a Hugging Face folder nor a preset: what to say."""
    path = Path(text).expanduser()
    if path.exists():
        return ConfigError(f"{path} is not a folder: point --model at a Hugging Face Qwen3 folder (config.json + "
                           "safetensors)")
    if "/" in text or text.startswith("."):
        return ConfigError(f"model folder {text} does not exist; give an existing Hugging Face folder or a preset "
                           f"({', '.join(PRESETS)})")
    return ConfigError(f"unknown preset {text!r}; known presets: {', '.join(PRESETS)} (or give a model folder path)")
