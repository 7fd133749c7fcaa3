"""Power readings integrated over their real timestamps into cumulative joules."""

from __future__ import annotations

import threading


class PowerIntegrator:
    """Cumulative joules of one device from timestamped power readings.

    ``add`` runs in the sampler thread; ``joules_at`` runs in the trainer's thread and holds the
    lock only to copy three floats, so it never waits on a sensor. Between the last reading and
    ``now_s`` the last power is held, which keeps a window edge accurate to one sample period.

    ``interval_mean=True`` is for readings that already are the mean over the interval since
    the previous reading (psutil's CPU utilisation); otherwise the trapezoid rule is used.
    """

    def __init__(self, interval_mean: bool = False) -> None:
        self._interval_mean = interval_mean
        self._lock = threading.Lock()
        self._t_s: float | None = None
        self._p_w = 0.0
        self._j = 0.0

    def add(self, t_s: float, p_w: float) -> None:
        with self._lock:
            if self._t_s is not None and t_s > self._t_s:
                dt = t_s - self._t_s
                self._j += p_w * dt if self._interval_mean else 0.5 * (p_w + self._p_w) * dt
            if self._t_s is None or t_s > self._t_s:
                self._t_s, self._p_w = t_s, p_w

    def joules_at(self, now_s: float) -> float:
        with self._lock:
            t_s, p_w, j = self._t_s, self._p_w, self._j
        if t_s is None:
            return 0.0
        return j + p_w * max(0.0, now_s - t_s)

    @property
    def integrated_j(self) -> float:
        """Joules up to the last reading, without extrapolation."""
        with self._lock:
            return self._j
