"""Triton kernels, one file each, with launcher, pure-torch reference and config space (../shared/DESIGN.md).
QWEN3EXPORT_TRITON_INTERPRET=1 set before this package is imported runs them through Triton's interpreter.
"""

import os

if os.environ.get("QWEN3EXPORT_TRITON_INTERPRET") == "1":  # must precede triton's import: kernels/launch.py
    os.environ.setdefault("TRITON_INTERPRET", "1")
