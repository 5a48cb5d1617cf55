"""GPT-2's byte-level BPE tokenizer, over the Rust `tokenizers` library.

The ids must match what GPT-2 was trained on and what transformers' `GPT2Tokenizer` produces:
byte-level BPE with GPT-2's pre-tokenizer regex, no prefix space, no unknown token, and
`<|endoftext|>` registered as a special token, so that the literal string inside a text becomes
its single id (50256) instead of seven ordinary tokens. Nothing is ever added around a text:
callers decide where an end-of-text goes. Padding reuses `<|endoftext|>` plus an attention mask,
so the vocabulary (and the model's embedding table) never grows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from gpt2model.errors import CheckpointError
from gpt2model.hub import is_local, resolve_file

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


class Tokenizer:
    """Wraps tokenizers.Tokenizer.

    A thin layer that fixes GPT-2's conventions in one place: plain `list[int]` out, no special
    tokens added, clear errors for text Rust cannot hold, and ids accepted from lists, NumPy or
    JAX arrays alike, so the pipeline and the generation code need not convert.
    """

    eos_token: str
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "tokenizer") -> None:
        """Adopt `backend`; `source` names where it came from, for error messages only."""
        eos_id = backend.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise CheckpointError(f"the vocabulary of {source} has no {EOS_TOKEN!r} token")
        # A tokenizer.json may carry padding or truncation settings; both would change ids
        # behind the caller's back (the pipeline pads with masks itself).
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.eos_token = EOS_TOKEN
        self.eos_token_id = int(eos_id)
        self.pad_token_id = self.eos_token_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for what this class does not expose."""
        return self._backend

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added around it."""
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise _bad_text(text, where="text") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; the Rust batch encoder spreads the work over threads."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            # Checked up front: the Rust encoder silently takes a 2-tuple as a sentence pair.
            if not isinstance(text, str):
                raise TypeError(f"text {i} of the batch is a {type(text).__name__}, not a str")
        try:
            # The fast variant skips character offsets, which nothing here uses.
            encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            for i, text in enumerate(texts):
                if _has_surrogates(text):
                    raise _bad_text(text, where=f"text {i} of the batch") from None
            raise
        return [e.ids for e in encodings]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids (list, NumPy or JAX array).

        Byte sequences that are not valid UTF-8 (a token boundary inside a character) decode
        to U+FFFD, as transformers does with its default `errors="replace"`.
        """
        return self._backend.decode(_id_list(ids, self.vocab_size),
                                    skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences: a list of sequences or a 2-D array."""
        if hasattr(batch, "ndim"):
            # One host transfer for a device array rather than one per row.
            batch = np.asarray(batch)
            if batch.ndim != 2:
                raise ValueError(f"decode_batch needs a 2-D array of ids, got shape {batch.shape}")
        rows = [_id_list(row, self.vocab_size) for row in batch]
        return self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` into `directory`, so a checkpoint directory is self-contained."""
        path = Path(directory).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / TOKENIZER_FILE))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def get_tokenizer(name_or_path: str | os.PathLike = "gpt2") -> Tokenizer:
    """Load the tokenizer of a checkpoint directory or Hub repo.

    `tokenizer.json` is preferred because it is the complete description; older checkpoints
    (and OpenAI's release) only have `vocab.json` + `merges.txt`, from which GPT-2's tokenizer
    is rebuilt. Raises CheckpointError when neither form can be found.
    """
    name = str(name_or_path)
    tokenizer_json = resolve_file(name, TOKENIZER_FILE, required=False)
    if tokenizer_json is not None:
        return from_tokenizer_file(tokenizer_json)
    vocab = resolve_file(name, VOCAB_FILE, required=False)
    merges = resolve_file(name, MERGES_FILE, required=False)
    if vocab is not None or merges is not None:
        # With one of the pair present, the error for the other one is the useful message.
        vocab = vocab or resolve_file(name, VOCAB_FILE, required=True)
        merges = merges or resolve_file(name, MERGES_FILE, required=True)
        return from_vocab_files(vocab, merges)
    looked_for = f"looked for {TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE}"
    if is_local(name):
        where = f"checkpoint directory {str(Path(name).expanduser())!r}"
        raise CheckpointError(f"no tokenizer files in {where} ({looked_for})")
    # Offline or unreachable, the Hub reports optional files as absent; asking for one as
    # required brings back the reason (offline, unknown repo, ...) with the way out.
    try:
        tokenizer_json = resolve_file(name, TOKENIZER_FILE, required=True)
    except CheckpointError as err:
        raise CheckpointError(f"no tokenizer files for Hub repo {name!r} ({looked_for}): {err}"
                              ) from None
    # Reached only if the file appeared between the two calls (the network came back).
    return from_tokenizer_file(tokenizer_json)


def from_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` as written by `Tokenizer.save` or by transformers."""
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust loader raises a bare Exception
        raise CheckpointError(f"cannot load {str(path)!r}: {_first_line(err)}") from None
    return Tokenizer(backend, source=repr(str(path)))


def from_vocab_files(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> Tokenizer:
    """Build GPT-2's byte-level BPE from `vocab.json` (token -> id) and `merges.txt`.

    Each piece is set the way GPT-2 was trained and transformers' GPT2Tokenizer sets it, since
    any difference (a prefix space, another regex, an unk token) silently changes ids.
    """
    vocab = _read_vocab(Path(vocab_json))
    merges = _read_merges(Path(merges_txt))
    if EOS_TOKEN not in vocab:
        raise CheckpointError(f"{str(vocab_json)!r} has no {EOS_TOKEN!r} token")
    try:
        model = models.BPE(vocab, merges, dropout=None, unk_token=None, fuse_unk=False)
    except Exception as err:  # e.g. a merge whose parts are not in the vocabulary
        raise CheckpointError(
            f"{str(vocab_json)!r} and {str(merges_txt)!r} do not form a BPE model: "
            f"{_first_line(err)}"
        ) from None
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # Registered under its existing vocabulary id (checked above, so no new id is created); as
    # a special token it is matched before the regex splits the text, as transformers does.
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return Tokenizer(backend, source=repr(str(vocab_json)))


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {_first_line(err)}") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()
    ):
        raise CheckpointError(f"{str(path)!r} is not a JSON object of token -> integer id")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {_first_line(err)}") from None
    merges = []
    # Split on "\n" only: str.splitlines would also break at U+2028, U+0085 and friends.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(
                f"{str(path)!r} line {lineno} is not a merge (two tokens separated by a space)"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _id_list(ids: Any, vocab_size: int) -> list[int]:
    """Plain Python ints from a list or array, rejecting what Rust would misread or wrap.

    Ids outside the vocabulary are refused: the Rust decoder silently drops them (or overflows
    past 2**32), which would make a token vanish from the text without a trace.
    """
    if isinstance(ids, list) and all(type(i) is int for i in ids):
        out = ids
    else:
        array = np.asarray(ids)
        if array.size == 0:
            return []
        if array.ndim != 1:
            raise ValueError(f"decode needs a 1-D sequence of ids, got shape {array.shape}")
        if array.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
        out = array.tolist()
    if out and min(out) < 0:
        raise ValueError(f"token ids must be non-negative, got {min(out)}")
    if out and max(out) >= vocab_size:
        raise ValueError(f"token id {max(out)} is outside the vocabulary of {vocab_size}")
    return out


def _has_surrogates(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _bad_text(text: object, *, where: str) -> Exception:
    """The error for a text Rust cannot take: a ValueError for surrogates, else a TypeError."""
    if _has_surrogates(text):
        return ValueError(
            f"{where} holds unpaired surrogate code points (e.g. '\\ud800'), which are not "
            "valid Unicode and cannot be tokenized; decode the source bytes with "
            "errors='replace' or clean the text first"
        )
    return TypeError(f"{where} must be a str, not {type(text).__name__}")


def _first_line(err: BaseException) -> str:
    message = str(err).strip()
    return message.splitlines()[0] if message else type(err).__name__
