"""Helpers of the server tests: an Engine wrapper that records every stream the server asks for."""
import threading


class RecordedStream:
    """An Engine stream that records how far it was iterated and whether it was closed."""

    def __init__(self, it):
        self.it = it
        self.deltas = 0
        self.exhausted = False
        self.closed = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            d = next(self.it)
        except StopIteration:
            self.exhausted = True
            raise
        self.deltas += 1
        return d

    @property
    def result(self):
        return self.it.result

    @property
    def request(self):
        return self.it.request

    def close(self):
        self.it.close()
        self.closed.set()


class RecordingEngine:
    """An Engine, keeping a record of every stream the server asks it for."""

    def __init__(self, engine):
        self._engine = engine
        self.streams = []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, *args, **kwargs):
        rec = RecordedStream(self._engine.stream(*args, **kwargs))
        with self.lock:
            self.streams.append(rec)
        return rec
