"""Lowering passes over captured Qwen3 graphs (one pass per file)."""
