"""The engine: sequences in, tokens out, one batched step at a time.

`step()` asks the scheduler which sequences run and with how many tokens, feeds all of them
through the model in one batched forward pass (`Transformer.step`: every matmul, router and
expert on all the tokens at once), then samples a token for each sequence whose tokens have
all been fed, and ends sequences on a stop id or stop string, max_tokens, or a full context.
Each sequence samples with its own seeded generator and the forward pass is batch-invariant,
so a sequence gets the same tokens alone or beside any others.

With the prefix cache on (`SchedulerConfig.prefix_cache`, `mer.engine.prefix`), a sequence
admitted with a cached prefix gets a KV cache seeded with copies of those blocks' keys and
values and feeds only the rest; once its prompt has been fed, and again when it ends, the full
blocks of its fed tokens (generated ones included) are added to the cache, so the next turn
of a conversation finds the previous answer there too. Batch invariance makes the reused rows
exactly those the sequence would have computed: tokens and logits are the same either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from mer.engine.scheduler import Scheduler, SchedulerConfig
from mer.engine.sequence import Sequence, Status
from mer.models.transformer import KVCache
from mer.sampling import SamplingParams, log_probs


@dataclass(frozen=True)
class Event:
    """What one step did for one sequence: the token it sampled (None while prefilling), the
    text that is now safe to show, and its finish reason once it ends."""

    seq: Sequence
    token: int | None
    text: str
    finish_reason: str | None
    # with params.logprobs set: the sampled token's log-probability and the most likely
    # alternatives [(id, log-probability)]
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def compile_grammar(spec: dict, tokenizer):
    """The grammar a request's output must follow (`mer.structured`), from what the api sends:
    {"response_format": {...}} (OpenAI's), {"tool": {...}} (the arguments of a named tool
    call) or {"tools": [...]} (a call to any of them: {"name": .., "arguments": {..}}).
    Raises SchemaError (a ParamError naming the field) for a schema that cannot be one."""
    from mer.structured import compile_response_format, compile_tool_arguments, compile_tool_call

    if "response_format" in spec:
        return compile_response_format(spec["response_format"], tokenizer)
    if "tool" in spec:
        return compile_tool_arguments(spec["tool"], tokenizer)
    return compile_tool_call(spec["tools"], tokenizer)


class Engine:
    """Runs many sequences through `model` (a mer Model) in batched steps."""

    def __init__(
        self, model, config: SchedulerConfig | None = None, keep_logits: bool = False
    ) -> None:
        self.model = model
        self.scheduler = Scheduler(config or SchedulerConfig(), model.args.max_seq_len)
        self.keep_logits = keep_logits  # each sequence keeps the logits it sampled from
        self._ids = itertools.count()

    def submit(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        max_tokens: int = 256,
        stop_ids: frozenset[int] | None = None,
        stop_strings: Seq[str] = (),
        seq_id: int | None = None,
        resume_ids: Seq[int] = (),
        grammar=None,
    ) -> Sequence:
        """Queue a generation; the model's end-of-sequence ids stop it unless `stop_ids`
        says otherwise. `resume_ids`: tokens this generation already produced (before a
        restart): they are fed after the prompt and generation goes on from there, drawing
        what it would have drawn (a seed is then needed for sampled generations).
        `grammar` (a `mer.structured.Grammar`): each token is drawn among those it allows,
        and the generation stops when the grammar is complete."""
        tok = self.model.tokenizer
        if stop_ids is None:
            stop_ids = tok.eos_token_ids if tok else frozenset()
        seq = Sequence(
            seq_id=next(self._ids) if seq_id is None else seq_id,
            prompt_ids=list(prompt_ids),
            params=params or SamplingParams(),
            max_tokens=max_tokens,
            stop_ids=frozenset(stop_ids),
            stop_strings=tuple(stop_strings),
            tokenizer=tok,
        )
        if grammar is not None:
            seq.matcher = grammar.matcher()
            for token in resume_ids:
                seq.matcher.advance(token)
        if resume_ids:
            seq.resume(list(resume_ids))
        if len(seq.output_ids) >= max_tokens:
            seq.status, seq.finish_reason = Status.FINISHED, "length"
            return seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop `seq` now; its KV cache is freed (its full blocks kept in the prefix cache)."""
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")
            self._keep_prefix(seq)
            seq.cache = None

    def figures(self) -> dict:
        """Sequences running and waiting, KV use (reservations and the prefix cache, over the
        KV budget) and the prefix cache's counters (tokens looked up, found, held)."""
        sched, prefix = self.scheduler, self.scheduler.prefix
        reserved, held = sched.reserved_tokens, sched.held_tokens
        return {
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "kv_usage": (reserved + held) / sched.config.kv_budget_tokens,
            "kv_reserved_tokens": reserved,
            "prefix_queries_tokens": prefix.queries_tokens if prefix is not None else 0,
            "prefix_hits_tokens": prefix.hits_tokens if prefix is not None else 0,
            "prefix_held_tokens": held,
        }

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Event]:
        """One batched forward pass and the tokens it yields."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        batch = []
        for seq, n in plan:
            if seq.cache is None:
                seq.cache = KVCache(self.model.args)
                seeds = self.scheduler.seed_blocks(seq)
                if seeds:  # admitted with a cached prefix: n_fed already counts it
                    self.scheduler.prefix.seed(seeds, seq.cache)
            batch.append((np.asarray(seq.tokens[seq.n_fed : seq.n_fed + n]), seq.cache))
        logits = self.model.forward_batch(batch)
        events = []
        for (seq, n), row in zip(plan, logits, strict=True):
            prefilling = seq.prefilling
            seq.n_fed += n
            if prefilling and not seq.prefilling:  # its prompt is in: cache its blocks
                self._keep_prefix(seq)
            if seq.pending:  # more of the prompt to feed
                events.append(Event(seq, None, "", None))
                continue
            events.append(self._sample(seq, row[-1]))
        return events

    def _sample(self, seq: Sequence, logits: np.ndarray) -> Event:
        if self.keep_logits:
            seq.logits.append(logits.copy())
        raw = logits
        if seq.matcher is not None:  # only what the grammar allows next
            logits = logits.copy()
            seq.matcher.mask_logits(logits)
        token = seq.sampler.sample(logits, seq.tokens)
        scored = {}
        if seq.params.logprobs is not None:
            logprob, top = log_probs(raw, token, seq.params.logprobs)
            scored = {"logprob": logprob, "top_logprobs": tuple(top)}
        if token in seq.stop_ids:
            return self._finish(seq, None, "", "stop")
        if seq.matcher is not None:
            seq.matcher.advance(token)
        text = seq.add_token(token)
        if seq.finish_reason == "stop" or (seq.matcher is not None and seq.matcher.done):
            # a stop string, or the grammar is complete
            return self._finish(seq, token, text, "stop", scored)
        if len(seq.output_ids) >= seq.max_tokens:
            return self._finish(seq, token, text, "length", scored)
        if len(seq.tokens) >= self.model.args.max_seq_len:
            return self._finish(seq, token, text, "context", scored)
        return Event(seq, token, text, None, **scored)

    def _finish(
        self, seq: Sequence, token: int | None, text: str, reason: str, scored: dict | None = None
    ) -> Event:
        self.scheduler.finish(seq, reason)
        self._keep_prefix(seq)
        seq.cache = None
        return Event(seq, token, text + seq.flush_text(), seq.finish_reason, **(scored or {}))

    def _keep_prefix(self, seq: Sequence) -> None:
        """Add the full blocks of the tokens `seq` has fed to the prefix cache, within the
        KV budget left beside the reservations."""
        prefix = self.scheduler.prefix
        if prefix is not None and seq.cache is not None:
            prefix.insert(seq.tokens, seq.cache, self.scheduler.prefix_room())

    def run(self) -> Iterator[Event]:
        """Step until every sequence has finished."""
        while self.has_work():
            yield from self.step()
