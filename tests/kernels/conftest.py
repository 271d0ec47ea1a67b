"""Kernel tests run the Triton kernels through Triton's interpreter on CPU tensors.

Triton picks interpreter or compiler once per process, when triton is first imported (kernels/launch.py
says why), so this sets TRITON_INTERPRET=1 at collection, before any test module imports triton.
Cross-compilation (test_compile.py) then runs in a clean subprocess (kernels/compile.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _triton_interpreter():
    from qwen3export.kernels.launch import is_interpreted
    from qwen3export.kernels.rms_norm import _rms_norm_kernel

    if not is_interpreted(_rms_norm_kernel):
        pytest.fail("triton was imported in compiler mode before tests/kernels/conftest.py ran; "
                    "run pytest with TRITON_INTERPRET=1 in the environment")
