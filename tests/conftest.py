"""Shared fixtures: Hugging Face reference checkpoints written to temp folders.

transformers is the parity reference (Qwen3ForCausalLM / Qwen3MoeForCausalLM); it is imported only here
and in tests, never by qwen3export itself.
"""

from __future__ import annotations

import copy
import os

# Triton reads TRITON_INTERPRET when it is first imported, and transformers/torch may import it during
# collection of any test module: set it here, before anything, so the kernel tests (tests/kernels) run
# under the interpreter whatever the collection order. No GPU exists here; nothing else uses Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


from hf_reference import save_hf_checkpoint  # noqa: E402


# Tiers (README "Tests"): unmarked tests are fast unit tests (kernels under the interpreter, graphs, passes,
# loaders, planners: no engine is built); `integration` builds and verifies engine artifacts through the
# pipeline (tens of seconds each); `heavy` runs AOTInductor compiles, Triton cross-compiles, gloo rank
# processes or autotune worker processes (minutes). Marked here by module, in one table, so a new module
# lands in a tier by its name. `pytest -m "not integration and not heavy"` is the quick loop.
TIERS = {
    "integration": ("test_cli.py", "test_realistic_build.py", "test_quant_build.py", "test_pipeline.py",
                    "test_streaming.py", "test_run_sampling.py", "test_parity_gate.py", "test_lowering_build.py",
                    "test_fp16_build.py", "test_rope.py", "test_tensorrt.py", "test_hostile_inputs.py",
                    "test_serve.py"),
    "heavy": ("test_aoti.py", "test_cli_kernels.py", "test_compile.py", "test_tune.py", "test_parallel.py",
              "test_parallel_artifact.py", "test_parallel_build.py", "test_kernel_backend_build.py",
              "test_stream_memory.py"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for tier, modules in TIERS.items():
            if item.path.name in modules:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Lazily written reference checkpoints, cached per spec for the session: name -> (folder, hf model).
    Each call gets its own deep copy of the model, so a test that casts or edits it (bf16) cannot change
    what the next test compares against."""
    cache: dict = {}

    def get(spec, name: str | None = None, **kwargs):
        key = name or spec.name
        if key not in cache:
            folder = tmp_path_factory.mktemp(key)
            cache[key] = (folder, save_hf_checkpoint(spec, folder, **kwargs))
        folder, model = cache[key]
        return folder, copy.deepcopy(model)

    return get


@pytest.fixture(scope="session")
def built_artifact(tmp_path_factory):
    """Session cache of artifacts built through the CLI: `built_artifact("--model", "tiny", "--seed", "1")`
    builds once per session and returns the artifact folder. The folder is shared: a test that changes files
    in it takes `artifact_copy.copy_of(path, tmp_path)` instead. Each return checks the artifact's checksums, so a test
    that damaged the shared copy fails the next user loudly instead of skewing its result."""
    from qwen3export import artifact as art
    from qwen3export.cli import main

    cache: dict[tuple[str, ...], object] = {}

    def get(*argv: str):
        key = tuple(map(str, argv))
        if key not in cache:
            out = tmp_path_factory.mktemp("artifact") / "art"
            assert main(["build", *key, "--artifact", str(out)]) == 0, f"cached build {key} failed"
            cache[key] = out
        art.load_artifact(cache[key])  # raises if a test edited the shared folder
        return cache[key]

    return get


@pytest.fixture
def one_thread():
    """Tiny graphs on a shared 2-core machine: one torch thread is faster and leaves the other core alone.
    Modules that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
