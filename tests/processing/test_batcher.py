"""The group-commit batcher (``loyalty.server.batcher``): every item answered once, batches bounded, and with
``key``, no two running batches holding items of one key, the items of one key in the order they came."""
from __future__ import annotations

import random
import threading
import time

import pytest

from loyalty.server.batcher import Batcher


def _recording_run(log, lock, running, overlaps, hold=0.0):
    def run(slots):
        keys = [s.item[0] for s in slots if s.item[0] is not None]
        with lock:
            for k in keys:
                if k in running:
                    overlaps.append(k)
            for k in keys:
                running[k] = running.get(k, 0) + 1
            log.append([s.item for s in slots])
        time.sleep(hold)
        with lock:
            for k in keys:
                running[k] -= 1
                if not running[k]:
                    del running[k]
        for s in slots:
            s.set(s.item)
    return run


def test_every_item_is_answered_with_its_own_value_in_batches_of_at_most_max():
    log, lock = [], threading.Lock()
    b = Batcher(_recording_run(log, lock, {}, []), max_batch=5, threads=2, window=0.002)
    try:
        out = [None] * 60
        def submit(i):
            out[i] = b.submit((None, i))
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert out == [(None, i) for i in range(60)]
        assert all(1 <= len(batch) <= 5 for batch in log)
        assert sorted(i for batch in log for _, i in batch) == list(range(60))
    finally:
        b.close()


def test_an_error_reaches_every_waiter_of_its_batch():
    def run(slots):
        raise RuntimeError("storage fell over")
    b = Batcher(run, max_batch=4, threads=1)
    try:
        with pytest.raises(RuntimeError, match="storage fell over"):
            b.submit((None, 1))
    finally:
        b.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_keyed_items_never_run_in_two_batches_at_once_and_keep_their_order(seed):
    rng = random.Random(seed)
    log, lock, running, overlaps = [], threading.Lock(), {}, []
    b = Batcher(_recording_run(log, lock, running, overlaps, hold=0.003), max_batch=6, threads=3,
                key=lambda item: item[0])
    try:
        items = [(rng.choice(["m1", "m2", "m3", "m4", None]), n) for n in range(120)]
        done = []
        gate = threading.Lock()
        for item in items:         # queued in this order (callbacks: nobody waits)
            b.submit_nowait(item, lambda slot: (gate.acquire(), done.append(slot.value), gate.release()))
        deadline = time.monotonic() + 20
        while len(done) < len(items) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(done, key=lambda x: x[1]) == items
        assert overlaps == [], "two running batches held items of one key"
        ran = [item for batch in log for item in batch]
        for key in ("m1", "m2", "m3", "m4"):
            assert [n for k, n in ran if k == key] == [n for k, n in items if k == key], key
        assert len(log) > 1 and b._busy == {}
    finally:
        b.close()


def test_a_busy_key_does_not_hold_up_the_others():
    started, release = threading.Event(), threading.Event()
    order = []

    def run(slots):
        order.append([s.item for s in slots])      # when each batch starts
        if any(s.item == ("slow", 0) for s in slots):
            started.set()
            release.wait(10)
        for s in slots:
            s.set(s.item)

    b = Batcher(run, max_batch=8, threads=2, key=lambda item: item[0])
    try:
        first = threading.Thread(target=b.submit, args=(("slow", 0),))
        first.start()
        assert started.wait(5)
        later = []
        t = threading.Thread(target=lambda: later.append(b.submit(("slow", 1))))
        t.start()
        # "slow" is held by the running batch: ("slow", 1) waits for it, ("fast", 2) goes ahead
        assert b.submit(("fast", 2)) == ("fast", 2)
        assert later == []
        release.set()
        t.join(5)
        first.join(5)
        assert later == [("slow", 1)]
        assert order[0] == [("slow", 0)] and [("slow", 1)] in order[1:]
        assert order.index([("fast", 2)]) < order.index([("slow", 1)])
    finally:
        release.set()
        b.close()


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_lone_request_never_waits_for_the_window_and_a_loaded_batcher_does():
    log, lock = [], threading.Lock()
    window = 0.3
    b = Batcher(_recording_run(log, lock, {}, []), max_batch=8, threads=1, window=window)
    try:
        # idle: one request after another, each alone, none waiting for the window
        for i in range(3):
            t0 = time.monotonic()
            assert b.submit((None, i)) == (None, i)
            assert time.monotonic() - t0 < window / 2
        assert log == [[(None, 0)], [(None, 1)], [(None, 2)]]
    finally:
        b.close()

    # load: two requests queued together are a batch of two (taken after the window: the queue held more than
    # one); then a request arriving within the window of the next batch joins it
    hold, running = threading.Event(), threading.Event()

    def run(slots):
        running.set()
        hold.wait(5)
        for s in slots:
            s.set(s.item)

    b2 = Batcher(run, max_batch=8, threads=1, window=window)
    try:
        first = threading.Thread(target=b2.submit, args=((None, "a"),))
        first.start()
        assert running.wait(5)               # "a" alone (no load yet): running at once, held in its batch
        out = []
        pair = [threading.Thread(target=lambda i=i: out.append(b2.submit((None, i)))) for i in ("b", "c")]
        for t in pair:
            t.start()
        _until(lambda: len(b2._queue) == 2)
        t0 = time.monotonic()
        hold.set()                           # "a" finishes; "b" and "c" are queued: one batch, after the window
        for t in pair:
            t.join(5)
        first.join(5)
        assert sorted(out) == [(None, "b"), (None, "c")]
        assert time.monotonic() - t0 >= window * 0.8
        assert b2.batches == 2 and b2.items == 3
        # the last batch held two: the next lone request waits for company, and one arriving meanwhile joins
        later = []
        t1 = threading.Thread(target=lambda: later.append(b2.submit((None, "d"))))
        t1.start()
        _until(lambda: len(b2._queue) == 1)
        assert b2.submit((None, "e")) == (None, "e")
        t1.join(5)
        assert later == [(None, "d")] and b2.batches == 3 and b2.items == 5
    finally:
        hold.set()
        b2.close()


def test_counters_add_up_with_keys_and_two_workers():
    log, lock, overlaps = [], threading.Lock(), []
    b = Batcher(_recording_run(log, lock, {}, overlaps, hold=0.002), max_batch=4, threads=2, window=0.002,
                key=lambda item: item[0])
    try:
        threads = [threading.Thread(target=b.submit, args=((f"k{i % 5}", i),)) for i in range(80)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert b.items == 80 and b.batches == len(log)
        assert sorted(i for batch in log for _, i in batch) == list(range(80))
        assert overlaps == []
    finally:
        b.close()
