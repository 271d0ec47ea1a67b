"""`qwen3export serve`: an OpenAI-compatible HTTP server (app.py) over one engine loop with continuous batching
(scheduler.py) and Qwen3's <think> split (reasoning.py)."""
