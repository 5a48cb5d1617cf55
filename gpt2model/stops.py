"""Stop strings found on the device: each token's bytes in a table, a rolling byte window per row.

GPT-2's byte-level BPE makes every token a byte string and the text of a row the lossy UTF-8
decoding of their concatenation, so a stop string without U+FFFD is in the text exactly when
its UTF-8 bytes are in the byte stream. Each decode step appends the chosen token's bytes
(`token_bytes`, a [V, T] table) to the row's last M - 1 bytes and checks whether a stop string
ends inside the new token (`advance`); the row then ends at that step. The host's cut
(`generation.finish`) stays the authority for the text: the device only has to never stop a row
before the host would cut it there (see `device_stops`), and a string it does not check simply
lets the row run on, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NONE, NEVER, WILD = -1, -2, -3  # no byte (table padding, an empty window); no match; any byte
# Pattern arrays are padded to at least this many strings of this many bytes (then powers of
# two), so the usual stop strings share one shape: one decode program whatever they are.
MIN_STRINGS, MIN_BYTES = 4, 16


def _byte_decoder() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode`, inverted: the character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(tokenizer: Any, vocab: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Each token's bytes [max(vocab, V), T] int16 (NONE after its end) and their counts
    [max(vocab, V)] int32; None when the tokenizer is not a byte-level BPE read exactly.

    Checked against the tokenizer's own decoding of every single token, so a vocabulary whose
    pieces are not GPT-2's byte characters turns the device check off rather than wrong.
    """
    backend = getattr(tokenizer, "backend", None)
    n = getattr(tokenizer, "vocab_size", None)
    if backend is None or not hasattr(backend, "id_to_token") or not n:
        return None
    decoder = _byte_decoder()
    pieces = []
    for i in range(n):
        piece = backend.id_to_token(i)
        if piece is None or any(c not in decoder for c in piece):
            return None
        pieces.append(bytes(decoder[c] for c in piece))
    texts = tokenizer.decode_batch([[i] for i in range(n)])
    if any(p.decode("utf-8", "replace") != t for p, t in zip(pieces, texts, strict=True)):
        return None
    rows = max(vocab, n)
    table = np.full((rows, max(len(p) for p in pieces)), NONE, np.int16)
    counts = np.zeros(rows, np.int32)
    for i, p in enumerate(pieces):
        table[i, :len(p)] = np.frombuffer(p, np.uint8)
        counts[i] = len(p)
    return table, counts


def device_stops(stop: Sequence[str]) -> list[bytes]:
    """The stop strings the device may end rows on: none when one holds U+FFFD (a prefix's
    lossy decoding can produce it where the whole text does not); else the distinct ones not
    inside another stop string.

    Why the second rule: the host cuts the text at the earliest-starting stop string. A row
    stopped as soon as string s completes lacks only later tokens, which could complete an
    earlier-starting occurrence only of a string that contains s.
    """
    strings = list(dict.fromkeys(s for s in stop if s))
    if any("\ufffd" in s for s in strings):
        return []
    return [s.encode("utf-8") for s in strings if not any(s != t and s in t for t in strings)]


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def patterns(stop: Sequence[str], enabled: bool = True) -> np.ndarray:
    """[n, M] int16: each device stop string's bytes right-aligned after WILD; unused rows
    NEVER. n and M are bucketed (MIN_STRINGS, MIN_BYTES, then powers of two)."""
    chosen = device_stops(stop) if enabled else []
    width = _bucket(max((len(b) for b in chosen), default=1), MIN_BYTES)
    out = np.full((_bucket(len(chosen), MIN_STRINGS), width), NEVER, np.int16)
    for i, b in enumerate(chosen):
        out[i] = WILD
        out[i, width - len(b):] = np.frombuffer(b, np.uint8)
    return out


def empty_window(rows: int, pattern: np.ndarray) -> np.ndarray:
    """A window [rows, M - 1] holding no bytes yet: the prompt never counts."""
    return np.full((rows, pattern.shape[1] - 1), NONE, np.int16)


def advance(window: jax.Array, token: jax.Array, table: jax.Array, counts: jax.Array,
            pattern: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Append each row's token [B] bytes to its window [B, M - 1]: (the new window, whether a
    stop string ends inside those bytes [B]).

    A match ending at the token's byte j reads the M bytes up to it: window bytes then token
    bytes, WILD pattern bytes matching anything (an empty window included).
    """
    width = table.shape[1]
    m = pattern.shape[1]
    joined = jnp.concatenate([window, table[token]], axis=1)  # [B, M - 1 + T]
    spans = jnp.arange(width)[:, None] + jnp.arange(m)[None, :]  # [T, M]: the M bytes to j
    seen = joined[:, spans][:, None]  # [B, 1, T, M]
    want = pattern[None, :, None, :]  # [1, n, 1, M]
    match = jnp.all((want == WILD) | (seen == want), axis=-1)  # [B, n, T]
    inside = jnp.arange(width)[None, :] < counts[token][:, None]  # [B, T]
    hit = jnp.any(match & inside[:, None], axis=(1, 2))
    keep = counts[token][:, None] + jnp.arange(m - 1)[None, :]  # the last M - 1 bytes
    return jnp.take_along_axis(joined, keep, axis=1), hit
