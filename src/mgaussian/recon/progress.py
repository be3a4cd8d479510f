"""A small progress bar with loss and ETA (stderr), silent with --quiet or when not a TTY."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None, every_s: float = 0.5):
        self.total = max(1, int(total))
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.time()
        self.last = 0.0
        self.every = every_s if self.tty else 10.0
        self.n = 0

    def update(self, n: int, **info):
        self.n = n
        if not self.enabled:
            return
        now = time.time()
        if now - self.last < self.every and n < self.total:
            return
        self.last = now
        el = now - self.t0
        eta = el / max(n, 1) * (self.total - n)
        frac = n / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        line = f"[{bar}] {n}/{self.total} {extra} elapsed {el:.0f}s eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
