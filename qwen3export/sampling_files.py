"""The sampling graph an artifact carries (thinking control baked in), with the checkpoint's tokenizer, chat
template and generation_config copied beside it (presets with Qwen3's vocabulary: Qwen3's tokenizer and chat
template, converted by tokenizer_files.py).

The graph is a function of (vocabulary, early-stop ids) alone, so it is captured and written as ONNX once per
process for each and copied into every artifact after the first: on 2 cores a tiny preset build spent ~14 s of
its ~40 s on them (capture ~5 s, ONNX export ~9 s, measured 2026-11-30), and the export ran again per backend.
Every artifact's copy is still checked against the torch graph by its own build's verify stage."""

from __future__ import annotations

import copy
import shutil
import typing
from pathlib import Path

from tokenizers import Tokenizer
from torch.export import ExportedProgram

from qwen3export.graphs.sampling import (SAMPLING_FILE, SamplingGraph, SamplingVocab, capture_sampling,
                                         early_stop_ids, emit_sampling_onnx, read_generation_config,
                                         sampling_defaults)

from .manifest import SamplingRecord
from .model import ModelRef
from .spec import ModelSpec
from .tokenizer_files import has_qwen3_vocab, qwen3_tokenizer, write_preset_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

SamplingKey = tuple[SamplingVocab, tuple[int, ...]]  # everything SamplingGraph is built from
_PROGRAMS: dict[SamplingKey, ExportedProgram] = {}  # capture_sampling, once per process per key
_ONNX: dict[SamplingKey, tuple[bytes, dict]] = {}  # the written sampling.onnx and its engine entry, likewise


def _source_folder(ref: ModelRef) -> Path | None:
    return Path(ref.name) if ref.kind == "folder" else None


def sampling_graph_for(spec: ModelSpec, ref: ModelRef):
    """The sampling graph with the early-stop sequence tokenized by the checkpoint's tokenizer, if any."""

    src = _source_folder(ref)
    tokenizer = None
    if src is not None and (src / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    elif src is None and has_qwen3_vocab(spec):  # a preset: Qwen3's own tokenizer (tokenizer_files.py)
        tokenizer = qwen3_tokenizer()
    vocab = SamplingVocab.from_spec(spec)
    if not vocab.has_thinking:  # no <think>/</think> in this vocabulary: thinking control does not apply
        return SamplingGraph(vocab)
    return SamplingGraph(vocab, early_stop_ids(tokenizer, vocab))


def _key(graph: SamplingGraph) -> SamplingKey:
    return graph.vocab, tuple(graph.early_stop)


def sampling_program(spec: ModelSpec, ref: ModelRef) -> ExportedProgram:
    """The sampling graph's capture (capture_sampling), made once per process for its (vocabulary, early stop)."""
    graph = sampling_graph_for(spec, ref)
    key = _key(graph)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = capture_sampling(graph)
    return _PROGRAMS[key]


def _write_sampling_onnx(graph: SamplingGraph, path: Path, sampling_ep) -> dict:
    """emit_sampling_onnx the first time a process meets this (vocabulary, early stop); a copy of that file after."""
    key = _key(graph)
    if key not in _ONNX:
        entry = emit_sampling_onnx(graph, path, sampling_ep)
        _ONNX[key] = (path.read_bytes(), entry)
    else:
        path.write_bytes(_ONNX[key][0])
    return copy.deepcopy(_ONNX[key][1])


def emit_sampling(spec: ModelSpec, ref: ModelRef, folder: Path, sampling_ep) -> SamplingRecord:
    """The sampling graph as sampling.onnx, plus the checkpoint's tokenizer, chat template and
    generation_config copied beside it; returns the manifest's `sampling` entry."""
    src = _source_folder(ref)
    copied: list[str] = []
    if src is not None:
        copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        for f in copied:
            shutil.copy2(src / f, folder / f)
    elif has_qwen3_vocab(spec):  # a preset: Qwen3's tokenizer and chat template
        copied = write_preset_tokenizer(folder)
    entry = _write_sampling_onnx(sampling_graph_for(spec, ref), folder / SAMPLING_FILE, sampling_ep)
    entry["defaults"] = sampling_defaults(read_generation_config(src) if src is not None else None)
    entry["tokenizer_files"] = copied
    return typing.cast(SamplingRecord, entry)  # the graph's entry (graphs/ knows no manifest) + ours
