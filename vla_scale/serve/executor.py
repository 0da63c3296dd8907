"""Asynchronous chunk execution: the next action chunk is computed while the current one is executed.

Synchronous execution (`overlap=0`) asks for a chunk when the current one is used up and the robot waits for
the reply: one stalled control tick per chunk at least, more when inference takes longer than a tick.
With `overlap=k`, once k actions of the current chunk remain (the one being executed included), the
executor sends the current observation to the policy in a background thread and keeps executing; the reply
arrives some ticks later.

Stale-chunk policy ("latest replaces, skip what has passed"): a chunk requested at tick s was predicted
from the observation of tick s, so its row i is the action for tick s + i. When it arrives at tick t > s,
the rows for ticks s..t-1 (already executed from the older chunk) are skipped and it replaces the older
chunk at once, row t - s first: the newest observation wins, and the actions stay aligned with the ticks they
were predicted for. If every row is stale (inference slower than a chunk), the executor asks again,
synchronously. A tick with no action available waits for the pending request and is counted as stalled.

Real-time chunking (`inpaint=True`, flow policies): each overlapping request also carries what the current chunk
still holds from its tick on (`prefix`) and how many of those actions will run before the reply arrives
(`prefix_delay`: the ticks the last reply took, at least 1); the policy inpaints the new chunk to continue
them, so the switch to it does not jump (Black et al. 2025). `request` is then called as
`request(obs, prefix=..., prefix_delay=...)`, as `PolicyClient.infer` takes them.

Simulated latency (`delay_ticks=d >= 1`, closed-loop evaluation in a simulator, `vla-scale eval --delay`): a
request is computed at once in the calling thread, but its chunk (row i for tick s + i, s the request's tick)
only becomes available at tick s + d, so a simulator sees what a robot would with an inference that takes d
control ticks, however fast this machine runs the model (as real-time chunking's simulated-delay experiments do);
`prefix_delay` is then d. As for a real robot, a tick with no chunk waits for the pending one without advancing
the clock (counted as stalled): with overlap >= d that happens only at an episode's first tick, or when a chunk
is too short to cover the next request's delay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ExecutorStats:
    """What happened over the ticks since `reset()`."""

    ticks: int = 0
    stalled_ticks: int = 0  # ticks that waited for a chunk (the first tick of an episode included)
    wait_s: float = 0.0  # total time the control loop waited
    chunks: int = 0  # chunks received
    skipped_actions: int = 0  # stale rows skipped by the policy above
    log: list[tuple[int, int, int]] = field(default_factory=list)  # (tick, chunk's request tick, row executed)

    @property
    def stalled_fraction(self) -> float:
        return self.stalled_ticks / self.ticks if self.ticks else 0.0


def snapshot(obs: Any) -> Any:
    """A copy of the observation's arrays, so a simulator that reuses its buffers cannot change a pending request."""
    if isinstance(obs, dict):
        return {k: snapshot(v) for k, v in obs.items()}
    if isinstance(obs, np.ndarray):
        return obs.copy()
    return obs


class AsyncChunkExecutor:
    """One action per `act(obs)` call from chunks that `request(obs) -> [N, A]` computes (e.g. `PolicyClient.infer`)."""

    def __init__(
        self,
        request: Callable[..., np.ndarray],
        overlap: int = 0,
        inpaint: bool = False,
        delay_ticks: int | None = None,
    ) -> None:
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, not {overlap}")
        if delay_ticks is not None:
            if delay_ticks < 1:  # a request is sent after its tick's action: its chunk can serve the next tick first
                raise ValueError(f"delay_ticks must be >= 1, not {delay_ticks}")
            if delay_ticks > overlap:  # overlap 0 (synchronous) would wait for every chunk at no simulated cost
                raise ValueError(
                    f"a simulated delay of {delay_ticks} ticks needs overlap >= {delay_ticks} (got {overlap}): the "
                    "next chunk is requested when `overlap` actions remain, and must arrive before they run out"
                )
        self.request = request
        self.overlap = overlap
        self.inpaint = inpaint
        self.delay_ticks = delay_ticks
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-request")
        self._pending: tuple[int, Future] | None = None
        self.reset()

    def reset(self) -> None:
        """New episode: tick 0, no chunk; a request still running is waited for and dropped."""
        if getattr(self, "_pending", None) is not None:
            _, future = self._pending
            future.exception()  # wait; an error of the old episode does not matter any more
        self._pending = None
        self.t = 0
        self._chunk: np.ndarray | None = None
        self._start = 0  # the tick the current chunk's row 0 was predicted for
        # ticks the last overlapping request took (real-time chunking's prefix_delay); known when simulated
        self._delay = self.delay_ticks or 1
        self.stats = ExecutorStats()

    def _submit(self, obs: Any) -> None:
        kwargs: dict[str, Any] = {}
        if self.inpaint and self._available():
            assert self._chunk is not None
            prefix = self._chunk[self.t - self._start :].copy()  # this tick's action first
            kwargs = {"prefix": prefix, "prefix_delay": min(self._delay, len(prefix))}
        if self.delay_ticks is None:
            future = self._pool.submit(self.request, snapshot(obs), **kwargs)
        else:  # simulated latency: computed now, available delay_ticks ticks from now (`_ready`)
            future = Future()
            try:
                future.set_result(self.request(obs, **kwargs))
            except Exception as err:  # noqa: BLE001 - raised where the chunk is adopted, as in the threaded case
                future.set_exception(err)
        self._pending = (self.t, future)

    def _ready(self) -> bool:
        """Whether the pending request's chunk has arrived."""
        assert self._pending is not None
        start, future = self._pending
        return future.done() and (self.delay_ticks is None or self.t >= start + self.delay_ticks)

    def _adopt(self) -> None:
        """Make the finished pending chunk current (raises the request's error, if any)."""
        assert self._pending is not None
        start, future = self._pending
        self._pending = None
        chunk = np.asarray(future.result(), dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise ValueError(f"an action chunk must be [N, A] with N >= 1, got {chunk.shape}")
        if self._chunk is not None and self.delay_ticks is None:  # an overlapping request: how many ticks it took
            self._delay = max(1, self.t - start)
        self._chunk, self._start = chunk, start
        self.stats.chunks += 1
        self.stats.skipped_actions += min(self.t - start, len(chunk))

    def planned(self) -> np.ndarray | None:
        """What the current chunk holds for the coming tick (None if it does not cover it): compared with the
        action `act` then returns, it says how far a newly adopted chunk departs from the plan it replaced."""
        return self._chunk[self.t - self._start] if self._available() else None

    def _available(self) -> bool:
        return self._chunk is not None and self.t < self._start + len(self._chunk)

    def act(self, obs: Any) -> np.ndarray:
        """The action for this tick (observation `obs`); advances to the next tick."""
        if self._pending is not None and self._ready():
            self._adopt()
        if not self._available():
            began = time.perf_counter()
            while not self._available():
                if self._pending is None:
                    self._submit(obs)
                self._pending[1].exception()  # wait
                self._adopt()
            self.stats.stalled_ticks += 1
            self.stats.wait_s += time.perf_counter() - began
        assert self._chunk is not None
        row = self.t - self._start
        action = self._chunk[row]
        self.stats.log.append((self.t, self._start, row))
        remaining = self._start + len(self._chunk) - self.t  # actions of this chunk left, this one included
        if self.overlap and self._pending is None and remaining <= self.overlap:
            self._submit(obs)
        self.t += 1
        self.stats.ticks += 1
        return action

    def close(self) -> None:
        self._pool.shutdown(wait=True)
