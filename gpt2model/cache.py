"""The fixed-size KV cache: a pytree of preallocated arrays plus a write index.

Every step writes its keys/values in place with `lax.dynamic_update_slice` and returns a cache of
the same type and shapes, so a jitted decode step compiles once per (batch, cache length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gpt2model.config import GPT2Config


@struct.dataclass
class KVCache:
    """Per-layer keys/values and the bookkeeping needed for left-padded batches.

    keys, values: one [B, H, S, D] array per layer (S = cache length). Heads lead the slots so
      attention reads the cache as [B*H] contiguous matrices: a [B, S, H, D] cache needs a
      transposed copy of every layer's keys and values each decode step (BENCHMARKS.md, "Design
      measurements").
    mask:  [B, S] bool, True where a slot holds a real token (pads and unwritten slots are False).
    index: [] int32, the next slot to write; the same for every row.
    position: [B] int32, the position id the next real token of each row gets.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    position: jax.Array

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def init_cache(config: GPT2Config, batch_size: int, max_length: int | None = None,
               dtype: jnp.dtype = jnp.float32) -> KVCache:
    """Allocate an empty cache; max_length defaults to the model's context (n_positions)."""
    length = config.n_positions if max_length is None else max_length
    if not 0 < length <= config.n_positions:
        raise ValueError(f"cache length {length} must be in 1..n_positions={config.n_positions}")
    shape = (batch_size, config.n_head, length, config.head_dim)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
        mask=jnp.zeros((batch_size, length), bool),
        index=jnp.zeros((), jnp.int32),
        position=jnp.zeros((batch_size,), jnp.int32),
    )


def write(cache_kv: jax.Array, new_kv: jax.Array, index: jax.Array) -> jax.Array:
    """Write new [B, H, T, D] entries at slot `index` of a [B, H, S, D] layer cache, in place."""
    return jax.lax.dynamic_update_slice(cache_kv, new_kv.astype(cache_kv.dtype), (0, 0, index, 0))
