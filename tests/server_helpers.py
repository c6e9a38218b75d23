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

    @property
    def tokens_read(self):
        return self.it.tokens_read

    def close(self):
        self.it.close()
        self.closed.set()


class RecordingEngine:
    """An Engine, keeping a record of every stream the server asks it for."""

    def __init__(self, engine):
        self._engine = engine
        self.recorded = []          # every RecordedStream, in order
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, *args, **kwargs):
        rec = RecordedStream(self._engine.stream(*args, **kwargs))
        with self.lock:
            self.recorded.append(rec)
        return rec

    def streams(self, *args, **kwargs):
        recs = [RecordedStream(s) for s in self._engine.streams(*args, **kwargs)]
        with self.lock:
            self.recorded.extend(recs)
        return recs
