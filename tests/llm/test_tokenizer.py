"""Tokenizer: ids, decoding and chat templates identical to transformers.AutoTokenizer.

References are AutoTokenizer on the same files: the real SmolLM2 GGUF (byte-level BPE),
a small SentencePiece-style GGUF written here, and Hugging Face directories saved by
AutoTokenizer itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from edgepart.llm.tokenizer import Tokenizer, bytes_to_unicode  # noqa: E402

TEXTS = [
    "",
    "Hello world",
    " leading space and trailing  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "    indented     runs      of spaces",
    "héllo wörld — naïve café ☕ 日本語のテキスト 🤖🚀 Ελληνικά",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "I'm sure you'll see they've won't CAN'T",
    "12345678901234 3.14159 1e-9 0xFF",
    "<|im_start|>user\nHi there<|im_end|>\n",  # control tokens are matched whole
    "a<|endoftext|>b<repo_name>c",
    "\u00a0nbsp\u200bzero-width\ufeffbom",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ],
]


@pytest.fixture(scope="session")
def ours(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def reference(smollm2_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_autotokenizer(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False
    )


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours, reference, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == text  # byte-level BPE loses nothing
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
        ids, skip_special_tokens=True
    )


def test_raw_prompts_get_no_bos(ours, reference):
    # SmolLM2's file says add_bos_token = false; AutoTokenizer honours it, so do we.
    assert not ours.add_bos and not ours.add_eos
    assert ours.encode("Hello world") == [19556, 905]
    assert ours.bos_id == reference.bos_token_id == 1
    assert ours.eos_id == reference.eos_token_id == 2  # <|im_end|>
    assert ours.eos_id in ours.stop_ids
    assert ours.vocab_size == len(reference) == 49152
    assert ours.token_id("<|im_start|>") == 1 and ours.token_id("no such token") is None


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_autotokenizer(ours, reference, conversation, generation_prompt):
    text = ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    assert text == reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation_prompt
    )
    ids = reference.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    assert ours.encode_chat(conversation, add_generation_prompt=generation_prompt) == list(ids)


def test_reader_of_an_open_source_can_be_shared(smollm2_path, ours):
    from edgepart.llm.gguf_source import GGUFSource

    source = GGUFSource(smollm2_path)
    shared = Tokenizer.from_gguf(smollm2_path, reader=source.reader)
    assert shared.encode(TEXTS[5]) == ours.encode(TEXTS[5])


def test_chat_template_default_adds_the_assistant_turn(ours):
    text = ours.apply_chat_template(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------ SentencePiece GGUF


def _sentencepiece_gguf(path: Path, add_bos: bool | None) -> None:
    """A Llama-2-style vocabulary: <unk>, <s>, </s>, byte tokens, scored pieces."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
             "token", "izer", "ing", "er", "th", "he", "qu", "ck", "ow", "ov"]
    pieces = list(dict.fromkeys(
        ["▁" + w for w in words] + words + list("abcdefghijklmnopqrstuvwxyz")
        + ["▁", "▁t", "▁th", "▁q", "▁b", "▁h", "▁w", "el", "ll", "lo", "or", "ld", "▁d", "og"]
    ))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]  # unknown, control, byte, user
    scores = [0.0] * 259 + [len(p) - i / 1000 for i, p in enumerate(pieces)] + [0.0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SP_TEXTS = ["", "the quick brown fox", " the  lazy dog ", "hello world", "tokenizer",
            "héllo ☕ ü", "<s>the</s>", "x<|user|>y", "\n\tthe", "THE OVER"]


@pytest.mark.parametrize("add_bos", [None, False])
def test_sentencepiece_gguf_matches_autotokenizer(tmp_path, add_bos):
    path = tmp_path / "sp.gguf"
    _sentencepiece_gguf(path, add_bos)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = Tokenizer.from_gguf(path)
    # Without the flag llama.cpp (and transformers) put BOS in front of every prompt.
    assert tok.add_bos == (add_bos is None)
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        ), text
    assert tok.encode("hello")[: 1 if add_bos is None else 0] == ([1] if add_bos is None else [])
    chat = CONVERSATIONS[1]
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )


# ------------------------------------------------------------------ Hugging Face directories


def test_hf_directory_matches_autotokenizer(tmp_path, smollm2_path, reference):
    reference.save_pretrained(tmp_path / "smollm2")
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    _sentencepiece_gguf(sp_dir / "sp.gguf", add_bos=None)
    transformers.AutoTokenizer.from_pretrained(str(sp_dir), gguf_file="sp.gguf").save_pretrained(
        tmp_path / "sp-hf"
    )
    for folder, texts in ((tmp_path / "smollm2", TEXTS), (tmp_path / "sp-hf", SP_TEXTS)):
        ref = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok = Tokenizer.load(folder)
        for text in texts:
            assert tok.encode(text) == ref.encode(text), (folder.name, text)
            assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
        for conversation in CONVERSATIONS:
            assert tok.apply_chat_template(conversation) == ref.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        assert tok.eos_id == ref.eos_token_id and tok.bos_id == ref.bos_token_id
    assert Tokenizer.load(tmp_path / "sp-hf").add_bos  # the saved post-processor adds <s>


# ------------------------------------------------------------------ errors and helpers


def test_missing_tokenizer_and_template_are_explained(tmp_path):
    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="has no tokenizer"):
        Tokenizer.from_gguf(path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_no_chat_template_is_an_error(ours):
    bare = Tokenizer(ours.backend, special_tokens=ours.special_tokens)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CONVERSATIONS[0])


def test_byte_alphabet_is_gpt2s():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
