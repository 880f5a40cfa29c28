"""Which sequences run in the next step, and with how many tokens each. Never touches tensors.

Each step has a token budget (`max_batch_tokens`). Running sequences that are decoding come
first, one token each, so that streams keep flowing; then sequences still prefilling get a
chunk of their prompt (at most `prefill_chunk` tokens per sequence per step, so a long prompt
cannot stall the others for more than that); then waiting sequences are admitted, oldest
first, while the budget, the sequence limit (`max_seqs`) and the KV budget allow. A sequence
reserves KV room for its whole possible length (prompt + max_tokens, within the context) when
it is admitted, so a running sequence never runs out of it.

With the prefix cache on (`prefix_cache`), admission also looks up the longest cached prefix
of the sequence's tokens (`mer.engine.prefix`): the sequence starts with those tokens counted
as fed (`n_fed`, `cached_tokens`), the engine copying their keys and values into its new KV
cache, and the blocks stay pinned until it ends. The positions the prefix cache holds count
against the KV budget together with the reservations: to admit a sequence, least recently
used blocks are evicted for room, never pinned ones (the sequence waits while those are in
the way), preferring to keep the blocks it would itself be seeded from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mer.engine.prefix import Block, PrefixCache
from mer.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512  # tokens fed in one step, all sequences together
    max_seqs: int = 16  # sequences running at once
    prefill_chunk: int = 256  # prompt tokens of one sequence in one step
    kv_budget_tokens: int = 1 << 16  # KV positions: reservations and the prefix cache, together
    prefix_cache: bool = True  # reuse the keys and values of cached prompt prefixes

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_seqs", "prefill_chunk", "kv_budget_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class Scheduler:
    """Waiting and running queues and the step plan (module docstring)."""

    def __init__(self, config: SchedulerConfig, context: int) -> None:
        self.config = config
        self.context = context  # the model's context: no sequence grows past it
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._reserved: dict[int, int] = {}  # seq_id -> KV positions reserved
        self.prefix = PrefixCache() if config.prefix_cache else None
        self._seeds: dict[int, list[Block]] = {}  # seq_id -> cached blocks it starts with

    @property
    def reserved_tokens(self) -> int:
        """KV positions reserved by running sequences."""
        return sum(self._reserved.values())

    @property
    def held_tokens(self) -> int:
        """KV positions held by the prefix cache."""
        return self.prefix.held_tokens if self.prefix is not None else 0

    def prefix_room(self) -> int:
        """KV positions the prefix cache may hold beside the reservations."""
        return self.config.kv_budget_tokens - self.reserved_tokens

    def seed_blocks(self, seq: Sequence) -> list[Block]:
        """The cached blocks `seq` was admitted with (its first `n_fed` tokens at admission)."""
        return self._seeds.get(seq.seq_id, [])

    def need(self, seq: Sequence) -> int:
        """KV positions `seq` may use at most."""
        return min(len(seq.prompt_ids) + seq.max_tokens, self.context)

    def add(self, seq: Sequence) -> None:
        if self.need(seq) > self.config.kv_budget_tokens:
            raise ValueError(
                f"a sequence of up to {self.need(seq)} tokens does not fit the KV budget of "
                f"{self.config.kv_budget_tokens}"
            )
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, tokens to feed it), decoding ones first."""
        budget = self.config.max_batch_tokens
        plan: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if not seq.prefilling and budget > 0:
                plan.append((seq, seq.pending))
                budget -= seq.pending
        for seq in self.running:
            if seq.prefilling and budget > 0:
                n = min(seq.pending, self.config.prefill_chunk, budget)
                plan.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_seqs:
            seq = self.waiting[0]
            seeds = self._room_for(seq)
            if seeds is None:
                break  # oldest first: a large request is not starved by smaller later ones
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._reserved[seq.seq_id] = self.need(seq)
            if seeds:
                self._seeds[seq.seq_id] = seeds
                seq.n_fed = len(seeds) * self.prefix.block_size
                seq.cached_tokens = min(seq.n_fed, len(seq.prompt_ids))
            n = min(seq.pending, self.config.prefill_chunk, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def _room_for(self, seq: Sequence) -> list[Block] | None:
        """Make KV room for `seq`, evicting prefix blocks if need be: the cached blocks it
        starts with (pinned, counted), or None when it does not fit now."""
        room = self.prefix_room() - self.need(seq)  # what the prefix cache may keep
        prefix = self.prefix
        if prefix is None:
            return [] if room >= 0 else None
        if room < prefix.pinned_tokens:
            return None  # the room is taken by reservations and blocks in use
        seeds = prefix.match(seq.tokens)
        if prefix.held_tokens > room:
            prefix.evict(prefix.held_tokens - room, keep=seeds)
        if prefix.held_tokens > room:  # its own blocks must go too
            prefix.evict(prefix.held_tokens - room)
            seeds = prefix.match(seq.tokens)
        prefix.acquire(seeds, len(seq.tokens))
        return seeds

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (running or waiting) with `reason`, releasing its KV reservation and its
        pins on prefix blocks."""
        seq.finish_reason = seq.finish_reason or reason
        seq.status = Status.FINISHED
        self._reserved.pop(seq.seq_id, None)
        seeds = self._seeds.pop(seq.seq_id, None)
        if seeds:
            self.prefix.release(seeds)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
