"""The engine: sequences in, tokens out, one batched step at a time.

`step()` asks the scheduler which sequences run and with how many tokens, feeds all of them
through the model in one batched forward pass (`Transformer.step`: every matmul, router and
expert on all the tokens at once), then samples a token for each sequence whose tokens have
all been fed, and ends sequences on a stop id or stop string, max_tokens, or a full context.
Each sequence samples with its own seeded generator and the forward pass is batch-invariant,
so a sequence gets the same tokens alone or beside any others.
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
from mer.sampling import SamplingParams


@dataclass(frozen=True)
class Event:
    """What one step did for one sequence: the token it sampled (None while prefilling), the
    text that is now safe to show, and its finish reason once it ends."""

    seq: Sequence
    token: int | None
    text: str
    finish_reason: str | None


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
    ) -> Sequence:
        """Queue a generation; the model's end-of-sequence ids stop it unless `stop_ids`
        says otherwise. `resume_ids`: tokens this generation already produced (before a
        restart): they are fed after the prompt and generation goes on from there, drawing
        what it would have drawn (a seed is then needed for sampled generations)."""
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
        if resume_ids:
            seq.resume(list(resume_ids))
        if len(seq.output_ids) >= max_tokens:
            seq.status, seq.finish_reason = Status.FINISHED, "length"
            return seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop `seq` now; its KV cache is freed."""
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")
            seq.cache = None

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
            batch.append((np.asarray(seq.tokens[seq.n_fed : seq.n_fed + n]), seq.cache))
        logits = self.model.forward_batch(batch)
        events = []
        for (seq, n), row in zip(plan, logits, strict=True):
            seq.n_fed += n
            if seq.pending:  # more of the prompt to feed
                events.append(Event(seq, None, "", None))
                continue
            events.append(self._sample(seq, row[-1]))
        return events

    def _sample(self, seq: Sequence, logits: np.ndarray) -> Event:
        if self.keep_logits:
            seq.logits.append(logits.copy())
        token = seq.sampler.sample(logits, seq.tokens)
        if token in seq.stop_ids:
            return self._finish(seq, None, "", "stop")
        text = seq.add_token(token)
        if seq.finish_reason == "stop":  # a stop string
            return self._finish(seq, token, text, "stop")
        if len(seq.output_ids) >= seq.max_tokens:
            return self._finish(seq, token, text, "length")
        if len(seq.tokens) >= self.model.args.max_seq_len:
            return self._finish(seq, token, text, "context")
        return Event(seq, token, text, None)

    def _finish(self, seq: Sequence, token: int | None, text: str, reason: str) -> Event:
        self.scheduler.finish(seq, reason)
        seq.cache = None
        return Event(seq, token, text + seq.flush_text(), seq.finish_reason)

    def run(self) -> Iterator[Event]:
        """Step until every sequence has finished."""
        while self.has_work():
            yield from self.step()
