"""Progress and per-job bookkeeping shared by the workers: one small Ray actor the driver polls.

The refine actors report images as they finish; the stage-1 actors report long groups as they go (a 10,000-image
group takes minutes), and which batches they are running: when Ray restarts an actor that died, the batches it
was running are blamed, so a batch that keeps killing its GPU actor becomes error rows after a bounded number of
deaths instead of looping forever, and a batch that merely ran before it on the same actor is not blamed.
"""
from __future__ import annotations

import sys
import threading
import time

import ray


@ray.remote(num_cpus=0, max_restarts=-1)
class JobState:
    def __init__(self, groups: int, images: int):
        self.groups, self.images = groups, images
        self.done_images = self.errors = 0
        self.group_images: dict[str, int] = {}
        self.done_groups = 0
        self.long: dict[str, str] = {}
        self.running: dict[str, set[str]] = {}  # actor id -> batch keys it is running
        self.deaths: dict[str, int] = {}  # batch key -> actor deaths while it ran

    def images_done(self, group_key: str, n: int, errors: int, group_size: int) -> None:
        self.done_images += n
        self.errors += errors
        seen = self.group_images.get(group_key, 0) + n
        self.group_images[group_key] = seen
        if seen >= group_size:
            self.done_groups += 1
            self.group_images.pop(group_key, None)
            self.long.pop(group_key, None)

    def tick(self, group_key: str, text: str) -> None:
        self.long[group_key] = text

    def restarted(self, actor: str) -> None:
        """An actor (re)starts: whatever it was running when it died is blamed once."""
        for key in self.running.pop(actor, ()):
            self.deaths[key] = self.deaths.get(key, 0) + 1

    def begin(self, actor: str, key: str) -> int:
        """A batch starts on ``actor``; returns how many actors it has ended so far."""
        self.running.setdefault(actor, set()).add(key)
        return self.deaths.get(key, 0)

    def end(self, actor: str, key: str) -> None:
        self.running.get(actor, set()).discard(key)

    def snapshot(self) -> dict:
        return {"groups": self.groups, "images": self.images, "done_groups": self.done_groups,
                "done_images": self.done_images, "errors": self.errors, "long": dict(list(self.long.items())[:3])}


class Printer:
    """Prints ``[infer] groups a/b images c/d x img/s errors e eta`` every ``interval`` seconds from a thread."""

    def __init__(self, state, interval: float, stream=None):
        self.state, self.interval, self.stream = state, interval, stream  # None: sys.stderr when printing
        self.start = time.monotonic()
        self.last: dict = {}
        self.history: list[tuple[float, int]] = []  # (seconds since start, images done): the run's rate over time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.print()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.print()

    def print(self) -> None:
        try:
            s = ray.get(self.state.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress must never break the job
            return
        self.last = s
        elapsed = time.monotonic() - self.start
        self.history.append((round(elapsed, 3), s["done_images"]))
        if len(self.history) > 2000:  # thin: keep every other point
            self.history = self.history[::2]
        rate = s["done_images"] / elapsed if elapsed > 0 else 0.0
        eta = (s["images"] - s["done_images"]) / rate if rate > 0 else float("nan")
        line = (f"[infer] groups {s['done_groups']}/{s['groups']}  images {s['done_images']}/{s['images']}  "
                f"{rate:.2f} img/s  errors {s['errors']}  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
        for key, text in s["long"].items():
            line += f"\n[infer]   group {key}: {text}"
        print(line, file=self.stream or sys.stderr, flush=True)
