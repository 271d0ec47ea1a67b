"""`qwen3export build --tp/--ep` end to end (qwen3export/parallel_build.py): the rank parts verified as gloo
processes against the unsharded eager model, `run` on them equal to eager driven by the torch sampling graph,
`serve` answering concurrent clients from them, `inspect` showing the ranks; a resealed part carrying a pickled
program refused by `run`, its code never run; bad input refused in one line before any work, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from qwen3export.artifact import load_artifact, seal
from qwen3export.cli import main
from qwen3export.generation import greedy_generate, sample_generate
from qwen3export.model import build_module
from qwen3export.runner import sampling_pair
from qwen3export.spec import ModelSpec
from qwen3export.weights import RandomSource

PROMPT = [11, 500, 9000, 3, 151667]  # ends inside <think>


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tp2_build_run_and_inspect(tmp_path, capsys):
    out = tmp_path / "tp2"
    code, stdout, err = cli(capsys, "build", "--model", "tiny-moe", "--tp", 2, "--artifact", out, "--json")
    assert code == 0, err
    entry = json.loads(stdout)["artifacts"][0]
    assert entry["backend"] == "torch-export" and entry["status"] == "built"  # the default backend with --tp
    p = entry["parity"]
    assert p["passed"] and p["greedy_match"] and p["greedy_tokens_matching"] == 32 and p["logits_scaled_err"] <= 1e-4
    assert p["sampling"]["identical"] and "2 processes, gloo" in p["providers"][0]
    m = load_artifact(out).manifest
    assert m["parallel"]["world"] == 2 and [r["rank"] for r in m["ranks"]] == [0, 1]
    assert all(f in m["files"] for r in m["ranks"] for f in r["files"]) and "sampling.onnx" in m["files"]
    assert "re-captured" in m["engine"]["program"] and not any(f.endswith(".pt2") for f in m["files"])  # data only

    # run: the sampling graph picks the tokens (Qwen3 thinking defaults, seeded uniforms), as for other engines
    spec = ModelSpec.from_dict(m["model"]["spec"])
    eager = build_module(spec, RandomSource(spec, 0), torch.float32)
    graph, _ = sampling_pair(load_artifact(out))
    from qwen3export.graphs.sampling import SamplingParams, initial_state

    params = SamplingParams.recommended(True, m["sampling"]["defaults"])
    want, _ = sample_generate(eager, eager.empty_cache(1), graph, PROMPT, params.to_tensors(1),
                              initial_state([PROMPT], graph.vocab), 6, np.random.default_rng(3), spec.eos_token_ids)
    code, stdout, err = cli(capsys, "run", out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 6,
                            "--seed", 3, "--json")
    assert code == 0, err
    assert json.loads(stdout)["tokens"] == want
    code, stdout, _ = cli(capsys, "run", out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 4,
                          "--greedy", "--thinking", "on", "--json")
    greedy, _, _ = greedy_generate(eager, eager.empty_cache(1), torch.tensor([PROMPT]), torch.ones(1, len(PROMPT),
                                                                                                   dtype=torch.int64), 4)
    assert code == 0 and json.loads(stdout)["tokens"] == greedy[0].tolist()

    # serve (issue 19): the rank processes behind the OpenAI endpoint, one request at a time; two clients at once
    # each get the greedy tokens of eager PyTorch
    from test_serve import Running

    s = Running(out)
    try:
        assert s.server.scheduler.max_batch == 1
        prompts = [PROMPT, PROMPT[:3]]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: s.client.completions.create(
                model="m", prompt=p, max_tokens=4, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].model_extra["token_ids"],
                prompts))
    finally:
        s.close()
    for p, tokens in zip(prompts, got):
        ids = torch.tensor([p])
        assert tokens == greedy_generate(eager, eager.empty_cache(1), ids, torch.ones_like(ids), 4)[0][0].tolist()

    code, stdout, _ = cli(capsys, "inspect", out)
    assert code == 0 and "ranks    tp 2 x ep 1 = 2 parts" in stdout and "rank 1: tp_rank 1 ep_rank 0" in stdout

    # issue 16: a pickled program dropped into a part and the manifest resealed (anyone can recompute its hash)
    hostile, marker = tmp_path / "hostile", tmp_path / "payload-ran"
    shutil.copytree(out, hostile)
    manifest = load_artifact(hostile).manifest
    with zipfile.ZipFile(hostile / "rank0" / "decoder.pt2", "w") as z:
        z.writestr("decoder/data.pkl", pickle.dumps(_Payload(marker)))
    seal(hostile, manifest)  # now lists rank0/decoder.pt2 with its true size and sha256
    code, _, err = cli(capsys, "run", hostile, "--prompt-ids", "1,2", "--max-new-tokens", 1)
    assert code == 2 and "rank0/decoder.pt2: a stored torch.export program" in err and "rebuild" in err, err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()


class _Payload:
    """Unpickling this makes the folder `marker`: the code a pickled .pt2 runs when torch.export.load reads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("argv,needle", [
    (["--tp", 3], "--tp 3 does not divide num_attention_heads (4) of tiny-moe; valid --tp: 1, 2"),
    (["--tp", 4], "--tp 4 does not divide num_key_value_heads (2) of tiny-moe"),
    (["--ep", 3], "--ep 3 does not divide num_experts (8) of tiny-moe; valid --ep: 1, 2, 4, 8"),
    (["--model", "tiny", "--ep", 2], "--ep 2 needs a mixture-of-experts model"),
    (["--tp", 2, "--backend", "onnx"], "pass --backend torch-export"),
    (["--tp", 2, "--backend", "aoti"], "hung in gloo"),
    (["--tp", 2, "--target", "h100"], "use --target cpu"),
    (["--tp", 2, "--quant", "int4"], "--tp/--ep cannot go with --quant int4"),
    (["--tp", 2, "--dtype", "bf16"], "--dtype bf16 is not supported for them"),
    (["--model", "qwen3-235b-a22b", "--tp", 4], "rank processes"),  # cannot fit this host: modelled, no weights read
])
def test_parallel_refusals_are_one_line_before_any_work(tmp_path, capsys, argv, needle):
    code, _, err = cli(capsys, "build", "--model", "tiny-moe", "--artifact", tmp_path / "art", *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
