"""Prefetcher / prefetched: order and state travel with items, errors reach the consumer, nothing outlives a stop."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from saeforge.stores.background import Prefetcher, prefetched


def wait_until(cond, timeout=3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Counting:
    """An endless source that records how far it got and whether it was closed."""

    def __init__(self):
        self.made, self.closed = 0, threading.Event()

    def __iter__(self):
        try:
            for i in itertools.count():
                self.made = i + 1
                yield i
        finally:
            self.closed.set()


def test_items_in_order_with_transform_and_the_consumers_state():
    src = iter(range(10))
    pos = {"n": 0}

    def state():
        return pos["n"]

    def counted():
        for x in src:
            pos["n"] += 1
            yield x

    p = Prefetcher(counted(), transform=lambda x: x * 10, state_fn=state, depth=3)
    got = [next(p), next(p)]
    assert got == [0, 10] and p.state_dict() == 2  # where the consumer is, not the producer (ahead)
    assert got + list(p) == [10 * i for i in range(10)] and p.state_dict() == 10
    with pytest.raises(StopIteration):
        next(p)  # stays finished
    assert p.wait_s >= 0
    p.close()


def test_producer_ends_after_close_even_when_the_consumer_stopped_mid_stream():
    src = Counting()
    p = Prefetcher(src, depth=2)
    assert [next(p), next(p)] == [0, 1]
    assert wait_until(lambda: src.made >= 4)  # the producer is blocked on a full queue
    t0 = time.perf_counter()
    p.close()
    assert time.perf_counter() - t0 < 2.0
    assert not p.is_alive()
    assert src.closed.is_set(), "the source's cleanup must run when the producer stops"
    made = src.made
    time.sleep(0.3)
    assert src.made == made  # nothing is produced after close()
    with pytest.raises(StopIteration):
        next(p)  # a closed prefetcher never blocks


def test_an_exception_in_the_source_reaches_the_consumer_after_the_items_before_it():
    def failing():
        yield 1
        yield 2
        raise RuntimeError("source broke at item 3")

    p = Prefetcher(failing())
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(RuntimeError, match="source broke at item 3"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)
    assert wait_until(lambda: not p.is_alive())


def test_an_exception_in_the_transform_reaches_the_consumer():
    p = Prefetcher(range(5), transform=lambda x: 1 // (x - 2))
    assert [next(p), next(p)] == [-1, -1]
    with pytest.raises(ZeroDivisionError):
        next(p)


def test_close_from_another_thread_ends_a_waiting_consumer():
    def slow():
        yield 0
        time.sleep(3)  # not interruptible; the consumer must not wait for it
        yield 1

    p = Prefetcher(slow(), name="saeforge-test-slow")
    assert next(p) == 0
    threading.Timer(0.2, p.close).start()
    t0 = time.perf_counter()
    with pytest.raises(StopIteration):
        next(p)
    assert time.perf_counter() - t0 < 2


def test_prefetched_generator_stops_its_thread_when_the_consumer_breaks_or_fails():
    src = Counting()
    for i in prefetched(src, depth=2, name="saeforge-test-break"):
        if i == 3:
            break
    assert wait_until(lambda: "saeforge-test-break" not in {t.name for t in threading.enumerate()})
    assert src.closed.is_set()

    src2 = Counting()
    with pytest.raises(KeyError):
        for i in prefetched(src2, name="saeforge-test-fail"):
            if i == 2:
                raise KeyError("consumer died")
    assert wait_until(lambda: "saeforge-test-fail" not in {t.name for t in threading.enumerate()})
    assert src2.closed.is_set()


def test_prefetched_passes_items_and_errors_through():
    assert list(prefetched(iter(range(7)), depth=1)) == list(range(7))

    def failing():
        yield "a"
        raise ValueError("tokenizer failed")

    gen = prefetched(failing())
    assert next(gen) == "a"
    with pytest.raises(ValueError, match="tokenizer failed"):
        next(gen)
