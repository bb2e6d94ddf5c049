"""Tokenizer of a model file (GGUF metadata or a Hugging Face ``tokenizer.json``), no hub.

Built on the ``tokenizers`` library, configured the way ``transformers.AutoTokenizer``
configures it for the same file, so ids agree with it:

- GGUF ``tokenizer.ggml.model = gpt2`` (byte-level BPE: SmolLM2, Llama 3, Qwen2, GPT-2):
  the vocabulary respelled in GPT-2's byte alphabet, the file's merges, a byte-level
  pre-tokenizer (the split regex of the file's ``tokenizer.ggml.pre`` where transformers
  knows it), control tokens (type 3) matched whole as special tokens, user-defined ones
  (type 4) as plain added tokens.
- GGUF ``tokenizer.ggml.model = llama`` (SentencePiece BPE: Llama 2, Mistral): BPE with
  byte fallback, merges rebuilt from the scores, ``▁`` prefix on the first word.
- A Hugging Face directory: its ``tokenizer.json`` as is, plus ``tokenizer_config.json``
  (special tokens, ``add_bos_token``/``add_eos_token``, chat template).

BOS/EOS are added by ``encode`` only where the file says so (``add_bos_token``; for
SentencePiece GGUF files without the flag, llama.cpp's default of adding BOS), exactly
as AutoTokenizer does with its default ``add_special_tokens=True``. Chat templates are
rendered with jinja2 in a sandbox, with the same options and helpers as transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from edgepart.llm.gguf_meta import field_value, open_gguf

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes of byte-level vocabularies, by tokenizer.ggml.pre, as transformers maps them
# (transformers/integrations/gguf/gguf_tokenizer_mapping.py); other values keep GPT-2's own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model file."""

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: Mapping[str, str | None],
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        stop_ids: Iterable[int] = (),
    ) -> None:
        """Wrap a configured backend; add_bos/add_eos None keeps its own post-processor."""
        self.backend = backend
        # bos_token, eos_token, unk_token, pad_token: strings the chat template sees.
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template
        self._add_named_specials()
        if add_bos is not None or add_eos is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos), bool(add_eos))
        self.eos_id = self.token_id(self.special_tokens.get("eos_token"))
        self.bos_id = self.token_id(self.special_tokens.get("bos_token"))
        # What encode() really does (a tokenizer.json post-processor may add BOS by itself).
        framed = self.backend.encode("", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and framed[:1] == [self.bos_id]
        rest = framed[1:] if self.add_bos else framed  # GPT-2's BOS and EOS are one token
        self.add_eos = self.eos_id is not None and rest[-1:] == [self.eos_id]
        stops = {i for i in stop_ids if i is not None}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids: frozenset[int] = frozenset(stops)

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a .gguf file or a Hugging Face directory (with tokenizer.json)."""
        p = Path(path)
        if p.is_dir():
            return cls.from_hf_dir(p)
        if p.is_file():
            return cls.from_gguf(p)
        raise FileNotFoundError(f"no such file or directory: {p}")

    @classmethod
    def from_gguf(cls, path: str | Path, reader: Any = None) -> Tokenizer:
        """From the tokenizer.ggml.* metadata of a GGUF file; ValueError if it has none.

        ``reader``: an open gguf.GGUFReader of that file (GGUFSource.reader), which saves
        parsing the header again (about 2 s for a 49k-token vocabulary).
        """
        if reader is None:
            reader = open_gguf(path)

        def meta(key: str, default: Any = None) -> Any:
            return field_value(reader, key, default)

        kind = meta("tokenizer.ggml.model")
        tokens: list[str] | None = meta("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise ValueError(f"{Path(path).name} has no tokenizer (tokenizer.ggml.* metadata)")
        token_types: list[int] = meta("tokenizer.ggml.token_type") or []
        merges: list[str] | None = meta("tokenizer.ggml.merges")
        add_bos = meta("tokenizer.ggml.add_bos_token")
        if kind == "gpt2":
            backend = _byte_level_backend(tokens, merges, meta("tokenizer.ggml.pre"))
        elif kind == "llama":
            scores: list[float] | None = meta("tokenizer.ggml.scores")
            backend = _sentencepiece_backend(tokens, merges, scores)
            if add_bos is None:  # older files: llama.cpp adds BOS to a SentencePiece vocabulary
                add_bos = True
        else:
            raise ValueError(
                f"{Path(path).name}: tokenizer type {kind!r} is not supported (gpt2, llama are)"
            )
        _add_gguf_added_tokens(backend, tokens, token_types, byte_level=kind == "gpt2")
        specials = {
            name: tokens[i] if (i := meta(f"tokenizer.ggml.{key}_token_id")) is not None else None
            for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                              ("unk_token", "unknown"), ("pad_token", "padding"))
        }
        stops = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            special_tokens=specials,
            add_bos=add_bos,
            add_eos=meta("tokenizer.ggml.add_eos_token"),
            chat_template=meta("tokenizer.chat_template"),
            stop_ids=stops,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From tokenizer.json (+ tokenizer_config.json, chat_template.jinja) in a directory."""
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        backend = Backend.from_file(str(tj))
        config = _read_json(d / "tokenizer_config.json")
        specials = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        template = config.get("chat_template")
        jinja = d / "chat_template.jinja"
        if jinja.is_file():  # transformers >= 4.47 saves the template beside the config
            template = jinja.read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        generation = _read_json(d / "generation_config.json").get("eos_token_id")
        stops = generation if isinstance(generation, list) else [generation]
        return cls(
            backend,
            special_tokens=specials,
            add_bos=config.get("add_bos_token"),
            add_eos=config.get("add_eos_token"),
            chat_template=template if isinstance(template, str) else None,
            stop_ids=[int(s) for s in stops if isinstance(s, int)],
        )

    # ---------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        """Id of a token string (e.g. '<|im_end|>'), or None if it has none."""
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of a raw text; BOS/EOS only where the file's tokenizer adds them by default."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ids (special tokens kept unless asked to skip them, as transformers)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of a conversation, rendered by the model's own chat template."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of the chat-templated prompt (the template writes any BOS itself)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    # ---------------------------------------------------------------- internals

    def _add_named_specials(self) -> None:
        """Make bos/eos/unk/pad match whole in text, as transformers adds them."""
        present = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        extra = [
            AddedToken(tok, special=True)
            for tok in dict.fromkeys(self.special_tokens.values())
            if tok not in present
        ]
        if extra:
            self.backend.add_tokens(extra)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """BOS/EOS around each sequence exactly as transformers' update_post_processor."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = (f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1"
                f"{' ' + eos + ':1' if add_eos else ''}")
        special: list[tuple[str, int]] = []
        for tok, on in ((bos, add_bos), (eos, add_eos)):
            if on and tok is not None:
                special.append((tok, self.backend.token_to_id(tok)))
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )


# -------------------------------------------------------------------- GGUF vocabularies


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _byte_level_backend(tokens: list[str], merges: list[str] | None, pre: str | None) -> Backend:
    """GPT-2 style byte-level BPE, as transformers' GPT2Tokenizer builds it from a GGUF."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens written with real characters (not the byte alphabet) are respelled byte by byte.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ")) for m in merges or []]
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None
) -> Backend:
    """SentencePiece-style BPE with byte fallback, as transformers' LlamaTokenizer builds it."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    else:
        if scores is None:
            raise ValueError("a SentencePiece GGUF vocabulary needs merges or scores")
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    backend = Backend(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(content=" ", left=1, right=0)]
    )
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary, best first (transformers' generate_merges)."""
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_gguf_added_tokens(
    backend: Backend, tokens: list[str], token_types: list[int], byte_level: bool
) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(tok, normalized=False, special=True)
        for tok, kind in zip(tokens, token_types, strict=False)
        # In a byte-level vocabulary a "control" token outside the byte alphabet is a
        # llama.cpp mislabel; transformers skips it, so we do too.
        if kind == _CONTROL and (alphabet is None or set(tok) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and tok in vocab
    ]
    if user:
        backend.add_tokens(user)


# -------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} if the file is absent."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """A jinja2 template in the sandboxed environment transformers renders chat templates in."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which a prompt must not have.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
