"""
Unit tests of the worker rings and codec: both sides of a ring driven in
one process over an anonymous mapping, so every interleaving of writes and
reads can be tried, including frames and messages that wrap around the end
of the ring and messages several times larger than it.
"""

from __future__ import annotations

import mmap
import pickle
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._config import Config, ConfigError
from pipecomet._workers import WorkersConfig
from pipecomet._workers._codec import PicklingFailed, decode, encode
from pipecomet._workers._pool import WORKER_TRANSITIONS, WorkerState
from pipecomet._workers._ring import (
    FRAME_HEADER_SIZE, KIND_CALL, KIND_RESULT, Layout, OutgoingMessage, RingConsumer,
    RingProducer,
)
from pipecomet._workers._shm import SharedFile, shm_name, sweep_stale
from tests.conftest import examples


def _pair(capacity: int) -> tuple[RingProducer, RingConsumer, Any]:
    layout = Layout(capacity)
    mapping = mmap.mmap(-1, layout.size)
    view = memoryview(mapping)
    return RingProducer(*layout.request_ring(view)), RingConsumer(*layout.request_ring(view)), view


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _transfer(capacity: int, sizes: list[int], schedule: list[bool]) -> list[bytes]:
    """
    Send one message per size through a ring of ``capacity`` bytes; the
    schedule says, step by step, whether the producer or the consumer moves.
    Returns what the consumer got.
    """
    producer, consumer, view = _pair(capacity)
    outgoing = [OutgoingMessage(KIND_CALL, i + 1, 7, _chunks(_payload(i, n), i), n)
                for i, n in enumerate(sizes)]
    got: list[bytes] = []
    step = 0
    stalls = 0
    while len(got) < len(sizes):
        produce = schedule[step % len(schedule)] if schedule else True
        step += 1
        moved = False
        if produce and outgoing:
            before = (outgoing[0].sent, outgoing[0].started)
            if producer.try_write(outgoing[0]):
                outgoing.pop(0)
            moved = (outgoing[0].sent, outgoing[0].started) != before if outgoing else True
        else:
            msg = consumer.next_message()
            if msg is not None:
                kind, call_id, epoch, segments = msg
                assert (kind, epoch) == (KIND_CALL, 7)
                assert call_id == len(got) + 1
                got.append(b"".join(bytes(s) for s in segments))
                consumer.release()
                moved = True
            elif consumer.gathering:
                moved = True
        stalls = 0 if moved else stalls + 1
        # Neither side can be stuck for ever: the other one always frees it.
        assert stalls < 4 * len(schedule) + 8, "ring deadlocked"
    assert producer.tail == consumer.head
    view.release()
    return got


def _chunks(data: bytes, seed: int) -> list[Any]:
    """
    Split a payload into a few chunks (as the codec does: prefix, pickle,
    buffers), some of them empty.
    """
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
    out, last = [], 0
    for c in cuts + [len(data)]:
        out.append(memoryview(data)[last:c])
        last = c
    return out


class RingRoundTripTests(SynchronousTestCase):
    @settings(max_examples=examples("parser"))
    @given(
        capacity=st.integers(min_value=64, max_value=512).map(lambda k: k * 64),
        data=st.data(),
    )
    def test_random_sizes_round_trip_exactly(self, capacity: int, data: Any) -> None:
        sizes = data.draw(st.lists(st.integers(min_value=0, max_value=3 * capacity), min_size=1,
                                   max_size=12), label="sizes")
        # Both sides must get turns; the drawn part decides their order.
        schedule = data.draw(st.lists(st.booleans(), max_size=16), label="schedule") + [True, False]
        got = _transfer(capacity, sizes, schedule)
        self.assertEqual([len(g) for g in got], sizes)
        for i, (g, n) in enumerate(zip(got, sizes)):
            self.assertEqual(g, _payload(i, n))

    def test_wraps_around_many_times(self) -> None:
        capacity = 4096
        sizes = [1000 + (i * 37) % 900 for i in range(400)]  # ~560 KiB through 4 KiB
        got = _transfer(capacity, sizes, [True, False])
        self.assertEqual(got, [_payload(i, n) for i, n in enumerate(sizes)])

    def test_header_split_at_the_end_of_the_ring(self) -> None:
        # A first record of capacity - 16 bytes leaves 16 bytes before the end:
        # the next frame header (32 bytes) wraps.
        capacity = 4096
        first = capacity - 16 - FRAME_HEADER_SIZE
        got = _transfer(capacity, [first, 100, 5], [True, False])
        self.assertEqual(got, [_payload(0, first), _payload(1, 100), _payload(2, 5)])

    def test_message_larger_than_the_ring_travels_in_parts(self) -> None:
        got = _transfer(4096, [50_000], [True, True, False])
        self.assertEqual(got, [_payload(0, 50_000)])

    def test_full_ring_refuses_until_read(self) -> None:
        producer, consumer, view = _pair(4096)
        small = OutgoingMessage(KIND_CALL, 1, 1, [b"x" * 4000], 4000)
        self.assertTrue(producer.try_write(small))
        more = OutgoingMessage(KIND_CALL, 2, 1, [b"y" * 100], 100)
        self.assertFalse(producer.try_write(more))
        self.assertFalse(more.started)
        self.assertEqual(consumer.next_message()[1], 1)
        consumer.release()
        self.assertTrue(producer.try_write(more))
        self.assertEqual(b"".join(consumer.next_message()[3]), b"y" * 100)
        view.release()

    def test_park_and_wait_flags(self) -> None:
        producer, consumer, view = _pair(4096)
        self.assertFalse(producer.take_consumer_parked())
        consumer.set_consumer_parked(True)
        self.assertTrue(producer.take_consumer_parked())
        self.assertFalse(producer.take_consumer_parked())  # rung once, not twice
        producer.set_producer_waiting(True)
        self.assertTrue(consumer.take_producer_waiting())
        self.assertFalse(consumer.take_producer_waiting())
        view.release()


class CodecTests(SynchronousTestCase):
    def _through_ring(self, value: Any, capacity: int = 8192, skew: int = 0) -> tuple[str, Any]:
        producer, consumer, view = _pair(capacity)
        if skew:
            # Move head and tail so the message wraps around the end.
            pad = OutgoingMessage(KIND_RESULT, 99, 1, [b"\0" * skew], skew)
            self.assertTrue(producer.try_write(pad))
            consumer.next_message()
            consumer.release()
        chunks, length = encode(value, b"fn")
        msg = OutgoingMessage(KIND_CALL, 1, 1, chunks, length)
        result = None
        while result is None:
            producer.try_write(msg)
            got = consumer.next_message()
            if got is not None:
                result = decode(got[3])
                consumer.release()
        view.release()
        return result

    def test_values_round_trip(self) -> None:
        values = [None, 0, "text", {"a": [1, 2.5, None]}, b"", b"raw bytes", bytearray(b"ba"),
                  (1, b"nested"), list(range(1000))]
        for skew in (0, 8192 - 64 - FRAME_HEADER_SIZE):
            for v in values:
                name, out = self._through_ring(v, skew=skew)
                self.assertEqual(name, "fn")
                self.assertEqual(out, v)
                self.assertIs(type(out), type(v))

    def test_memoryview_arrives_as_bytes(self) -> None:
        _, out = self._through_ring(memoryview(b"abcdef")[1:4])
        self.assertEqual(out, b"bcd")

    def test_out_of_band_buffers(self) -> None:
        big = _payload(1, 100_000)
        value = {"ro": pickle.PickleBuffer(big), "rw": pickle.PickleBuffer(bytearray(big[:5000]))}
        chunks, _ = encode(value)
        # The big buffer is a chunk of its own, not copied into the pickle.
        self.assertTrue(any(getattr(c, "obj", None) is big for c in chunks))
        for capacity, skew in ((8192, 0), (4096, 3000), (1 << 20, 0)):
            _, out = self._through_ring(value, capacity=capacity, skew=skew)
            self.assertEqual(bytes(out["ro"]), big)
            self.assertIsInstance(out["rw"], bytearray)
            self.assertEqual(out["rw"], bytearray(big[:5000]))

    def test_unpicklable_fails_in_the_encoder(self) -> None:
        import threading

        with self.assertRaises(PicklingFailed) as cm:
            encode({"lock": threading.Lock()})
        self.assertIn("lock", str(cm.exception))


class LifecycleTests(SynchronousTestCase):
    def test_transition_table_covers_every_state(self) -> None:
        self.assertEqual(set(WORKER_TRANSITIONS), set(WorkerState))
        self.assertEqual(WORKER_TRANSITIONS[WorkerState.DEAD], frozenset())
        for state, targets in WORKER_TRANSITIONS.items():
            if state is not WorkerState.DEAD:
                self.assertIn(WorkerState.DEAD, targets)

    def test_config_names_the_bad_key(self) -> None:
        cfg = Config.from_dict({"workers": {"module": "m", "size": 3, "ring_kib": 64}})
        self.assertEqual((cfg.workers.size, cfg.workers.ring_bytes), (3, 65536))
        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"workers": {"module": "m", "size": 0}})
        self.assertIn("size", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"workers": {"modul": "m"}})
        self.assertIn("workers.modul", str(cm.exception))
        self.assertEqual(WorkersConfig().module, "")


class SharedFileTests(SynchronousTestCase):
    def test_create_open_and_sweep(self) -> None:
        import os
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="pipecomet-ring-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, shm_name(os.getpid(), "abcd", 0, 1))
        f = SharedFile.create(path, 4096, epoch=1, slot=0, server_pid=os.getpid())
        g, epoch, slot, pid = SharedFile.open(path)
        self.assertEqual((epoch, slot, pid), (1, 0, os.getpid()))
        g.close()
        f.close()
        # A file of a live server stays; one of a dead server goes.
        dead = 2 ** 22 + 12345  # above pid_max on default kernels
        stale = os.path.join(directory, shm_name(dead, "abcd", 0, 1))
        open(stale, "wb").close()
        open(os.path.join(directory, "unrelated"), "wb").close()
        removed = sweep_stale(directory)
        self.assertEqual(removed, [os.path.basename(stale)])
        self.assertEqual(sorted(os.listdir(directory)),
                         sorted([os.path.basename(path), "unrelated"]))
        f.unlink()
        self.assertFalse(os.path.exists(path))
