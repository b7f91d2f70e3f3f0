"""Values built once per key and kept within a byte budget: the encoded views of one snapshot."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedMemo(Generic[K, V]):
    """`build()` once per key; past `max_bytes` (by `size`), the oldest entries are dropped.

    Bounded in bytes whatever clients ask for: each view is bounded by its page limit, and
    the memo by `max_bytes` plus the one entry just built. Lives as long as the snapshot it
    holds views of, so nothing in it is ever out of date.
    """

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._held: dict[K, V] = {}
        self._bytes = 0

    def get(self, key: K, build: Callable[[], V]) -> V:
        held = self._held.get(key)
        if held is not None:
            return held
        value = build()
        self._held[key] = value
        self._bytes += self._size(value)
        while self._bytes > self.max_bytes and len(self._held) > 1:
            oldest = next(iter(self._held))
            self._bytes -= self._size(self._held.pop(oldest))
        return value

    def __len__(self) -> int:
        return len(self._held)
