"""The engine process's side of the pipe (`process._Bridge`): the order of its frames."""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe
from typing import Any

from slimserve.engine import ipc
from slimserve.engine.process import _Bridge
from slimserve.engine.types import Event, Occupancy


class _Front:
    """Stands for the engine: its occupancy is a figure that only grows, read slowly, so
    a frame whose figure was read early would be seen crossing after a later one."""

    def __init__(self) -> None:
        self.now = 0
        self._lock = threading.Lock()

    def occupancy(self) -> Occupancy:
        with self._lock:
            self.now += 1
            now = self.now
        time.sleep(0.0005)  # a read that takes a while, as under load
        return Occupancy(free_slots=now)


def test_the_last_frame_carries_the_latest_occupancy() -> None:
    # The server keeps the occupancy of the last frame it read and the engine sends
    # nothing while idle, so frames flushed from two threads (the step's, and the input
    # worker's for an accepted request) must leave in the order their figures were read.
    # Mutation: reading the occupancy before taking the pipe's lock fails this.
    ours, theirs = Pipe()
    bridge = _Bridge(ours)
    bridge.front = _Front()
    frames: list[Any] = []
    done = threading.Event()

    def read() -> None:
        decode = ipc.server_codec().decode
        while not done.is_set() or theirs.poll():
            if theirs.poll(0.05):
                frames.append(decode(theirs.recv_bytes()))

    reader = threading.Thread(target=read)
    reader.start()

    def flush_many(rid: int) -> None:
        for _ in range(200):
            with bridge._lock:
                bridge.pending.append((rid, Event(text="x")))
            bridge.flush()

    threads = [threading.Thread(target=flush_many, args=(rid,)) for rid in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    figures = [f.occupancy.free_slots for f in frames if isinstance(f, ipc.Events)]
    assert len(figures) >= 2
    assert figures == sorted(figures), "a frame crossed with an older occupancy"
    assert sum(len(f.items) for f in frames) == 400  # no event lost
