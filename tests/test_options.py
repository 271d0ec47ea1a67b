"""options.py: every refused flag combination, table-driven (issue 17). Each row of REFUSALS / MODEL_REFUSALS has
an example here that it, and no row before it, refuses; a new row without an example fails the coverage test.
plan_build is run for real (preset models, no weights read): the example must raise that row's own message."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen3export.errors import Qwen3ExportError
from qwen3export.options import MODEL_REFUSALS, REFUSALS, BuildOptions, plan_build
from qwen3export.targets import get_target

# row name -> (flags for BuildOptions.of, a fragment the message must hold)
EXAMPLES: dict[str, tuple[dict, str]] = {
    "no backend": ({"backends": ()}, "no backend given"),
    "a backend twice": ({"backends": ("onnx", "onnx")}, "more than once"),
    "torch-export without --tp/--ep": ({"backends": ("torch-export",)}, "per-rank program"),
    "an unknown backend": ({"backends": ("coreml",)}, "unknown backend 'coreml'"),
    "--artifact with several backends": ({"target": "a100", "backends": ("onnx", "kernels"), "artifact": "a"},
                                         "--artifact names one artifact folder"),
    "--artifact with --out": ({"artifact": "a", "out": "o"}, "not both"),
    "--no-verify on an in-memory build": ({"verify": False}, "--no-verify applies to --stream"),
    "--group-size without --quant int4": ({"quant": "int8", "group_size": 64}, "--group-size applies to --quant int4"),
    "--stream with --quant": ({"stream": True, "quant": "int4"}, "--stream cannot go with --quant int4"),
    "--stream with --tp/--ep": ({"stream": True, "tp": 2, "backends": ("onnx",)}, "--stream cannot go with --tp"),
    "--stream with a backend other than onnx": ({"stream": True, "backends": ("aoti",)}, "emits the onnx backend only"),
    "--tp/--ep with another backend": ({"tp": 2, "backends": ("onnx",)}, "no collective ops"),
    "--tp/--ep with --quant": ({"tp": 2, "backends": ("torch-export",), "quant": "int8"},
                               "--tp/--ep cannot go with --quant int8"),
    "--tp/--ep with --dtype other than fp32": ({"tp": 2, "backends": ("torch-export",), "dtype": "fp16"},
                                               "verified here in fp32"),
    "--tp/--ep on a GPU target": ({"tp": 2, "backends": ("torch-export",), "target": "h100"}, "use --target cpu"),
    "--tp/--ep with --onnx-ops": ({"tp": 2, "backends": ("torch-export",), "onnx_ops": "ort"},
                                  "--onnx-ops applies to ONNX engines"),
    "an unknown --onnx-ops": ({"onnx_ops": "fancy"}, "unknown --onnx-ops 'fancy'"),
    "--onnx-ops ort with tensorrt": ({"target": "a100", "backends": ("tensorrt",), "onnx_ops": "ort"},
                                     "TensorRT's ONNX parser takes standard"),
    "a backend the target does not offer": ({"backends": ("kernels",)}, "is not available for target cpu"),
    "aoti for a GPU target without a GPU here": ({"target": "a100", "backends": ("aoti",)}, "needs a CUDA GPU"),
    "a dtype the target cannot run": ({"dtype": "bf16"}, "target cpu cannot run dtype bf16"),
    "--quantize-lm-head without --quant": ({"quantize_lm_head": True}, "--quantize-lm-head needs --quant"),
    "an unknown --quant": ({"quant": "int3"}, "unknown --quant 'int3'"),
    "an unknown --int4-accuracy": ({"quant": "int4", "int4_accuracy": 2}, "unknown --int4-accuracy 2"),
    "--int4-accuracy without --quant int4": ({"quant": "int8", "int4_accuracy": 4},
                                             "not --quant int8; drop --int4-accuracy"),
    "--int4-accuracy 4 on a GPU target": ({"target": "a100", "quant": "int4", "int4_accuracy": 4},
                                          "CUDA MatMulNBits ignores accuracy_level"),
    "--quant fp8 before sm_89": ({"model": "tiny", "target": "a100", "quant": "fp8"}, "fp8 e4m3 needs sm_89"),
    "--quant with aoti": ({"backends": ("aoti",), "quant": "int8"}, "cannot take a quantized model"),
    "--dtype bf16 with onnx": ({"target": "a100", "dtype": "bf16"}, "--dtype bf16 cannot go with --backend onnx"),
    "--dtype fp16 with --onnx-ops ort": ({"target": "a100", "dtype": "fp16", "onnx_ops": "ort"},
                                         "--dtype fp16 cannot go with --onnx-ops ort"),
    "--dtype fp16/bf16 with --quant": ({"target": "a100", "dtype": "fp16", "quant": "int8"},
                                       "--dtype fp16 cannot go with --quant int8"),
    "a streamed fp16/bf16 engine with verification": ({"target": "h100", "dtype": "bf16", "stream": True},
                                                      "pass --no-verify"),
}
MODEL_EXAMPLES: dict[str, tuple[dict, str]] = {
    "--quant fp8 on a MoE model": ({"model": "tiny-moe", "quant": "fp8"}, "--quant fp8 covers dense models only"),
    "--int4-accuracy 4 with --onnx-ops standard on a MoE model": (
        {"model": "tiny-moe", "quant": "int4", "int4_accuracy": 4, "onnx_ops": "standard"},
        "use --onnx-ops ort (QMoE at level 4) or --int4-accuracy 0"),
}


def _refusal(flags: dict) -> str:
    with pytest.raises(Qwen3ExportError) as e:
        plan_build(BuildOptions.of(**{"model": "tiny", **flags}))
    return str(e.value)


# rows that no example on this machine reaches first: checked on their own predicate and message
ALONE = {
    # no CPU target offers tensorrt/kernels, so "a backend the target does not offer" always fires first
    "tensorrt or kernels on a CPU target": ("cpu", {"backends": ("kernels",)}, "needs an NVIDIA GPU target"),
    # a GPU target's aoti needs a CUDA GPU at build time, and a CPU target cannot run fp16
    "--dtype fp16/bf16 with aoti": ("a100", {"dtype": "fp16", "backends": ("aoti",)}, "cannot go with --backend aoti"),
}


@pytest.mark.parametrize("row", [r.flags for r in REFUSALS])
def test_each_refusal_row_fires_on_its_example(row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs under ./dist: never the checkout's
    rule = next(r for r in REFUSALS if r.flags == row)
    if row in ALONE:
        target, flags, needle = ALONE[row]
        options = BuildOptions.of(model="tiny", **flags)
        assert rule.when(options, get_target(target)) and needle in rule.message(options, get_target(target))
        return
    flags, needle = EXAMPLES[row]
    message = _refusal(flags)
    assert needle in message, message
    options = BuildOptions.of(**{"model": "tiny", **flags})
    first = next(r for r in REFUSALS if r.when(options, get_target(flags.get("target", "cpu"))))
    assert first.flags == row, f"{row!r}'s example is refused first by {first.flags!r}"


@pytest.mark.parametrize("row", [r.flags for r in MODEL_REFUSALS if r.flags in MODEL_EXAMPLES])
def test_each_model_refusal_row_fires_on_its_example(row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags, needle = MODEL_EXAMPLES[row]
    assert needle in _refusal(flags)


def test_every_row_has_an_example():
    """A refusal added to the table without a test example fails here (pre-quantized rows are exercised with
    real AWQ/GPTQ folders in tests/test_quant_build.py and tests/test_prequantized.py)."""
    prequantized = {r.flags for r in MODEL_REFUSALS if "pre-quantized" in r.flags or "checkpoint" in r.flags}
    assert {r.flags for r in REFUSALS} == set(EXAMPLES) | set(ALONE)
    assert {r.flags for r in MODEL_REFUSALS} - prequantized == set(MODEL_EXAMPLES)


def test_a_plan_holds_what_the_stages_need(tmp_path, monkeypatch):
    """What plan_build decides: variant, outputs (folder, ONNX flavour per backend), serving limits, quant."""
    monkeypatch.chdir(tmp_path)
    plan = plan_build(BuildOptions.of(model="tiny", target="a100", backends=("onnx", "tensorrt", "kernels"),
                                      quant="int4", group_size=32, max_batch=3, max_seq=40, out="o"))
    assert plan.variant == "in-memory" and plan.quant.group_size == 32 and plan.quant.mode == "int4"
    assert [(o.backend, o.folder, o.onnx_flavour) for o in plan.outputs] == [
        ("onnx", Path("o/tiny-a100-onnx"), "standard"), ("tensorrt", Path("o/tiny-a100-tensorrt"), "standard"),
        ("kernels", Path("o/tiny-a100-kernels"), None)]
    assert (plan.serving["max_batch"], plan.serving["max_seq"]) == (3, 40)
    sharded = plan_build(BuildOptions.of(model="tiny-moe", tp=2, backends=("torch-export",), artifact="p"))
    assert sharded.variant == "sharded" and sharded.outputs[0].folder == Path("p") and sharded.serving["ranks"] == 2
    streamed = plan_build(BuildOptions.of(model="tiny", stream=True))
    assert streamed.variant == "streamed" and streamed.outputs[0].folder == Path("dist/tiny-cpu-onnx")
    assert not Path("o").exists() and not Path("dist").exists()  # planning writes nothing


@pytest.mark.parametrize("target, flags, want", [
    ("cpu", {"quant": "int4"}, (4, True)),  # lm_head quantized and int8 activations (level 4), as the peer's CPU int4
    ("cpu", {"quant": "int4", "int4_accuracy": 4}, (4, True)),
    ("cpu", {"quant": "int4", "int4_accuracy": 0, "quantize_lm_head": False}, (0, False)),
    ("cpu", {"quant": "int4", "onnx_ops": "standard"}, (0, True)),  # its dequantized experts run fp32
    ("cpu", {"quant": "int4", "onnx_ops": "standard", "int4_accuracy": 4}, (4, True)),  # a dense model may ask
    ("a100", {"quant": "int4"}, (0, True)),  # CUDA MatMulNBits ignores accuracy_level: GPU targets build at 0
    ("a100", {"quant": "int4", "int4_accuracy": 0}, (0, True)),
    ("cpu", {"quant": "int8"}, (0, False)),  # int8 / fp8 keep fp activations and an fp lm_head unless asked
    ("cpu", {"quant": "int8", "quantize_lm_head": True}, (0, True)),
])
def test_int4_accuracy_and_lm_head_defaults(target, flags, want, tmp_path, monkeypatch):
    """The accuracy level and lm_head decision the plan hands to the stages (QuantConfig), per target and flags,
    and what the manifest's quantization section then records (QuantConfig.to_dict)."""
    monkeypatch.chdir(tmp_path)
    plan = plan_build(BuildOptions.of(model="tiny", target=target, **flags))
    assert (plan.quant.accuracy_level, plan.quant.quantize_lm_head) == want
    record = plan.quant.to_dict()
    assert (record["accuracy_level"], record["quantize_lm_head"]) == want
