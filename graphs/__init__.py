"""Export-friendly Qwen3 graphs (decoder, sampling) and the lowering passes over them."""
