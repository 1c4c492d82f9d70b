"""The KV cache for decoding: keys and values of every layer, preallocated once and filled in place.

Each row (one sequence) has its own filled length, so the rows of one batch may sit at different
positions: the inference engine (inference/engine.py) decodes requests of different lengths
together, one row per request. A forward through the model asks the cache where its new tokens go
(`begin`), each layer writes its keys and values there (`update`), and the lengths move on at the
end (`advance`). When every row has the same length (one prompt, or a batch in lockstep) the new
tokens go to one slice of all rows, the same fast path as a cache with a single length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Preallocated keys and values for every layer; row b holds `lengths[b]` filled positions."""

    keys: torch.Tensor  # (L, B, KVH, max_len, D); in the compiled step, one (B, KVH, max_len, D) per layer
    values: torch.Tensor  # (L, B, KVH, max_len, D); likewise
    lengths: torch.Tensor = None  # (B,) int64 on the CPU: plain numbers, read without a device sync
    # where the current forward's tokens go: an int (every row starts there) or (B, T) positions
    _write_at: int | torch.Tensor | None = field(default=None, repr=False)
    _num_new: int = field(default=0, repr=False)
    _end: int = field(default=0, repr=False)  # the longest row's length once the current forward is done

    def __post_init__(self) -> None:
        if self.lengths is None:
            self.lengths = torch.zeros(self.keys.shape[1], dtype=torch.long)

    @classmethod
    def allocate(cls, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device, dtype) -> KVCache:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @classmethod
    def at_positions(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: torch.Tensor,
                     end: int) -> KVCache:
        """A cache for one forward of a token per row at `positions` (n, 1) in the first n rows of
        `keys`/`values`, one tensor (B, KVH, max_len, D) per layer, attending to the first `end`
        positions (what `begin` sets up for rows at different lengths): the compiled decode step
        (inference/compiled.py) builds it inside its graph. Its lengths are the positions, not the
        cache's own. One tensor per layer, written whole: Inductor then updates them in place, where a
        write into a slice of one (L, B, ...) tensor copies all of it every step."""
        cache = cls(keys, values, positions[:, 0])
        cache._write_at, cache._num_new, cache._end = positions, 1, end
        return cache

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def length(self) -> int:
        """The filled length of a cache whose rows all have the same length."""
        if self.batch_size > 1 and not bool((self.lengths == self.lengths[0]).all()):
            raise ValueError(f"the rows of this cache have different lengths {self.lengths.tolist()}")
        return int(self.lengths[0])

    @length.setter
    def length(self, value: int) -> None:
        self.lengths.fill_(value)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own that shares storage (and lengths) with this one:
        what a forward through the view writes lands in this cache."""
        return KVCache(self.keys[:, start:stop], self.values[:, start:stop], self.lengths[start:stop])

    def copy_row(self, source: int, target: int) -> None:
        """Make row `target` a copy of row `source` (its filled part)."""
        filled = int(self.lengths[source])
        self.keys[:, target, :, :filled] = self.keys[:, source, :, :filled]
        self.values[:, target, :, :filled] = self.values[:, source, :, :filled]
        self.lengths[target] = filled

    def begin(self, num_new: int) -> int | torch.Tensor:
        """Where the next `num_new` tokens of each row go: an int when every row is at the same
        length, else their positions, (B, num_new) on the cache's device. Refuses to overflow."""
        end = int(self.lengths.max()) + num_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self._end = end
        start = int(self.lengths[0])
        if bool((self.lengths == start).all()):
            self._write_at = start
        else:
            positions = self.lengths[:, None] + torch.arange(num_new)  # (B, T)
            self._write_at = positions.to(self.keys.device, non_blocking=True)
        self._num_new = num_new
        return self._write_at

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KVH, T, D) where `begin` said; return keys and values (B, KVH, S, D) up to
        the longest row's end (shorter rows' extra positions are for the attention mask to hide).
        The writes index the layer's whole tensor (rows 0..B-1 of it), never a slice of its rows,
        which the compiled step needs (`at_positions`)."""
        keys, values = self.keys[layer], self.values[layer]  # (rows, KVH, max_len, D)
        if isinstance(self._write_at, int):
            end = self._write_at + k.shape[2]
            keys[:, :, self._write_at:end] = k
            values[:, :, self._write_at:end] = v
        else:
            end = self._end
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            # advanced indices around a slice put their dims first: the target is (B, T, KVH, D)
            keys[rows, :, self._write_at] = k.transpose(1, 2)
            values[rows, :, self._write_at] = v.transpose(1, 2)
        num_rows = k.shape[0]  # all of them, except in the compiled step's cache
        return keys[:num_rows, :, :end], values[:num_rows, :, :end]

    def advance(self) -> None:
        """The forward is done: every row grew by the tokens `begin` placed."""
        self.lengths += self._num_new
        self._write_at, self._num_new = None, 0
