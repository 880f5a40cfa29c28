"""A compute worker: computes its stripes of the products the engine posts on the board.

It maps the store itself (dense weights and resident experts are views of the same files as
the engine's, so the page cache holds them once), attaches the engine's board and expert
arena as the engine announces them in the runtime directory's `board` file, registers in its
slot, and then waits on its eventfd: each wake-up is a round (`mer.compute.board`). It runs
its kernels on one thread: there is a worker per core. A new engine incarnation writes a new
`board` file, which the worker notices within a heartbeat and re-attaches to.
"""

from __future__ import annotations

import json
import os
import select
import time


def main() -> None:
    from mer.actors.base import Actor
    from mer.compute.board import Board
    from mer.compute.executor import compute_stripe, my_stripes
    from mer.compute.weights import open_store_table
    from mer.kernels import matmul
    from mer.models.sources import resolve_model

    actor = Actor()
    fds = actor.spec["fds"]
    go_fd, done_fd, slot = fds["go"][actor.index], fds["done"], actor.index
    matmul.set_num_threads(1, adaptive=False)
    store = resolve_model(actor.config.model)
    args, table = open_store_table(store, stream=actor.config.cache.bytes is not None)
    _warm(args, table)
    board: Board | None = None
    seen_board, last_round = None, 0
    board_file = actor.run_dir / "board"
    poller = select.poll()
    poller.register(go_fd, select.POLLIN)
    actor.ready()
    try:
        while not actor.stopping:
            woke = poller.poll(int(actor.config.supervisor.heartbeat_s * 1000))
            announced = _announced(board_file)
            if announced and announced != seen_board:  # a new engine incarnation
                if board is not None:
                    board.close()
                board = Board.attach(announced["board"])
                table.attach_arena(announced.get("arena"))
                board.register(slot, os.getpid(), True)
                seen_board, last_round = announced, board.round
                actor.log.info("event=attached board=%s", announced["board"])
            if woke:
                os.read(go_fd, 8)
                if board is not None:
                    round_no, mask, jobs = board.jobs()
                    if round_no > last_round and mask >> slot & 1:
                        last_round = round_no
                        began = time.perf_counter_ns()
                        for job in jobs:
                            for s in my_stripes(mask, slot, job):
                                compute_stripe(board, table, job, s)
                        board.set_busy_ns(slot, time.perf_counter_ns() - began)
                        for j, job in enumerate(jobs):  # done: after the rows and the time
                            for s in my_stripes(mask, slot, job):
                                board.flags(j)[s] = round_no
                        os.write(done_fd, (1).to_bytes(8, "little"))
            actor.poll_supervisor()
            actor.beat()
    finally:
        if board is not None:
            board.register(slot, 0, False)
            board.close()
        actor.close()


def _announced(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _warm(args, table) -> None:
    """Compile the kernels the stripes will run, on one thread."""
    from types import SimpleNamespace

    from mer.kernels.warm import warm_up

    weights = SimpleNamespace(lm_head=table.dense[0], layers=table.layers, embed=None, norm=None)
    experts = []
    if table.source is not None and not any(layer.experts for layer in table.layers):
        import numpy as np

        zeros = np.zeros(table.source.slot_bytes, np.uint8)
        seen = set()
        for key in table.source.keys():
            kinds = table.source.kinds(key)
            if kinds not in seen:
                seen.add(kinds)
                experts.append(table.source.decode(key, zeros))
    warm_up(args, weights, experts, matrices_only=True)


if __name__ == "__main__":
    main()
