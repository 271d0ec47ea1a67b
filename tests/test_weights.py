"""Weight loading from safetensors folders: sharding, tying, dtype conversion, and every failure named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qwen3export
from qwen3export.parity import logits_errors
from qwen3export.errors import ConfigError, WeightsError
from qwen3export.generation import left_pad, position_ids_from_mask
from qwen3export.spec import preset
from qwen3export.weights import RandomSource, save_hf_checkpoint

SMALL = dict(vocab_size=512, think_token_id=None, end_think_token_id=None, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    spec = preset("tiny-moe").replace(**SMALL)
    return save_hf_checkpoint(spec, RandomSource(spec, seed=3), tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    spec = preset("tiny-moe").replace(**SMALL)
    return save_hf_checkpoint(spec, RandomSource(spec, seed=3), tmp_path_factory.mktemp("sharded"),
                              max_shard_bytes=200_000)


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_sharded_equals_single_file(moe_folder, sharded_folder):
    assert len(list(sharded_folder.glob("*.safetensors"))) > 2
    a = qwen3export.load_model(moe_folder)
    b = qwen3export.load_model(sharded_folder)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_preset_weights_are_deterministic_and_named_like_transformers(tmp_path):
    """A preset's random weights written as a HF folder load into transformers with identical logits."""
    spec = preset("tiny")
    folder = save_hf_checkpoint(spec, RandomSource(spec, seed=7), tmp_path / "tiny")
    hf = transformers.Qwen3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ours = qwen3export.load_model("tiny", seed=7)
    assert torch.equal(ours.model.embed_tokens.weight, qwen3export.load_model("tiny", seed=7).model.embed_tokens.weight)
    assert not torch.equal(ours.model.embed_tokens.weight, qwen3export.load_model("tiny", seed=8).model.embed_tokens.weight)
    ids, mask = left_pad([[151667, 5, 9, 100000], [3, 4]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got, _ = ours(ids, position_ids_from_mask(mask), mask, ours.empty_cache(2))
    # trained statistics: logits ~20, so fp32 op-order differences are gated relative to each row's scale
    assert logits_errors(got[mask.bool()], ref[mask.bool()])["scaled"] <= 2e-6


def test_tied_embeddings_share_storage_and_ignore_stored_lm_head(tmp_path):
    spec = preset("tiny").replace(**SMALL)
    folder = save_hf_checkpoint(spec, RandomSource(spec), tmp_path / "tied")
    t = load_file(folder / "model.safetensors")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone() * 0  # some tied checkpoints store it
    save_file(t, folder / "model.safetensors")
    m = qwen3export.load_model(folder)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.lm_head.weight.abs().sum() > 0


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_conversion(moe_folder, dtype, torch_dtype):
    ref = qwen3export.load_model(moe_folder)
    m = qwen3export.load_model(moe_folder, dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {torch_dtype}
    assert m.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as in transformers
    w = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(m.state_dict()[w], ref.state_dict()[w].to(torch_dtype))


def _rewrite(folder, fn):
    path = folder / "model.safetensors"
    t = load_file(path)
    fn(t)
    save_file(t, path)


def test_missing_tensor_is_named(moe_folder, tmp_path):
    f = _copy(moe_folder, tmp_path)
    _rewrite(f, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight.*missing"):
        qwen3export.load_model(f)


def test_unexpected_tensor_is_named(moe_folder, tmp_path):
    f = _copy(moe_folder, tmp_path)
    _rewrite(f, lambda t: t.__setitem__("model.layers.0.mlp.experts.0.up_proj.weight", torch.zeros(4, 4)))
    with pytest.raises(WeightsError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.0\.up_proj"):
        qwen3export.load_model(f)


def test_misshaped_tensor_is_named(moe_folder, tmp_path):
    f = _copy(moe_folder, tmp_path)
    _rewrite(f, lambda t: t.__setitem__("model.layers.1.self_attn.k_norm.weight", torch.ones(16)))
    with pytest.raises(WeightsError, match=r"k_norm\.weight has shape \[16\].*\[32\]"):
        qwen3export.load_model(f)


def test_truncated_shard_is_named(sharded_folder, tmp_path):
    f = _copy(sharded_folder, tmp_path)
    shard = sorted(f.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=shard.name):
        qwen3export.load_model(f)


def test_shard_missing_from_folder_is_named(sharded_folder, tmp_path):
    f = _copy(sharded_folder, tmp_path)
    shard = sorted(f.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"shard {shard.name} named in model.safetensors.index.json is missing"):
        qwen3export.load_model(f)


def test_index_pointing_to_wrong_shard(sharded_folder, tmp_path):
    f = _copy(sharded_folder, tmp_path)
    idx = json.loads((f / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    name = next(k for k, v in idx["weight_map"].items() if v == shards[0])
    idx["weight_map"][name] = shards[1]
    (f / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        qwen3export.load_model(f)


def test_pickle_checkpoints_are_refused(moe_folder, tmp_path):
    f = _copy(moe_folder, tmp_path)
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(b"\x80\x02not loaded")
    with pytest.raises(WeightsError, match="pickle checkpoints are never loaded"):
        qwen3export.load_model(f)


def test_missing_or_malformed_config(moe_folder, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        qwen3export.load_model(tmp_path / "nowhere")
    f = _copy(moe_folder, tmp_path)
    (f / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        qwen3export.load_model(f)
