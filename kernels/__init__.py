"""kernels of qwen3export (see ../shared/DESIGN.md)."""
