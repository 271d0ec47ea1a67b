"""genai_config.json beside decoder.onnx: ONNX Runtime GenAI's description of the model, so that an ONNX
artifact also loads in `onnxruntime_genai.Model(ARTIFACT)` (its greedy generation then matches `run --greedy`).

The schema is the one onnxruntime_genai's model builder writes (`model`: type, token ids, context_length,
`decoder` with filename, sizes and the input/output name mapping; `search`: generation defaults). Our decoder
already uses GenAI's names (backends/onnx.py): input_ids, attention_mask, position_ids,
past_key_values.%d.key|value -> logits, present.%d.key|value, for both interfaces.
- concat cache (standard flavour): `past_present_share_buffer` false; GenAI grows the cache by copying.
- shared buffer (ort flavour, the cache updated in place): `past_present_share_buffer` true; GenAI allocates past
  and present once at [batch, Hkv, max_length, D] and binds both to it, as our CacheEngine does. The graph
  computes GroupQueryAttention's lengths from attention_mask (as GenAI's own model builder does), and its
  logits_index input, which GenAI does not feed, defaults to every position of the step: [B, S, V] logits,
  the shape GenAI 0.18 preallocates for a prompt (it refuses [B, 1, V] there).

What GenAI does not run: our sampling graph (sampling.onnx: thinking on/off, budget and the forced early stop,
presence/repetition penalties, min_p) -- GenAI samples with its own search.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen3export import tokens
from qwen3export.spec import ModelSpec

GENAI_CONFIG_FILE = "genai_config.json"
SHARED_BUFFER = "shared_buffer"  # backends/onnx.py SHARED_BUFFER (the engine entry's kv_cache)


def genai_config(spec: ModelSpec, engine: dict[str, Any], max_seq: int) -> dict[str, Any]:
    """The genai_config.json document for an ONNX engine entry (backends/onnx.py emit_decoder's record)."""
    names = set(engine["inputs"])
    inputs: dict[str, str] = {"input_ids": "input_ids"}
    for key in ("attention_mask", "position_ids"):
        if key in names:
            inputs[key] = key
    inputs["past_key_names"], inputs["past_value_names"] = "past_key_values.%d.key", "past_key_values.%d.value"
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    eos = list(spec.eos_token_ids)
    pad = tokens.ENDOFTEXT if spec.vocab_size == tokens.VOCAB_SIZE else eos[0]
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else pad,
            "context_length": max_seq,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": engine["file"],
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": spec.num_attention_heads,
                "num_hidden_layers": spec.num_hidden_layers,
                "num_key_value_heads": spec.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "type": "qwen3",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": max_seq, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": engine.get("kv_cache") == SHARED_BUFFER,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(spec: ModelSpec, engine: dict[str, Any], folder: Path, max_seq: int) -> dict[str, Any]:
    """Write genai_config.json into `folder` and name it in the engine entry (returned)."""
    (folder / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(spec, engine, max_seq), indent=2))
    engine["genai_config"] = GENAI_CONFIG_FILE
    return engine
