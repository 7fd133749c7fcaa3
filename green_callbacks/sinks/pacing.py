"""When the sender tries MLflow again, and with which HTTP settings: its backoff after an outage, the timeout that
grows while a server hangs, and, once the training has closed, requests that end with the linger."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from green_callbacks.sinks.verdicts import answer_of, describe, http_timeout_s, store_race, timed_out

BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # then every 8 s: a refused connection costs nothing, a hung one 5 s here
# MLflow's HTTP client reads these; the sender's own, so an outage costs seconds, not MLflow's minutes. Two
# quick retries of one request ride out a replica answering 503/429 now and then (urllib3 retries those
# statuses and refused connections; a whole send sequence retried instead could fail at the same request each
# time); a request that times out unanswered doubles the timeout for the next (a slow server is not a dead
# one) until one succeeds. Creates are retried by the sender itself (``tracking.created``: MLflow 3.18's client
# no longer retries them); one retried after a 503 the server had processed can make a second run: the empty twins
# are deleted once the run is known (tracking.RunClient.open).
SENDER_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
              "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}  # retries after 0 s and 2 s (urllib3's backoff)
MAX_TIMEOUT_S = 30  # the ceiling of the doubling: a server slower than this is as good as down
RENOTE_S = 300.0  # an outage (or a recovery) is announced again at most this often


class Pacing:
    """The pacing half of :class:`~green_callbacks.sinks.sender.Sender` (which provides what is declared here)."""

    down_since: float | None
    retry_at: float
    failures: int
    timeout_s: int | None
    deadline: float | None
    spool: Path
    uri: str
    _announced_down: bool
    note: Callable[..., bool]

    def _down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
        self.retry_at = time.monotonic() + BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
        self.failures += 1
        if timed_out(exc):  # slow, or hung: the next request gets longer (never less than it had)
            timeout = self.timeout_s or http_timeout_s()
            self.timeout_s = max(timeout, min(2 * timeout, MAX_TIMEOUT_S))
        if store_race(exc) and self.failures <= 3:
            return  # another training is creating the same new store this instant: not an outage
        answer = answer_of(exc)
        state = f"answers {answer}" if answer else "does not answer in time" if timed_out(exc) else \
            "is locked by another process (sqlite: one writer at a time)" if "database is locked" in str(exc) else \
            "cannot be reached"
        if self.note("down", f"green-callbacks: MLflow at {self.uri} {state} ({describe(exc)}); the "
                             f"records wait in {self.spool} and are sent when it is back.", again_after_s=RENOTE_S):
            self._announced_down = True

    def _request_env(self) -> dict[str, str]:
        """MLflow's HTTP settings for the next request: the timeout after one timed out; once the training has
        closed, one that ends with the linger (a hung server held a send minutes past it): its timeout at most what
        is left, and MLflow's retries (each with the whole timeout, after a backoff) only where they fit in it."""
        if self.deadline is None:
            return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s)} if self.timeout_s else {}
        left = int(self.deadline - time.monotonic())
        timeout = max(1, min(self.timeout_s or http_timeout_s(), left))
        env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
        retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0") or 0)
        if (retries + 1) * timeout + 2 ** retries > left:  # urllib3's backoff at factor 1: 0, 2, 4 ... s
            env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        return env

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline
