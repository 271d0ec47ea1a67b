"""Triton kernels, one file each, with launcher, pure-torch reference and config space (see ../shared/DESIGN.md).

Triton chooses between compiling and interpreting once per process, when triton is first imported:
setting QWEN3EXPORT_TRITON_INTERPRET=1 before importing this package turns the interpreter on.
"""

import os

if os.environ.get("QWEN3EXPORT_TRITON_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
