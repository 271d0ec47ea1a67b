"""Qwen3 special-token ids shared by presets, the sampling graph and the runner.

Source: Qwen3 tokenizer_config.json / tokenizer.json on the Hugging Face Hub (Qwen/Qwen3-8B,
"added_tokens_decoder"); `<think>`/`</think>` are marked "special": false there, so decoding with
skip_special_tokens keeps them.
"""

VOCAB_SIZE = 151936  # Qwen3 config.json "vocab_size" (embedding rows; the tokenizer has fewer)
ENDOFTEXT = 151643  # <|endoftext|>, also bos_token_id in config.json
IM_START = 151644  # <|im_start|>
IM_END = 151645  # <|im_end|>, eos_token_id of the instruct/hybrid models
THINK = 151667  # <think>
END_THINK = 151668  # </think>
STOP_IDS = (ENDOFTEXT, IM_END)
