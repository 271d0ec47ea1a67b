"""`qwen3export run` through the engine's sampling graph: thinking on/off/budget, sampling flags, seeds,
and text prompts through a checkpoint's own tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

from qwen3export.cli import main
from qwen3export.spec import preset
from qwen3export.tokens import END_THINK, IM_END, IM_START, THINK

from hf_reference import save_hf_checkpoint

PROMPT_OPEN_THINK = [IM_START, 872, 198, 9707, IM_END, 198, IM_START, 77091, 198, THINK]


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "art"
    assert main(["build", "--model", "tiny", "--out", str(out), "--seed", "4"]) == 0
    return out


def run(capsys, art, *flags):
    capsys.readouterr()
    assert main(["run", str(art), "--json", *map(str, flags)]) == 0
    return json.loads(capsys.readouterr().out)


def test_thinking_budget_is_enforced(tiny_art, capsys):
    ids = ",".join(map(str, PROMPT_OPEN_THINK))
    for budget in (0, 3, 8):
        out = run(capsys, tiny_art, "--prompt-ids", ids, "--thinking", "on", "--thinking-budget", budget,
                  "--max-new-tokens", budget + 6, "--no-stop", "--seed", 1)
        toks = out["tokens"]
        # the prompt opened <think>: exactly `budget` sampled thinking tokens, then the early stop (for a
        # preset without tokenizer just </think>), unless the model closed it earlier itself
        first_close = toks.index(END_THINK)
        assert first_close <= budget and out["thinking_tokens"] == first_close
        assert THINK not in toks[:first_close]


def test_thinking_off_never_thinks_and_unlimited_budget_never_forces(tiny_art, capsys):
    ids = ",".join(map(str, PROMPT_OPEN_THINK[:-1]))  # prompt without <think>
    for seed in range(4):
        out = run(capsys, tiny_art, "--prompt-ids", ids, "--thinking", "off", "--max-new-tokens", 24,
                  "--temperature", 3.0, "--top-k", 0, "--top-p", 1.0, "--seed", seed, "--no-stop")
        assert THINK not in out["tokens"] and out["thinking_tokens"] == 0


def test_seed_determinism_and_greedy(tiny_art, capsys):
    ids = "5,6,7,8"
    a = run(capsys, tiny_art, "--prompt-ids", ids, "--seed", 7, "--max-new-tokens", 16, "--no-stop")
    b = run(capsys, tiny_art, "--prompt-ids", ids, "--seed", 7, "--max-new-tokens", 16, "--no-stop")
    c = run(capsys, tiny_art, "--prompt-ids", ids, "--seed", 8, "--max-new-tokens", 16, "--no-stop",
            "--temperature", 5.0, "--top-k", 0, "--top-p", 1.0)
    assert a["tokens"] == b["tokens"]
    assert a["params"]["temperature"] == 0.6 and a["params"]["top_k"] == 20  # Qwen3 thinking defaults
    assert c["tokens"] != a["tokens"]
    g1 = run(capsys, tiny_art, "--prompt-ids", ids, "--greedy", "--seed", 1, "--max-new-tokens", 8)
    g2 = run(capsys, tiny_art, "--prompt-ids", ids, "--greedy", "--seed", 2, "--max-new-tokens", 8)
    assert g1["tokens"] == g2["tokens"]


QWEN_LIKE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A checkpoint folder with a byte-level BPE tokenizer whose special tokens sit inside a small vocab,
    a Qwen-style chat template and a generation_config.json."""
    folder = tmp_path_factory.mktemp("textckpt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, how are you today?", "Considering the limited time by the user, I have to give the "
              "solution based on the thinking directly now.", "the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<think>", "</think>")}
    spec = preset("tiny").replace(vocab_size=512, bos_token_id=ids["<|endoftext|>"],
                                  eos_token_ids=(ids["<|endoftext|>"], ids["<|im_end|>"]),
                                  think_token_id=ids["<think>"], end_think_token_id=ids["</think>"])
    save_hf_checkpoint(spec, folder, seed=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_LIKE_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.9,
                                                               "top_k": 5, "top_p": 0.9}))
    return folder, tok, ids


def test_text_prompt_with_chat_template_and_budget(text_checkpoint, tmp_path, capsys):
    folder, tok, ids = text_checkpoint
    art = tmp_path / "art"
    assert main(["build", "--model", str(folder), "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    sampling = manifest["sampling"]
    assert set(sampling["tokenizer_files"]) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert sampling["defaults"]["thinking"] == {"temperature": 0.9, "top_k": 5, "top_p": 0.9, "min_p": 0.0}
    early = sampling["early_stop_ids"]
    assert early[-1] == ids["</think>"] and len(early) > 5
    assert "Considering the limited time" in tok.decode(early)

    # thinking off: the template closes an empty think block and the graph masks <think>
    off = run(capsys, art, "--prompt", "hello world", "--thinking", "off", "--max-new-tokens", 12, "--no-stop")
    assert ids["<think>"] not in off["tokens"] and isinstance(off["text"], str)
    on = run(capsys, art, "--prompt", "hello world", "--thinking", "on", "--max-new-tokens", 12, "--greedy")
    assert on["params"]["temperature"] == 0.0 and on["text"] == tok.decode(on["tokens"])
    # a prompt that opened <think>, budget 2: two thinking tokens, then Qwen's early-stop text
    prompt = tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>").ids
    forced = run(capsys, art, "--prompt-ids", ",".join(map(str, prompt)), "--thinking-budget", 2,
                 "--max-new-tokens", len(early) + 4, "--no-stop", "--seed", 3)
    toks = forced["tokens"]
    if ids["</think>"] in toks[:2]:
        pytest.fail(f"the random model closed </think> by itself within 2 tokens: {toks}; change the seed")
    assert toks[2:2 + len(early)] == early and forced["thinking_tokens"] == 2
    assert "Considering the limited time by the user" in forced["text"]
