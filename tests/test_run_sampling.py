"""`qwen3export run` through the engine's sampling graph: thinking on/off/budget, sampling flags, seeds,
and text prompts through a checkpoint's own tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

from qwen3export.cli import main
from qwen3export.spec import ModelSpec, preset
from qwen3export.tokens import END_THINK, IM_END, IM_START, THINK
from qwen3export.weights import RandomSource, WeightSource
from qwen3export.weights import save_hf_checkpoint as save_source_checkpoint

from hf_reference import save_hf_checkpoint

PROMPT_OPEN_THINK = [IM_START, 872, 198, 9707, IM_END, 198, IM_START, 77091, 198, THINK]


@pytest.fixture(scope="module")
def tiny_art(built_artifact):
    return built_artifact("--model", "tiny", "--seed", "1")


def run(capsys, art, *flags):
    capsys.readouterr()
    assert main(["run", str(art), "--json", *map(str, flags)]) == 0
    return json.loads(capsys.readouterr().out)


class PinnedLogitsSource:
    """`base` (a WeightSource) changed so that the model emits `logits` [V] at every position whatever it
    reads: the test states what the model wants instead of hoping random weights want it.

    Every o_proj and down_proj is zero, so the residual stream stays the token's embedding; every token
    embeds as e_0 and the final norm's weight is e_0, so the last hidden state is RMSNorm(e_0) =
    sqrt(H) * e_0 (times 1 - H * eps / 2 = 1 - 3.2e-5 for H 64, eps 1e-6); lm_head column 0 =
    logits / sqrt(H) then gives `logits`. The base weights' statistics never reach the output.
    Needs untied embeddings (the embedding and lm_head differ).
    """

    def __init__(self, base: WeightSource, spec: ModelSpec, logits: torch.Tensor):
        assert not spec.tie_word_embeddings and logits.shape == (spec.vocab_size,)
        self.base, self.spec, self.logits = base, spec, logits
        self.description = f"{base.description}, logits pinned"

    def names(self) -> set[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def get(self, name: str) -> torch.Tensor:
        h = self.spec.hidden_size
        t = torch.zeros(self.base.shape(name))
        if name.endswith(("o_proj.weight", "o_proj.bias", "down_proj.weight")):
            return t  # no layer writes to the residual stream
        if name == "model.embed_tokens.weight":
            t[:, 0] = 1.0
        elif name == "model.norm.weight":
            t[0] = 1.0
        elif name == "lm_head.weight":
            t[:, 0] = self.logits / h**0.5
        else:
            return self.base.get(name)
        return t


def pinned_artifact(folder, pins: dict[int, float]):
    """Build an artifact from a tiny checkpoint (real vocabulary, untied) whose logits at every position are
    N(0, 1) noise (seed 0) with the tokens in `pins` set to the given values."""
    spec = preset("tiny").replace(tie_word_embeddings=False)
    logits = torch.randn(spec.vocab_size, generator=torch.Generator().manual_seed(0))  # max ~ 4.6
    for token, value in pins.items():
        logits[token] = value
    save_source_checkpoint(spec, PinnedLogitsSource(RandomSource(spec, seed=0), spec, logits), folder / "hf")
    assert main(["build", "--model", str(folder / "hf"), "--artifact", str(folder / "art")]) == 0
    return folder / "art"


@pytest.fixture(scope="module")
def eager_thinker(tmp_path_factory):
    """A model whose <think> logit is 200 above N(0, 1) noise: unmasked it is drawn with probability
    1 - 1e-23 even at temperature 3 (151935 * exp(-195 / 3))."""
    return pinned_artifact(tmp_path_factory.mktemp("eager_thinker"), {THINK: 200.0})


@pytest.fixture(scope="module")
def never_closes(tmp_path_factory):
    """A model whose <think> and </think> logits are -200: it never opens or closes a thinking block by
    itself, so every </think> in its output is one the sampling graph forced."""
    return pinned_artifact(tmp_path_factory.mktemp("never_closes"), {THINK: -200.0, END_THINK: -200.0})


def test_thinking_budget_is_enforced(never_closes, capsys):
    ids = ",".join(map(str, PROMPT_OPEN_THINK))
    for budget in (0, 3, 8):
        out = run(capsys, never_closes, "--prompt-ids", ids, "--thinking", "on", "--thinking-budget", budget,
                  "--max-new-tokens", budget + 6, "--no-stop", "--seed", 1)
        toks = out["tokens"]
        # The prompt opened <think>, so generation starts inside thinking with think_spent 0. Each step the
        # graph forces once think_spent >= budget, and each token sampled inside thinking adds 1 (SamplingGraph,
        # DESIGN §4): tokens 0 .. budget-1 are sampled, token `budget` is the forced early stop, which for a
        # preset without tokenizer is the single token </think> (early_stop_ids). The model never emits
        # </think> itself, so exactly one appears, at index `budget`.
        assert toks.index(END_THINK) == budget, toks
        assert toks.count(END_THINK) == 1 and THINK not in toks, toks
        assert out["thinking_tokens"] == budget


def test_thinking_off_never_thinks_and_unlimited_budget_never_forces(eager_thinker, capsys):
    ids = ",".join(map(str, PROMPT_OPEN_THINK[:-1]))  # prompt without <think>
    for seed in range(4):
        flags = ("--prompt-ids", ids, "--max-new-tokens", 24, "--temperature", 3.0, "--top-k", 0, "--top-p", 1.0,
                 "--seed", seed, "--no-stop")
        # control: thinking on, the model's <think> wins every step (a second <think> inside thinking is
        # a plain token) and the unlimited budget never forces </think>; the first <think> opens the block
        # and is not counted, the 23 after it are
        on = run(capsys, eager_thinker, *flags, "--thinking", "on")
        assert on["tokens"] == [THINK] * 24 and on["thinking_tokens"] == 23, on["tokens"]
        # thinking off: the same model never gets <think>, only the sampling graph's mask stands in its way
        off = run(capsys, eager_thinker, *flags, "--thinking", "off")
        assert THINK not in off["tokens"] and off["thinking_tokens"] == 0, off["tokens"]


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
    assert main(["build", "--model", str(folder), "--artifact", str(art)]) == 0
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
