"""The scheduler alone: budgets, order, chunked prefill, KV reservations (no tensors)."""

from __future__ import annotations

import pytest

from mer.engine.scheduler import Scheduler, SchedulerConfig
from mer.engine.sequence import Sequence, Status
from mer.sampling import SamplingParams


def seq(i: int, prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(i, list(range(1, prompt + 1)), SamplingParams(), max_tokens)


def feed(plan):
    for s, n in plan:
        s.n_fed += n
        if not s.pending:  # as the engine does once a sequence's tokens are all fed
            s.output_ids.append(7)


def test_decodes_first_then_prefill_chunks_then_admissions():
    sched = Scheduler(SchedulerConfig(max_batch_tokens=10, prefill_chunk=4), context=1024)
    a, b, c = seq(0, 3), seq(1, 9), seq(2, 5)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 3), (1, 4), (2, 3)]  # budget 10
    feed(plan)
    plan = sched.schedule()  # a decodes; b and c continue their prefill, chunked
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1), (1, 4), (2, 2)]
    feed(plan)
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1), (2, 1), (1, 1)]


def test_a_long_prompt_never_takes_more_than_a_chunk_per_step():
    sched = Scheduler(SchedulerConfig(max_batch_tokens=64, prefill_chunk=8), context=4096)
    short, long = seq(0, 2), seq(1, 1000)
    sched.add(short)
    sched.add(long)
    for _ in range(20):
        plan = dict((s.seq_id, n) for s, n in sched.schedule())
        assert plan.get(1, 0) <= 8 and 0 in plan  # the short one is served every step
        feed([(s, n) for s, n in ((short, plan[0]), (long, plan.get(1, 0))) if n])


def test_kv_budget_holds_back_admission_oldest_first():
    sched = Scheduler(SchedulerConfig(kv_budget_tokens=100), context=1024)
    big, small = seq(0, 60, 30), seq(1, 5, 5)  # needs 90, then 10
    other = seq(2, 50, 10)  # needs 60: does not fit beside big
    for s in (big, other, small):
        sched.add(s)
    plan = sched.schedule()
    assert [s.seq_id for s, _ in plan] == [0]  # `other` waits, and `small` behind it
    assert other.status is Status.WAITING and small.status is Status.WAITING
    sched.finish(big, "length")
    assert [s.seq_id for s, _ in sched.schedule()] == [2, 1]


def test_max_seqs_and_reservations_released():
    sched = Scheduler(SchedulerConfig(max_seqs=2), context=1024)
    seqs = [seq(i, 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule()) == 2
    sched.finish(seqs[0], "stop")
    assert seqs[0].status is Status.FINISHED and seqs[0].finish_reason == "stop"
    assert [s.seq_id for s, _ in sched.schedule()][-1] == 2


def test_context_caps_the_reservation_and_too_big_is_refused():
    sched = Scheduler(SchedulerConfig(kv_budget_tokens=64), context=32)
    s = seq(0, 10, 1000)
    assert sched.need(s) == 32
    sched.add(s)
    with pytest.raises(ValueError, match="KV budget"):
        Scheduler(SchedulerConfig(kv_budget_tokens=16), context=32).add(seq(1, 10, 100))


def test_stop_strings_are_cut_and_held_back():
    import mer
    from mer.models.sources import resolve_model
    from mer.tokenizer import Tokenizer

    tok: Tokenizer = mer.load_model(resolve_model(None)).tokenizer
    s = Sequence(0, [1], SamplingParams(), 100, stop_strings=("END",), tokenizer=tok)
    shown = ""
    for token in tok.encode("hello there, then E"):
        shown += s.add_token(token)
    assert shown.endswith("then ") and "E" not in shown  # "E" may begin "END": held back
    for token in tok.encode("ND of it"):
        shown += s.add_token(token)
        if s.finish_reason:
            break
    assert s.finish_reason == "stop" and shown == "hello there, then " and s.text == shown
