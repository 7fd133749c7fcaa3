"""EnergyTracker: the framework-free core every adapter drives: its lifecycle and windows.

A run is cut into consecutive intervals at *points*: every evaluation, every epoch end, every N
training steps between them, and the end. The tracker starts the run (sensors, meter, MLflow
sink) and opens the epoch and evaluation windows; each other concern has its own file: how the
run ends (``ending``: the tail, outputs, the wait for MLflow, the status), which MLflow run the
energy goes to (``runs``), the point and the step cadence (``points``), the run's totals and
resume state (``ledger``), the stoppers and their one reduction across ranks (``decisions``), the
metric contract (``records``), how a process ends (``process``), throughput (``throughput``),
later stages (``stages``) and the plain loop's context managers (``loop``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from green_callbacks import outputs, process
from green_callbacks.accounting import Accountant, IntensitySeries, resolve_intensity
from green_callbacks.decisions import StopperHost
from green_callbacks.distributed import RankInfo, gather, speak_as
from green_callbacks.ending import EndHost
from green_callbacks.ledger import RunLedger
from green_callbacks.loop import LoopHost
from green_callbacks.meter import DEFAULT_PERIOD_S, EnergyMeter, Measurement
from green_callbacks.points import PointHost
from green_callbacks.policies import Decision
from green_callbacks.process import never_raises, said_once
from green_callbacks.records import Kind, batch_size, epoch_metrics
from green_callbacks.runs import RunHost, Session
from green_callbacks.sensors import GpuSelection, build_sensors
from green_callbacks.stages import StageHost
from green_callbacks.stopping import Stopper
from green_callbacks.throughput import ThroughputHost
from green_callbacks.units import plain
from green_callbacks.validation import check_tracker_args, named_arguments


class EnergyTracker(RunHost, PointHost, LoopHost, ThroughputHost, StageHost, StopperHost, EndHost, RunLedger):
    """Measures a training job interval by interval and logs it to MLflow; the adapters drive it.

    Args:
        gpus: which GPUs: ``"auto"`` (those this process trains on), ``"all"`` (all visible to
            the process), a list of CUDA device indices, or ``None`` for none.
        measure_cpu: measure CPU (and DRAM where RAPL allows) once per node.
        sampling_period_s: the background sampler's period (default 0.05 s, at least 0.005 s).
        cpu_tdp_w: TDP of the CPU cores this machine shows, for the estimate used when RAPL is not
            readable (default: the known model's TDP per core, else 12 W per core).
        cpu_scope: what that estimate counts: ``"process"`` (this training's process tree) or
            ``"machine"`` (every process); RAPL, where readable, measures the whole package.
        country: ISO alpha-2/alpha-3 code or English name for the grid's carbon intensity.
        cloud_region: ``provider:region`` (``gcp:europe-west1``) for the carbon intensity.
        carbon_intensity_g_per_kwh: an explicit carbon intensity (g CO2e per kWh).
        carbon_intensity_csv: a ``timestamp,g_per_kwh`` CSV integrated over each window.
        pue: data-centre power usage effectiveness applied to emissions and cost (>= 1.0).
        price_per_kwh: electricity price per kWh, for cost metrics.
        currency: the price's currency code (ISO 4217, default ``"EUR"``).
        tracking_uri: MLflow tracking URI when no run exists yet (MLflow's default otherwise).
        experiment_name: MLflow experiment for a run this package has to open.
        run_name: name of a run this package has to open.
        log_artifacts: artifacts to log at the end, any of ``intervals`` (CSV), ``trace`` (power
            trace CSV), ``plot`` (PNG), ``summary`` (JSON); ``True`` for all, ``False`` for none.
        efficiency_metrics: evaluation metrics to divide by cumulative kJ
            (``efficiency/<metric>_per_kj``); ``None`` for every validation metric.
        output_dir: local folder for artifacts and the MLflow spool (one sub-folder per run).
        mlflow: log to MLflow at all (``False`` keeps the records local).
        mlflow_wait_s: at the end, how long to wait for MLflow to confirm everything (counted from
            the sender's first call to MLflow); what is unsent then stays in the spool, with the
            command that sends it, and the sender keeps trying in the background for a minute.
        cuda_sync: synchronise CUDA at window edges (``None``: when CUDA is in use).
        log_every_n_steps: between evaluations, log the cumulative energy every this many
            training steps; ``None`` derives it from ``log_every_s``.
        log_every_s: the wanted time between logging points when ``log_every_n_steps`` is
            ``None``: the first 10 steps are timed (the slowest rank's) and turned into a step count.
    """

    _warned_unmeasured = False  # "nothing can be measured here", said once per tracker

    @named_arguments
    def __init__(
        self,
        gpus: GpuSelection | None = "auto",
        measure_cpu: bool = True,
        sampling_period_s: float = DEFAULT_PERIOD_S,
        cpu_tdp_w: float | None = None,
        cpu_scope: str = "process",
        country: str | None = None,
        cloud_region: str | None = None,
        carbon_intensity_g_per_kwh: float | None = None,
        carbon_intensity_csv: str | None = None,
        pue: float = 1.0,
        price_per_kwh: float | None = None,
        currency: str = "EUR",
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        log_artifacts: bool | Sequence[str] = True,
        efficiency_metrics: Sequence[str] | None = None,
        output_dir: str = "green_callbacks_output",
        mlflow: bool = True,
        mlflow_wait_s: float = 10.0,
        cuda_sync: bool | None = None,
        log_every_n_steps: int | None = None,
        log_every_s: float = 30.0,
    ) -> None:
        init_args = {k: v for k, v in locals().items() if k != "self"}
        args = check_tracker_args(init_args)  # every check happens here, before training starts
        series = IntensitySeries(args["carbon_intensity_csv"]) if args["carbon_intensity_csv"] else None
        self.accountant = Accountant(
            resolve_intensity(args["carbon_intensity_g_per_kwh"], args["country"], args["cloud_region"]),
            args["pue"], args["price_per_kwh"], args["currency"], series)
        self.gpus = args["gpus"]
        self.measure_cpu = args["measure_cpu"]
        self.sampling_period_s = args["sampling_period_s"]
        self.cpu_tdp_w = args["cpu_tdp_w"]
        self.cpu_scope = args["cpu_scope"]
        self.tracking_uri = args["tracking_uri"]
        self.experiment_name = args["experiment_name"]
        self.run_name = args["run_name"]
        self.artifacts = args["log_artifacts"]
        self.efficiency_metrics = args["efficiency_metrics"]
        self.output_dir = Path(args["output_dir"])
        self.use_mlflow = args["mlflow"]
        self.mlflow_wait_s = args["mlflow_wait_s"]
        self.cuda_sync = args["cuda_sync"]
        self.log_every_n_steps = args["log_every_n_steps"]
        self.log_every_s = args["log_every_s"]
        self._init_args = plain(init_args)  # (NumPy's numbers as Python's: HF writes them into trainer_state.json)
        self.rank = RankInfo()
        self.meter: EnergyMeter | None = None
        self.sink: Any = None  # green_callbacks.sinks.MlflowSink on rank 0 with MLflow on
        self._idle_sink: Any = None  # a finished stage's sink, kept for the next stage into its run (_park_sink)
        self.stoppers: list[Stopper] = []
        self.last_window: Measurement | None = None  # this rank's latest epoch window, for custom callbacks
        self.started = False
        self._finished = False
        self._restored = False
        self._fits = 0
        self._session = Session(None)
        self.reset_run()

    # -- lifecycle ---------------------------------------------------------------------------
    @never_raises
    def start(self, rank: RankInfo | None = None, cuda_indices: Sequence[int] | None = None,
              run_id: str | None = None, tracking_uri: str | None = None, session: object = None,
              open_sink: bool = True) -> None:
        """Build the sensors and the meter on this rank; on rank 0 open the MLflow sink (no network here).

        ``session`` is the trainer (or its arguments): a later stage of the same one (``test`` after
        ``fit``) continues the run; another one is a new training (see :meth:`_reuse`). ``open_sink=False``:
        the sink opens at :meth:`open_sink`, for a stage whose run is known only at its end.
        """
        if self.started:
            return
        self.rank = rank or RankInfo.from_env()
        speak_as(self.rank)
        same = bool(self._fits) and self.same_session(session)
        if self._fits and not self._restored and not same:
            self._reuse(run_id)
        if not same:
            self._measured_before = False  # another training: its settings are judged afresh (see settle_measurable)
        self._session = Session(session)
        self._fits += 1
        self._resuming, self._restored = self._restored, False  # resumed from a checkpoint (see _open_sink)
        self._resume_checked = not self._resuming  # (a fresh training has nothing to look at before its first step)
        import pandas  # noqa: F401 - imported now, not first at interpreter exit where imports can fail

        # the sensors' start-up warnings (a root-only RAPL file, a MIG instance): not said again at the next stage
        with said_once(self.__dict__.setdefault("_sensor_warnings", set())):
            sensors = build_sensors(self.gpus, cuda_indices, self.measure_cpu and self.rank.measures_host,
                                    self.cpu_tdp_w, cpu_scope=self.cpu_scope)
            if self.measure_cpu and self.rank.world_size > 1:  # collective: the node's ranks, for a process estimate
                peers = [pid for node, pid in gather((self.rank.node, os.getpid()))
                         if node == self.rank.node and pid != os.getpid()]
                for sensor in sensors:
                    if hasattr(sensor, "add_peers"):
                        sensor.add_peers(peers)
            configured = any(s.measurable for s in sensors)  # what the settings and the machine offer (GPU handles)
            meter = EnergyMeter(sensors, self.sampling_period_s, cuda_sync=self.cuda_sync).start()
            try:  # after the sensors' start: a GPU with a handle whose every read fails measures nothing
                self.settle_measurable(configured, meter.measurable)
            except BaseException:
                meter.close()
                raise
        self.meter = meter
        self.meter.begin("interval")
        self.started, self._finished = True, False
        self._every = self.log_every_n_steps
        self._calibration: tuple[int, float, int] | None = None
        self._last_step_seen = -1
        self._first_step, self._setup, self._setup_booked = -1, None, False  # this training's (see learn_setup)
        self._due: int | None = None  # a logging point due at this step, not yet taken
        self._held = None
        self._projected_step = -1
        self._eval_window: Measurement | None = None
        self._epoch_closed_at = -1  # len(records) when a point last closed an epoch
        self._samples: dict[str, int] = {}
        self._epoch_eval = (0.0, 0.0)
        self._epoch_start_step = self._last_point_step
        self._finishing_status: str | None = None
        self.waiting_for_mlflow = False  # in the end's wait for MLflow: a SIGTERM ends the wait (process.py)
        self._sigterms_at_start = process.sigterm_count()  # a SIGTERM after it ends the stage with a short wait
        self._fit_start = time.monotonic()
        self._t_start = self._fit_start - self.time_before_s  # a run continued: its earlier fits' time too
        process.register(self)
        if open_sink:
            self.open_sink(run_id, tracking_uri)

    def open_sink(self, run_id: str | None = None, tracking_uri: str | None = None) -> None:
        """On rank 0 with MLflow on, open the sink (once a run); see :class:`~green_callbacks.runs.RunHost`."""
        if self.started and self.sink is None and self.rank.is_zero and self.use_mlflow and not self.dry_run:
            self._open_sink(run_id, tracking_uri)

    # -- windows ---------------------------------------------------------------------------
    @never_raises
    def begin_epoch(self, epoch: int, tile: bool = False) -> None:
        """Open the epoch's window. ``tile``: where a point closed the previous epoch and no point came since,
        start at that point's instant and readings (no sensor read), so epochs tile the run (Lightning's)."""
        if self.meter is not None and not self.meter.is_open("epoch"):
            self.current_epoch = epoch
            self._epoch_eval = (0.0, 0.0)
            self._epoch_start_step = self._last_step_seen_or_point()
            booked = self.resume_epoch(epoch)  # the checkpoint's epoch, where it ended with the checkpoint
            if booked is not None and self.rank.is_zero and self.sink is not None:
                self.sink.log_metrics(self.measured_only(epoch_metrics(booked)), step=booked.step)
                if self._params_logged:
                    self._tag_weaker_methods([booked])
            tiles = tile and self._epoch_closed_at == len(self.records) and self.meter.is_open("interval")
            self.meter.begin("epoch", at_start_of="interval" if tiles else None)

    @property
    def epoch_open(self) -> bool:
        return self.meter is not None and self.meter.is_open("epoch")

    @never_raises
    def begin_evaluation(self) -> None:
        if self.meter is not None and not self.meter.is_open("evaluation"):
            self.meter.begin("evaluation")

    @property
    def evaluation_open(self) -> bool:
        return self.meter is not None and self.meter.is_open("evaluation")

    @never_raises
    def end_evaluation(self, step: int, metrics: Mapping[str, float], epoch_ends: bool = False) -> Decision | None:
        """An evaluation ended with ``metrics``: close its window and make an evaluation point (collective).

        ``epoch_ends``: the framework ends the training epoch right after this evaluation (Lightning's
        validation after an epoch's last batch), so the point closes the epoch as well, with the same sensor
        read: the epoch's record and metrics at the same step, and nothing left for the epoch's end hook.
        """
        if self.meter is None:
            return None
        return self._point(Kind.EVALUATION, step, metrics=dict(metrics), epoch_ends=epoch_ends)

    @never_raises
    def end_epoch(self, step: int, collective: bool = True) -> Decision | None:
        """The training epoch ended at ``step`` (collective unless the run is being interrupted)."""
        if not self.epoch_open:
            return None
        return self._point(Kind.EPOCH, step, collective=collective)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (at most ``timeout_s``) until MLflow has what was logged so far; outside training only."""
        return self.sink.flush(timeout_s) if self.sink is not None else True

    def summary(self) -> dict[str, Any]:
        return outputs.summary(self)

__all__ = ["EnergyTracker", "batch_size"]  # batch_size: for the adapters
