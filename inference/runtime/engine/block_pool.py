"""The KV cache's blocks, as vLLM's automatic prefix caching keeps them.

The cache is `num_blocks` blocks of `block_size` positions. A sequence holds a block table: its positions
p live in block table[p // block_size] at offset p % block_size. Blocks are handed out as a sequence
grows, so memory follows the tokens actually held.

A block whose positions are all computed is registered under a hash chained over token ids:
h_i = sha256(h_{i-1} || ids of block i), so equal hashes mean equal whole prefixes, not just equal blocks.
A new request walks its prompt's full blocks and reuses every block found (a system prompt, few-shot
examples, a conversation so far). A block no sequence holds stays cached, in least-recently-released
order, and is evicted only when a free block is needed; a block a sequence holds is never evicted.

Admission reserves blocks: a request is admitted only if the blocks it may ever need (prompt, max_tokens
and the speculative lookahead, less the blocks it reuses) are free or evictable, so a running request can
always grow and is never preempted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def block_hashes(token_ids: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The chained hash of every full block of token_ids (a partial last block has none)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + array("q", token_ids[start : start + block_size]).tobytes()).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs >= 1 block of >= 1 position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        """Blocks no sequence holds and no hash names."""
        self.cached: OrderedDict[int, None] = OrderedDict()
        """Blocks no sequence holds that keep a prefix hash, least recently released first: evictable."""
        self.block_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.reserved = 0
        """Blocks promised to admitted sequences and not yet handed out."""
        self.draft_ready: set[int] = set()
        """Cached blocks whose positions the draft's cache holds too (the draft catches up lazily, so a block
        the target computed may not be one yet)."""
        self.never_used = set(range(num_blocks))
        self.fresh: list[int] = []
        """Blocks handed out for the first time since the last `take_fresh`: the caches are allocated
        without being written (so memory is only touched as blocks are used) and must zero these."""

    def available(self) -> int:
        """Blocks that can still be promised."""
        return len(self.free) + len(self.cached) - self.reserved

    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - len(self.free) - len(self.cached)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (nothing is taken)."""
        blocks = []
        for h in hashes:
            block = self.block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, hits: list[int], need: int) -> bool:
        """Whether a sequence reusing `hits` and needing `need` more blocks fits."""
        idle_hits = sum(1 for b in hits if self.refs[b] == 0)  # taking them makes them unevictable
        return self.available() - idle_hits >= need

    def admit(self, hits: list[int], need: int) -> None:
        assert self.can_admit(hits, need)
        for b in hits:
            if self.refs[b] == 0:
                del self.cached[b]
            self.refs[b] += 1
        self.reserved += need

    def allocate(self) -> int:
        """A block for a sequence that reserved it: a free one, else the least recently used cached one."""
        assert self.reserved > 0, "allocate() without a reservation"
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.cached.popitem(last=False)
            del self.block_of[self.hash_of.pop(block)]
        self.draft_ready.discard(block)
        self.reserved -= 1
        self.refs[block] = 1
        if block in self.never_used:
            self.never_used.discard(block)
            self.fresh.append(block)
        return block

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def register(self, block: int, h: bytes) -> None:
        """Name a held, fully computed block by its prefix hash (the first block with a hash keeps it)."""
        if h not in self.block_of and block not in self.hash_of:
            self.block_of[h], self.hash_of[block] = block, h

    def release(self, blocks: list[int], unused_reservation: int) -> None:
        """A sequence is done: drop its hold on its blocks and give back what it reserved and never took."""
        for b in reversed(blocks):  # the last blocks are the least likely to be shared: evicted first
            self.refs[b] -= 1
            assert self.refs[b] >= 0
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.cached[b] = None
                else:
                    self.free.append(b)
        self.reserved -= unused_reservation
        assert self.reserved >= 0
