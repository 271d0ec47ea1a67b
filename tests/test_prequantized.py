"""qwen3export/prequantized.py: AWQ (GEMM) and GPTQ checkpoints load into QuantizedWeight.

The packers and the reference dequantizers here are written independently from the published formats
(AutoAWQ WQLinear_GEMM packing with order_map [0, 2, 4, 6, 1, 3, 5, 7] and its unpacking with
AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7]; GPTQ rows of 32/bits inputs per int32, zeros stored minus one in
checkpoint_format "gptq", danieldk.eu/GPTQ-Checkpoint-Format), in numpy, not with the module's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen3export.errors import ConfigError, WeightsError
from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.prequantized import (awq_to_weight, gptq_to_weight, open_prequantized, parse_quantization_config)
from qwen3export.quant_format import dequantize, is_quantized
from qwen3export.spec import preset
from qwen3export.weights import RandomSource, check_names, expected_tensors, load_into

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def awq_pack(cols: np.ndarray) -> torch.Tensor:
    """[rows, N] 4-bit values -> int32 [rows, N/8]: word j |= value[:, 8j + order_map[i]] << 4i."""
    out = np.zeros((cols.shape[0], cols.shape[1] // 8), np.uint64)
    for j in range(out.shape[1]):
        for i in range(8):
            out[:, j] |= cols[:, 8 * j + AWQ_ORDER_MAP[i]].astype(np.uint64) << np.uint64(4 * i)
    return _int32(out)


def awq_reference(qweight, qzeros, scales, group):
    """AutoAWQ-style unpack: shift out 8 nibbles, undo the order with AWQ_REVERSE_ORDER, (q - z) * s -> W [K, N]."""
    def unpack(t):
        a = t.numpy().view(np.uint32).astype(np.int64)
        nib = np.stack([(a >> (4 * i)) & 15 for i in range(8)], -1).reshape(a.shape[0], -1)
        return nib.reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(a.shape[0], -1)
    q, z = unpack(qweight), unpack(qzeros)
    s = scales.float().numpy()
    return torch.from_numpy((q - np.repeat(z, group, 0)) * np.repeat(s, group, 0)).float()


def gptq_pack_rows(values: np.ndarray, bits: int) -> torch.Tensor:
    """[K, N] -> int32 [K*bits/32, N]: row r |= value[r*per + i] << bits*i."""
    per = 32 // bits
    out = np.zeros((values.shape[0] // per, values.shape[1]), np.uint64)
    for r in range(out.shape[0]):
        for i in range(per):
            out[r] |= values[r * per + i].astype(np.uint64) << np.uint64(bits * i)
    return _int32(out)


def gptq_pack_cols(values: np.ndarray, bits: int) -> torch.Tensor:
    return gptq_pack_rows(values.T, bits).t().contiguous()


def gptq_reference(qweight, qzeros, scales, bits, group, v1):
    per, mask = 32 // bits, 2**bits - 1
    w = qweight.numpy().view(np.uint32).astype(np.int64)
    q = np.stack([(w >> (bits * i)) & mask for i in range(per)], 1).reshape(-1, w.shape[1])  # [K, N]
    zw = qzeros.numpy().view(np.uint32).astype(np.int64)
    z = np.stack([(zw >> (bits * i)) & mask for i in range(per)], -1).reshape(zw.shape[0], -1) + (1 if v1 else 0)
    s = scales.float().numpy()
    return torch.from_numpy((q - np.repeat(z, group, 0)) * np.repeat(s, group, 0)).float()


def test_published_words():
    """One int32 word each, checked by hand: AWQ columns 0..7 holding 0..7 pack as nibbles 0,2,4,6,1,3,5,7
    (low first) = 0x75316420; GPTQ inputs 0..7 holding 1..8 pack as 0x87654321."""
    assert awq_pack(np.arange(8)[None]).numpy().view(np.uint32)[0, 0] == 0x75316420
    assert gptq_pack_rows(np.arange(1, 9)[:, None], 4).numpy().view(np.uint32)[0, 0] == 0x87654321
    # K = 2 inputs, one group of 2 (not a real AWQ group size; the representation allows it), zero 0
    qw = awq_to_weight(_int32(np.array([[0x75316420]] * 2)), _int32(np.array([[0]])), torch.ones(1, 8), 2)
    assert qw.zero_points is not None and qw.codes()[:, 0].tolist() == list(range(8))


def _random_case(k, n, bits, group, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (k, n))
    zeros = rng.integers(1, 2**bits, (k // group, n))
    scales = torch.from_numpy(rng.uniform(0.001, 0.01, (k // group, n))).half()
    return codes, zeros, scales


@pytest.mark.parametrize("k,n,group", [(64, 32, 32), (256, 72, 128), (128, 8, 128)])
def test_awq_matches_independent_reference(k, n, group):
    codes, zeros, scales = _random_case(k, n, 4, group, seed=k + n)
    qweight, qzeros = awq_pack(codes), awq_pack(zeros)
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // group, n // 8)
    qw = awq_to_weight(qweight, qzeros, scales, group)
    assert qw.mode == "int4" and qw.shape == (n, k) and qw.scales.shape == (n, k // group)
    assert np.array_equal(qw.codes().t().numpy(), codes)
    torch.testing.assert_close(dequantize(qw).t(), awq_reference(qweight, qzeros, scales, group))


@pytest.mark.parametrize("bits,v1", [(4, True), (4, False), (8, True), (8, False)])
def test_gptq_matches_independent_reference(bits, v1):
    k, n, group = 256, 48, 64
    codes, zeros, scales = _random_case(k, n, bits, group, seed=bits)
    qweight = gptq_pack_rows(codes, bits)
    qzeros = gptq_pack_cols(zeros - (1 if v1 else 0), bits)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    assert qweight.shape == (k * bits // 32, n) and qzeros.shape == (k // group, n * bits // 32)
    qw = gptq_to_weight(qweight, qzeros, scales, g_idx, bits, group, zero_offset=int(v1))
    assert qw.mode == ("int4" if bits == 4 else "int8") and qw.shape == (n, k)
    assert torch.equal(qw.zeros().long(), torch.from_numpy(zeros).t())
    torch.testing.assert_close(dequantize(qw).t(), gptq_reference(qweight, qzeros, scales, bits, group, v1))


def test_gptq_symmetric_checkpoint_drops_zero_points():
    """Symmetric 4-bit GPTQ v1 stores zero 8 - 1 = 7 in every nibble (qzeros words 0x77777777)."""
    codes, _, scales = _random_case(128, 16, 4, 128, seed=1)
    qzeros = gptq_pack_cols(np.full((1, 16), 7), 4)
    assert (qzeros.numpy().view(np.uint32) == 0x77777777).all()
    qw = gptq_to_weight(gptq_pack_rows(codes, 4), qzeros, scales, None, 4, 128, zero_offset=1)
    assert qw.zero_points is None  # the symmetric default, as our own RTN writes


def test_gptq_act_order_g_idx_is_refused():
    codes, zeros, scales = _random_case(64, 8, 4, 32, seed=2)
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)).int() // 32
    with pytest.raises(WeightsError, match="g_idx is not k // group_size"):
        gptq_to_weight(gptq_pack_rows(codes, 4), gptq_pack_cols(zeros, 4), scales, g_idx, 4, 32, 1, "m.q_proj.weight")


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "'fp8' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "desc_act=true"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "bits=8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, "group_size 0"),
])
def test_unsupported_schemes_are_named(qc, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_quantization_config(qc)
    assert "\n" not in str(err.value)


def test_supported_schemes():
    awq = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                     "version": "gemm"})
    assert (awq.method, awq.bits, awq.group_size, awq.zero_offset) == ("awq", 4, 128, 0)
    v1 = parse_quantization_config({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False,
                                    "sym": True})
    assert (v1.bits, v1.zero_offset, v1.group_for(768)) == (8, 1, 768)
    assert parse_quantization_config({"quant_method": "gptq", "bits": 4, "format": "gptq_v2"}).zero_offset == 0


def _write_checkpoint(folder, spec, qc):
    """A tiny-moe folder whose linear weights are packed per qc (random codes and zero points)."""
    scheme = parse_quantization_config(qc)
    plain = RandomSource(spec)
    tensors, references = {}, {}
    for i, (name, shape) in enumerate(expected_tensors(spec).items()):
        if not is_quantized(name):
            tensors[name] = plain.get(name)
            continue
        n, k = shape
        group = scheme.group_for(k)
        codes, zeros, scales = _random_case(k, n, scheme.bits, group, seed=i)
        base = name.removesuffix(".weight")
        if scheme.method == "awq":
            tensors.update({base + ".qweight": awq_pack(codes), base + ".qzeros": awq_pack(zeros),
                            base + ".scales": scales})
            references[name] = awq_reference(tensors[base + ".qweight"], tensors[base + ".qzeros"], scales, group).t()
        else:
            tensors.update({base + ".qweight": gptq_pack_rows(codes, scheme.bits),
                            base + ".qzeros": gptq_pack_cols(zeros - scheme.zero_offset, scheme.bits),
                            base + ".scales": scales, base + ".g_idx": torch.arange(k, dtype=torch.int32) // group})
            references[name] = gptq_reference(tensors[base + ".qweight"], tensors[base + ".qzeros"], scales,
                                              scheme.bits, group, scheme.zero_offset == 1).t()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**spec.to_hf_config(), "quantization_config": qc}))
    return references


@pytest.mark.parametrize("qc", [
    {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
    {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False},
    {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "checkpoint_format": "gptq_v2"},
], ids=["awq", "gptq4-v1", "gptq8-v2-per-channel"])
def test_checkpoint_folder_loads_into_the_decoder(tmp_path, qc):
    spec = preset("tiny-moe")
    references = _write_checkpoint(tmp_path, spec, qc)
    loaded_spec, source = open_prequantized(tmp_path)
    assert loaded_spec.replace(name=spec.name) == spec
    check_names(spec, source)  # presented under the unquantized names and shapes
    assert sorted(source.quantized_names()) == sorted(references)
    module = Qwen3Decoder.empty(spec, torch.float32)
    load_into(module, spec, source, torch.float32)
    layer = module.model.layers[1]
    torch.testing.assert_close(layer.self_attn.q_proj.weight, references["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(layer.mlp.experts.down_proj[5],
                               references["model.layers.1.mlp.experts.5.down_proj.weight"])
    assert torch.equal(layer.mlp.gate.weight, RandomSource(spec).get("model.layers.1.mlp.gate.weight"))


def test_incomplete_checkpoint_and_plain_folder(tmp_path):
    spec = preset("tiny")
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    _write_checkpoint(tmp_path, spec, qc)
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.qzeros is missing"):
        open_prequantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(spec.to_hf_config()))
    with pytest.raises(ConfigError, match="no quantization_config"):
        open_prequantized(tmp_path)
