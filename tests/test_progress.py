"""Progress a person watches: the flow's publisher sends what a phase reports, while it changes and
at least every refresh period, from its own thread; the last value always goes out on close."""

from __future__ import annotations

import threading
import time

from preftune.flows.pipeline import _Live


def test_live_publishes_changes_periodically_and_the_last_value_on_close():
    value = [0]
    published: list[int] = []
    arrived = threading.Event()

    def publish(v: int) -> None:
        published.append(v)
        arrived.set()

    live = _Live(lambda: value[0], publish, every=0.05)
    assert arrived.wait(30) and published == [0]  # the first refresh shows the start
    value[0] = 3
    deadline = time.monotonic() + 30
    while published[-1] != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert published == [0, 3]  # unchanged values are not sent again
    value[0] = 7  # reported just before the phase ends: close() still sends it
    live.close()
    assert published[-1] == 7 and published.count(7) == 1
    assert not live.thread.is_alive()
