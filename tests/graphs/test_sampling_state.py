"""Sampling state (graphs/sampling_state.py): the early-stop sequence from a real `tokenizers` tokenizer,
its validation, the thinking vocabulary, and prompt-state errors."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen3export import tokens
from qwen3export.errors import ConfigError, InputError
from qwen3export.graphs.sampling import EARLY_STOP_TEXT, SamplingGraph, SamplingVocab, early_stop_ids, initial_state
from qwen3export.graphs.sampling_state import check_early_stop

VOCAB = SamplingVocab(vocab_size=64, think_id=60, end_think_id=61)


def byte_level_tokenizer(think_tokens: bool = True) -> Tokenizer:
    """A small byte-level BPE (Qwen3's tokenizer kind) trained on the early-stop text, with <think> and
    </think> added as non-special tokens as in Qwen3's tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([EARLY_STOP_TEXT.replace("</think>", "")] * 4,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if think_tokens:
        tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tok


def test_early_stop_ids_from_a_tokenizer_decode_back_to_qwens_text():
    tok = byte_level_tokenizer()
    vocab = SamplingVocab(tok.get_vocab_size(), tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    ids = early_stop_ids(tok, vocab)
    assert ids[-1] == vocab.end_think_id and ids.count(vocab.end_think_id) == 1
    assert tok.decode(list(ids)) == EARLY_STOP_TEXT[: EARLY_STOP_TEXT.index("</think>") + len("</think>")]
    assert SamplingGraph(vocab, ids).forced_ids.tolist() == list(ids)


def test_early_stop_without_a_tokenizer_is_just_end_think():
    assert early_stop_ids(None, SamplingVocab(tokens.VOCAB_SIZE)) == (tokens.END_THINK,)
    assert SamplingGraph(SamplingVocab(tokens.VOCAB_SIZE)).early_stop == (tokens.END_THINK,)


def test_early_stop_errors():
    tok = byte_level_tokenizer()
    vocab = SamplingVocab(tok.get_vocab_size(), tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    with pytest.raises(ConfigError, match="must contain </think>"):
        early_stop_ids(tok, vocab, text="no closing tag here")
    with pytest.raises(ConfigError, match="differs from the model's"):
        early_stop_ids(byte_level_tokenizer(think_tokens=False), vocab)
    with pytest.raises(ConfigError, match="no <think>/</think> tokens"):
        early_stop_ids(tok, SamplingVocab(64, None, None))


@pytest.mark.parametrize("ids, words", [
    ((), "must end with </think>"),
    ((5, 6), "must end with </think>"),
    ((61, 5, 61), "hold it once"),
    ((60, 61), "must not contain <think>"),
    ((99, 61), "outside 0..63"),
])
def test_forced_sequence_must_end_with_its_only_end_think(ids, words):
    with pytest.raises(ConfigError, match=words):
        check_early_stop(ids, VOCAB)
    with pytest.raises(ConfigError, match=words):
        SamplingGraph(VOCAB, ids)


def test_vocabulary_errors():
    with pytest.raises(ConfigError, match="both"):
        SamplingVocab(64, 60, None)
    with pytest.raises(ConfigError, match=r"end_think_id 64 is outside 0..63"):
        SamplingVocab(64, 60, 64)


def test_prompt_errors():
    with pytest.raises(InputError, match=r"prompt 1: token id 64 is out of range"):
        initial_state([[1], [64]], VOCAB)
    with pytest.raises(InputError, match="at least one prompt"):
        initial_state([], VOCAB)


def test_state_from_a_model_spec():
    from qwen3export.spec import preset

    state = initial_state([[tokens.IM_START, tokens.THINK]], preset("tiny"))
    assert state["seen_ids"].tolist() == [sorted({tokens.IM_START, tokens.THINK})] and bool(state["in_think"][0])
