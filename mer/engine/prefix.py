"""Prefix caching: keys and values that earlier sequences computed, kept in blocks of tokens so
that a sequence beginning the same way (a shared system prompt, the previous turns of a
conversation) starts from them instead of feeding those tokens through the model again.

Tokens are cut into blocks of `BLOCK_SIZE`; only full blocks are kept. A block's key is a hash
(BLAKE2b, 128 bits) of its parent's key and its own tokens, so a key stands for the whole
prefix up to the end of its block; a block also keeps its tokens and its parent, and a lookup
checks both. A block holds a copy of its positions' keys and values, float32 [layers,
BLOCK_SIZE, G, hd] each: the forward pass is batch-invariant, so those rows are, bit for bit,
what the sequence reusing them would have computed itself.

`match` finds the longest chain of cached blocks a sequence begins with, leaving at least its
last token to be fed (its logits are needed). `acquire` pins the blocks a sequence is seeded
from until `release` (its end): a pinned block is never evicted. `insert` adds the full blocks
of a sequence's fed tokens, `seed` copies blocks into a new KVCache. `evict` drops blocks least
recently used first, a block only once no cached block continues it: every use touches a chain
from its last block back to its first, so a parent is always more recent than its children.
Socket-free and budget-free: the scheduler says how many positions the cache may hold.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mer.models.transformer import KVCache

BLOCK_SIZE = 16  # tokens per block


@dataclass(eq=False)
class Block:
    """One cached block: its tokens, the block before it, and its positions' keys and values."""

    key: bytes
    parent: Block | None
    tokens: tuple[int, ...]
    k: np.ndarray  # float32 [layers, BLOCK_SIZE, G, hd]
    v: np.ndarray | None  # None when the values are views of the keys (latent attention)
    refs: int = 0  # running sequences seeded from it (pinned while above 0)
    children: int = 0  # cached blocks that continue it


def block_key(parent: Block | None, tokens: Sequence[int]) -> bytes:
    """The key of the block holding `tokens` after `parent` (None: the first block)."""
    data = np.asarray(tokens, dtype="<i8").tobytes()
    return hashlib.blake2b((parent.key if parent else b"") + data, digest_size=16).digest()


class PrefixCache:
    """Cached blocks by key, least recently used first (module docstring)."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._pinned = 0  # blocks with refs > 0
        self.queries_tokens = 0  # tokens of admitted sequences looked up
        self.hits_tokens = 0  # of those, tokens that came from the cache

    @property
    def held_blocks(self) -> int:
        return len(self._blocks)

    @property
    def held_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    @property
    def pinned_tokens(self) -> int:
        """Positions held by blocks that running sequences were seeded from."""
        return self._pinned * self.block_size

    def __contains__(self, block: Block) -> bool:
        return self._blocks.get(block.key) is block

    def match(self, tokens: Sequence[int]) -> list[Block]:
        """The cached blocks `tokens` begin with, longest chain first to last, short of the
        last token. Touches nothing."""
        bs = self.block_size
        chain: list[Block] = []
        parent = None
        for i in range((len(tokens) - 1) // bs):
            block = self._get(parent, tokens[i * bs : (i + 1) * bs])
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def acquire(self, blocks: list[Block], queried: int) -> None:
        """A sequence of `queried` tokens is seeded from `blocks` (from `match`): pin and
        touch them, and count the lookup."""
        for block in blocks:
            if block.refs == 0:
                self._pinned += 1
            block.refs += 1
        self._touch(blocks)
        self.queries_tokens += queried
        self.hits_tokens += len(blocks) * self.block_size

    def release(self, blocks: Iterable[Block]) -> None:
        """The sequence seeded from `blocks` has ended."""
        for block in blocks:
            block.refs -= 1
            if block.refs == 0:
                self._pinned -= 1

    def seed(self, blocks: list[Block], cache: KVCache) -> int:
        """Copy `blocks` (a chain from the first) into the empty `cache`; the positions
        filled."""
        if cache.length:
            raise ValueError("seed: the cache is not empty")
        if not blocks:
            return 0
        n = len(blocks) * self.block_size
        cache.reserve(n)
        for layer in range(len(cache.k)):
            cache.k[layer][:n] = np.concatenate([b.k[layer] for b in blocks])
            if not cache.shared_values:
                cache.v[layer][:n] = np.concatenate([b.v[layer] for b in blocks])
        cache.length = n
        return n

    def insert(self, tokens: Sequence[int], cache: KVCache, limit: int) -> int:
        """Keep the full blocks of `tokens` whose keys and values are in `cache` (its first
        `cache.length` positions), holding at most `limit` positions: other blocks are evicted
        for room, and blocks that still do not fit are not kept. The blocks now cached."""
        bs = self.block_size
        chain: list[Block] = []
        parent = None
        for i in range(min(cache.length, len(tokens)) // bs):
            piece = tuple(int(t) for t in tokens[i * bs : (i + 1) * bs])
            key = block_key(parent, piece)
            block = self._blocks.get(key)
            if block is not None and (block.parent is not parent or block.tokens != piece):
                break  # another prefix with the same key (never seen): keep that one
            if block is None:
                over = self.held_tokens + bs - limit
                if over > 0 and self.evict(over, keep=chain) < over:
                    break
                rows = slice(i * bs, (i + 1) * bs)
                k = np.stack([k[rows] for k in cache.k])
                v = None if cache.shared_values else np.stack([v[rows] for v in cache.v])
                block = self._blocks[key] = Block(key, parent, piece, k, v)
                if parent is not None:
                    parent.children += 1
            chain.append(block)
            parent = block
        self._touch(chain)
        return len(chain)

    def evict(self, tokens: int, keep: Iterable[Block] = ()) -> int:
        """Drop unpinned blocks that no cached block continues, least recently used first,
        until `tokens` positions are freed or none is left to drop (those in `keep` stay).
        The positions freed."""
        keep_ids = {id(b) for b in keep}
        freed = 0
        # one pass: a parent comes after its children in this order (module docstring)
        for block in list(self._blocks.values()):
            if freed >= tokens:
                break
            if block.refs or block.children or id(block) in keep_ids:
                continue
            del self._blocks[block.key]
            if block.parent is not None:
                block.parent.children -= 1
            freed += self.block_size
        return freed

    def _get(self, parent: Block | None, tokens: Sequence[int]) -> Block | None:
        block = self._blocks.get(block_key(parent, tokens))
        if block is None or block.parent is not parent or block.tokens != tuple(tokens):
            return None
        return block

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # the first block ends most recent
            self._blocks.move_to_end(block.key)
