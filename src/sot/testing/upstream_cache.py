"""Prompt-cache accounting of the test upstream's Messages API, after Anthropic's `cache_control` rules.

A request is a sequence of content blocks (the system blocks, then each message's blocks, in order); a block
with `cache_control` is a breakpoint (at most 4). At each breakpoint the prefix up to and including that
block is written to the cache. A request reads the longest prefix found in the cache whose end is a block
boundary at most 20 blocks before one of its breakpoints; `cache_read_input_tokens` counts that prefix,
`cache_creation_input_tokens` the tokens after it up to the last breakpoint, and `input_tokens` the rest.
Prefixes are keyed by the model and the exact content of every block. Entries are written when a request
arrives (not when its answer starts, as Anthropic's are) and never expire: concurrent requests that arrive
after the first one with the same prefix read it. A token is a whitespace-separated word, as elsewhere in
the test upstream.

>>> cache = PromptCache()
>>> blocks = [Block(b"system:Be brief.", 2, True), Block(b"user:Why is the sky blue?", 5, True)]
>>> cache.account("m", blocks)
CacheUsage(input_tokens=0, cache_creation_input_tokens=7, cache_read_input_tokens=0)
>>> cache.account("m", [*blocks, Block(b"assistant:1.", 1, False)])
CacheUsage(input_tokens=1, cache_creation_input_tokens=0, cache_read_input_tokens=7)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

LOOKBACK_BLOCKS = 20
MAX_BREAKPOINTS = 4


@dataclass(frozen=True, slots=True)
class Block:
    """One content block: what identifies its content, its length in tokens, and whether it is a breakpoint."""

    key: bytes
    tokens: int
    marked: bool


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """The three parts of a request's prompt tokens."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class PromptCache:
    """The prefixes written so far (one server's, until its stats are reset)."""

    def __init__(self) -> None:
        self._entries: set[bytes] = set()
        self.reads = 0  # requests that read a prefix
        self.writes = 0  # requests that wrote one

    def __len__(self) -> int:
        return len(self._entries)

    def account(self, model: str, blocks: Sequence[Block]) -> CacheUsage:
        """Look the request's prefixes up, write those at its breakpoints, and split its prompt tokens."""
        digests: list[bytes] = []
        totals: list[int] = []
        running = hashlib.blake2b(model.encode(), digest_size=16)
        total = 0
        for block in blocks:
            running.update(len(block.key).to_bytes(8, "big") + block.key)
            digests.append(running.copy().digest())
            total += block.tokens
            totals.append(total)
        marks = [i for i, block in enumerate(blocks) if block.marked]
        read_end = -1
        for mark in marks:
            for end in range(mark, max(-1, mark - LOOKBACK_BLOCKS), -1):
                if digests[end] in self._entries:
                    read_end = max(read_end, end)
                    break
        last = marks[-1] if marks else -1
        read = totals[read_end] if read_end >= 0 else 0
        written = totals[last] - read if last > read_end else 0
        self._entries.update(digests[mark] for mark in marks)
        self.reads += read > 0
        self.writes += written > 0
        return CacheUsage(total - read - written, written, read)
