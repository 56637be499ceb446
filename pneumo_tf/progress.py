"""A small progress bar on stderr with rate and ETA (no dependency, works in logs and terminals)."""
from __future__ import annotations

import sys
import time


class Progress:
    """Counts work done; redraws at most every `interval` seconds (a line per update off a TTY)."""

    def __init__(self, total: int, description: str, unit: str = "files", stream=None, interval: float | None = None):
        self.total, self.description, self.unit = total, description, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.done = 0
        self.start = self.last_draw = time.perf_counter()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last_draw >= self.interval or self.done >= self.total:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        fraction = self.done / self.total if self.total else 1.0
        bar = "#" * int(fraction * 30)
        eta = f"{remaining:6.0f}s" if remaining != float("inf") else "     ?s"
        line = (
            f"{self.description} [{bar:<30}] {self.done}/{self.total} "
            f"{rate:7.1f} {self.unit}/s ETA {eta} elapsed {elapsed:6.0f}s"
        )
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.done < self.total or self.total == 0:  # the final count is drawn by update()
            self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
