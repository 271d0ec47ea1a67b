"""Parallel artifacts: a tp x ep decoder as one part per rank (its weight shard as safetensors and its
weight-free torch.export program holding the collectives) plus a manifest describing the ranks; and the
runner that loads the N parts in N gloo processes and generates.

Layout: `<out>/manifest.json`, `<out>/rank<r>/weights.safetensors`, `<out>/rank<r>/decoder.pt2`. Each
program is captured on the meta device (graphs/parallel.py meta_rank_decoder), so the build holds one
rank's shard at a time and never a whole model; the runner binds the shard to the program when it loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwen3export.graphs.parallel import (TP_GROUP, WORLD_GROUP, RankLayout, capture_rank, layouts, meta_rank_decoder,
                                         rank_tensors)

from .artifact import Artifact, default_manifest, load_artifact, seal, staging
from .errors import ArtifactError
from .spec import ModelSpec
from .weights import dtype_name, parse_dtype

BACKEND = "torch-export"
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "decoder.pt2"


def part_folder(rank: int) -> str:
    return f"rank{rank}"


def write_parallel_artifact(out: str | Path, spec: ModelSpec, source: Any, tp: int, ep: int, *,
                            dtype: torch.dtype = torch.float32, model_ref: dict[str, Any] | None = None,
                            force: bool = False) -> Artifact:
    """Shard, capture and write every rank's part; the degrees are checked before anything is written."""
    from safetensors.torch import save_file

    ranks = layouts(spec, tp, ep)  # one-line InputError for a bad degree, before any work
    with staging(Path(out), force) as tmp:
        entries = []
        for layout in ranks:
            part = tmp / part_folder(layout.rank)
            part.mkdir()
            save_file({n: t.contiguous() for n, t in rank_tensors(spec, source, layout, dtype)},
                      str(part / WEIGHTS_FILE), metadata={"format": "pt"})
            program = capture_rank(meta_rank_decoder(spec, layout, dtype))
            program.example_inputs = None  # meta tensors: nothing to keep
            torch.export.save(program, str(part / PROGRAM_FILE))
            entries.append({**layout.to_dict(spec),
                            "files": [f"{part_folder(layout.rank)}/{f}" for f in (WEIGHTS_FILE, PROGRAM_FILE)]})
        manifest = default_manifest(
            model={"spec": spec.to_dict(), "ref": model_ref}, backend=BACKEND, dtype=dtype_name(dtype),
            parallel={"tp": tp, "ep": ep, "world": tp * ep, "rank_order": "rank = ep_rank * tp + tp_rank",
                      "collectives": "torch.distributed functional collectives (_c10d_functional all_reduce, "
                                     "all_gather_into_tensor): gloo on CPU, NCCL on CUDA",
                      "groups": {TP_GROUP: "the rank's tp ranks (same ep_rank)", WORLD_GROUP: "all ranks"}},
            ranks=entries)
        seal(tmp, manifest)
    return load_artifact(out)


def load_rank_program(artifact: Artifact, rank: int, device: str | torch.device = "cpu"):
    """The rank's program with its shard bound, on `device`: (callable with the decoder's signature,
    empty_cache). The program was captured on meta: its weights, its RoPE constant and the device of the
    tensors it creates are all bound here (torch.export.passes.move_to_device_pass)."""
    from safetensors.torch import load_file
    from torch.export.passes import move_to_device_pass

    from qwen3export.graphs.rope import rope_parameters

    m = artifact.manifest
    spec, dtype = ModelSpec.from_dict(m["model"]["spec"]), parse_dtype(m["dtype"])
    part = artifact.path / part_folder(rank)
    program = torch.export.load(str(part / PROGRAM_FILE))
    tensors = load_file(str(part / WEIGHTS_FILE))
    if spec.tie_word_embeddings and "lm_head.weight" in program.state_dict:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # one tensor, both names: still tied
    if set(tensors) != set(program.state_dict):
        raise ArtifactError(f"{part_folder(rank)}/{WEIGHTS_FILE} and {PROGRAM_FILE} name different tensors "
                            f"({sorted(set(tensors) ^ set(program.state_dict))[:3]}); rebuild the artifact")
    params: dict[int, torch.nn.Parameter] = {}
    for name in program.state_dict:
        t = tensors[name]
        program.state_dict[name] = params.setdefault(id(t), torch.nn.Parameter(t, requires_grad=False))
    unknown = set(program.constants) - {"inv_freq"}
    if unknown:
        raise ArtifactError(f"{part_folder(rank)}/{PROGRAM_FILE} has constants {sorted(unknown)} this runner "
                            "cannot bind; rebuild the artifact")
    program.constants["inv_freq"] = rope_parameters(spec.head_dim, spec.rope_theta, spec.rope_scaling)[0]  # fp32
    module = move_to_device_pass(program, device).module()
    layout = RankLayout(m["parallel"]["tp"], m["parallel"]["ep"], rank)
    k0, k1 = layout.kv_heads(spec)

    def empty_cache(batch: int) -> tuple:
        z = torch.zeros(batch, k1 - k0, 0, spec.head_dim, dtype=dtype, device=device)
        return tuple((z, z) for _ in range(spec.num_hidden_layers))

    return module, empty_cache


def _rank_generate(rank: int, path: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                   out_dir: str) -> None:
    from qwen3export.generation import greedy_generate
    from qwen3export.graphs.parallel import init_parallel_groups

    artifact = load_artifact(path, verify_checksums=False)  # the caller verified them once
    p = artifact.manifest["parallel"]
    init_parallel_groups(RankLayout(p["tp"], p["ep"], rank))
    step, empty_cache = load_rank_program(artifact, rank)
    tokens, prefill, logits = greedy_generate(step, empty_cache(input_ids.shape[0]), input_ids, attention_mask,
                                              steps, keep_logits=True)
    out: dict[str, Any] = {"tokens": tokens}
    if rank == 0:
        out.update(prefill=prefill, steps=torch.stack(logits, 1))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def run_parallel_artifact(path: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                          work_dir: str | Path) -> list[dict[str, torch.Tensor]]:
    """Greedy generation on the artifact's N ranks as N gloo processes -> per-rank {tokens} (rank 0 also
    {prefill [B, S, V], steps [B, N, V]} logits). Checksums are verified here, before a process starts."""
    from .ranks import spawn_ranks

    artifact = load_artifact(path)
    if artifact.backend != BACKEND or "parallel" not in artifact.manifest:
        raise ArtifactError(f"{path} is not a parallel {BACKEND} artifact (backend {artifact.backend!r})")
    world = artifact.manifest["parallel"]["world"]
    spawn_ranks(_rank_generate, world, str(artifact.path), input_ids, attention_mask, steps, str(work_dir))
    return [torch.load(Path(work_dir) / f"rank{r}.pt") for r in range(world)]
