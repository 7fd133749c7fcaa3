"""Inference stages: ``trainer.test``/``validate``/``predict`` (Lightning), ``evaluate``/``predict`` (HF).

Each is its own window, measured on every rank and summed, logged as ``energy/<stage>_j`` and joules
per sample at that stage's own step (0, 1, ...), apart from the training's step axis.
"""

from __future__ import annotations

from typing import Any

from green_callbacks.accounting import Accountant
from green_callbacks.distributed import RankInfo, gather
from green_callbacks.meter import EnergyMeter
from green_callbacks.process import never_raises
from green_callbacks.ranks import merge_ranks, window_payload
from green_callbacks.records import stage_metrics


class StageHost:
    """The inference half of :class:`~green_callbacks.tracker.EnergyTracker`."""

    accountant: Accountant
    meter: EnergyMeter | None
    rank: RankInfo
    sink: Any
    stage_counts: dict[str, int]
    _samples: dict[str, int]
    measured_only: Any  # PointHost's

    @never_raises
    def begin_stage(self, stage: str) -> None:
        if self.meter is not None and not self.meter.is_open(stage):
            self._samples[stage] = 0
            self.meter.begin(stage)

    def stage_open(self, stage: str) -> bool:
        return self.meter is not None and self.meter.is_open(stage)

    def add_samples(self, stage: str, n: int) -> None:
        self._samples[stage] = self._samples.get(stage, 0) + int(n)

    @never_raises
    def end_stage(self, window: str, samples: int | None = None, label: str | None = None) -> dict[str, float] | None:
        """Close a stage's window (collective); logs ``energy/<label>_j`` and joules per sample."""
        if self.meter is None or not self.meter.is_open(window):
            return None
        self.meter.settle()  # a stage's measuring ends here: a GPU failing now is decided (said, 'unavailable')
        m = self.meter.end(window)
        n = self._samples.pop(window, 0) if samples is None else samples
        stage = label or window
        payloads = gather({**window_payload(m, self.rank.rank, self.rank.node), "samples": n})
        merged = merge_ranks(payloads)
        fp = self.accountant.footprint(merged.total_j, m.start_unix, m.start_unix + m.duration_s)
        out = stage_metrics(stage, merged.total_j, merged.duration_s, fp.g_co2e, sum(p["samples"] for p in payloads),
                            fp.cost)
        step = self.stage_counts.get(stage, 0)
        self.stage_counts[stage] = step + 1
        if self.rank.is_zero and self.sink is not None:
            self.sink.log_metrics(self.measured_only(out), step=step)
            self.sink.set_tags({f"green.method.{stage}.{c}": v for c, v in merged.methods.items()})
            self.sink.interval_end()
        return out
