"""The shared core of every adapter: windows per epoch and stage, DDP totals, MLflow, resume state."""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from green_callbacks import __version__
from green_callbacks.accounting import Accountant, Footprint, IntensitySeries, resolve_intensity
from green_callbacks.distributed import RankInfo, gather
from green_callbacks.meter import DEFAULT_PERIOD_S, EnergyMeter, Measurement
from green_callbacks.policies import Decision, Totals
from green_callbacks.sensors import GpuSelection, Method, build_sensors
from green_callbacks.sensors.base import log
from green_callbacks.sinks import MlflowSink, RunRef, find_or_start_run
from green_callbacks.stopping import BudgetStopper, Stopper

ARTIFACT_DIR = "green_callbacks"
ARTIFACT_CHOICES = ("epochs", "trace", "plot", "summary")
VALIDATION_PREFIXES = ("val", "eval_")  # Lightning's and HF's naming of validation metrics
F = TypeVar("F", bound=Callable[..., Any])
_RUNNING: list[weakref.ref[EnergyTracker]] = []


_UNCAUGHT: list[type[BaseException]] = []
_HOOKED = False


def _live_trackers() -> list[EnergyTracker]:
    return [t for t in (ref() for ref in _RUNNING) if t is not None and t._started]


def _install_process_hooks() -> None:
    """Know how a process ended, so an interrupted run is recorded as KILLED or FAILED.

    Chains ``sys.excepthook`` (the type of an uncaught exception, read at exit), and where nobody
    handles SIGTERM (Lightning does; HF and plain scripts do not) records the partial epoch and
    summary on SIGTERM, then lets the default action end the process as it would have.
    """
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.excepthook

    def excepthook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
        _UNCAUGHT.append(etype)
        previous(etype, value, tb)

    sys.excepthook = excepthook
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_sigterm(signum: int, frame: Any) -> None:
            for tracker in _live_trackers():
                tracker._interrupted("KILLED")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)


def running_tracker() -> EnergyTracker:
    """The most recently started tracker of this process that has not finished.

    How stopping callbacks find the EnergyMonitor in frameworks whose callbacks cannot see
    each other (HF's ``Trainer``).
    """
    live = _live_trackers()
    if not live:
        raise ValueError("EfficiencyEarlyStopping and EnergyBudget need an EnergyMonitor in the same Trainer's "
                         "callbacks: callbacks=[EnergyMonitor(...), EnergyBudget(...)]; it measures, they decide")
    return live[-1]


def never_raises(fn: F) -> F:
    """Telemetry must not break training: a fault becomes one warning per hook and the run goes on.

    The one exception that passes is a ``ValueError`` from ``start``: a bad setting that could only
    be checked against the hardware (a GPU index this machine does not have) stops the run before
    its first step, with the message naming the value and the valid choices.
    """

    @functools.wraps(fn)
    def wrapper(self: EnergyTracker, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except ValueError:
            if fn.__name__ == "start":
                raise
            return _warn_hook(self, fn.__name__, sys.exc_info()[1])
        except Exception as exc:
            return _warn_hook(self, fn.__name__, exc)

    return wrapper  # type: ignore[return-value]


def _warn_hook(tracker: EnergyTracker, name: str, exc: BaseException | None) -> None:
    key = f"hook-{name}"
    if key not in tracker._warned:
        tracker._warned.add(key)
        log.warning("green-callbacks: %s failed (%r); training continues without it.", name, exc)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch (or a test/predict stage) of the whole job: every rank's devices summed."""

    epoch: int
    duration_s: float
    energy_j: float
    components_j: dict[str, float]
    devices_j: dict[str, float]
    methods: dict[str, str]
    val_j: float
    footprint: Footprint
    cumulative_j: float
    cumulative_g: float
    cumulative_cost: float | None
    gpu_peak_w: float
    start_rel_s: float
    end_rel_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    partial: bool = False
    samples: int = 0

    def mlflow_metrics(self, efficiency_keys: Sequence[str] | None) -> dict[str, float]:
        """The metric contract: names grouped by prefix so the MLflow UI groups their charts."""
        fp = self.footprint
        out = {
            "energy/epoch_j": self.energy_j,
            "energy/val_j": self.val_j,
            "energy/cumulative_j": self.cumulative_j,
            "energy/epoch_kwh": fp.kwh,
            "emissions/epoch_g": fp.g_co2e,
            "emissions/cumulative_g": self.cumulative_g,
            "time/epoch_s": self.duration_s,
        }
        for component, joules in self.components_j.items():
            out[f"energy/{component}_j"] = joules
            out[f"power/{component}_mean_w"] = joules / self.duration_s if self.duration_s > 0 else 0.0
        if "gpu" in self.components_j:
            out["power/gpu_peak_w"] = self.gpu_peak_w
        for device, joules in self.devices_j.items():
            if device.startswith("gpu"):
                out[f"energy/{device}_j"] = joules
        if fp.cost is not None and self.cumulative_cost is not None:
            out["cost/epoch"] = fp.cost
            out["cost/cumulative"] = self.cumulative_cost
        if self.cumulative_j > 0:
            for key, value in self.metrics.items():
                wanted = key.startswith(VALIDATION_PREFIXES) if efficiency_keys is None else key in efficiency_keys
                if wanted and math.isfinite(value):
                    out[f"efficiency/{key}_per_kj"] = value / (self.cumulative_j / 1000.0)
        return out

    def row(self) -> dict[str, Any]:
        fp = self.footprint
        row: dict[str, Any] = {"epoch": self.epoch, "duration_s": self.duration_s, "energy_j": self.energy_j,
                               **{f"{c}_j": j for c, j in self.components_j.items()},
                               "val_j": self.val_j, "kwh": fp.kwh, "g_co2e": fp.g_co2e, "cost": fp.cost,
                               "cumulative_j": self.cumulative_j, "cumulative_g": self.cumulative_g,
                               "gpu_peak_w": self.gpu_peak_w, "partial": self.partial}
        row.update({f"method_{c}": m for c, m in self.methods.items()})
        row.update(self.metrics)
        return row


def _window_payload(m: Measurement, rank: RankInfo) -> dict[str, Any]:
    return {"rank": rank.rank, "node": rank.node, "joules": {c: dict(d) for c, d in m.joules.items()},
            "methods": {c: {k: v.value for k, v in d.items()} for c, d in m.methods.items()},
            "peak": dict(m.peak_power_w), "duration_s": m.duration_s}


def merge_ranks(payloads: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, str], float]:
    """Per component, every rank's devices under job-wide labels; the method per component; GPU peak.

    GPUs are numbered across ranks in rank order (``gpu0``..``gpuN``), so no device is counted
    twice and the total is the exact sum over devices. Host components keep their label,
    prefixed by the node when more than one node measured them.
    """
    devices: dict[str, dict[str, float]] = {}
    methods: dict[str, list[Method]] = {}
    nodes = {p["node"] for p in payloads if any(c != "gpu" and p["joules"][c] for c in p["joules"])}
    gpu_index, peak = 0, 0.0
    for p in payloads:
        for component, per_device in p["joules"].items():
            for device, joules in per_device.items():
                if component == "gpu":
                    label = f"gpu{gpu_index}"
                    gpu_index += 1
                else:
                    label = f"{p['node']}/{device}" if len(nodes) > 1 else device
                devices.setdefault(component, {})[label] = joules
                methods.setdefault(component, []).append(Method(p["methods"][component][device]))
        peak += p["peak"].get("gpu", 0.0)
    return devices, {c: Method.weakest(ms).value for c, ms in methods.items()}, peak


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_gpus(gpus: Any) -> GpuSelection | None:
    """``"auto"``, ``"all"``, ``None`` (no GPU) or a list of CUDA indices; anything else is an error."""
    valid = '"auto", "all", None (no GPU) or a list of CUDA device indices like [0, 1]'
    if gpus is None or gpus in ("auto", "all"):
        return gpus
    if isinstance(gpus, str) or not isinstance(gpus, Sequence):
        raise ValueError(f"gpus={gpus!r} is not valid; choose {valid}")
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
        raise ValueError(f"gpus={list(gpus)!r}: CUDA device indices are integers >= 0; choose {valid}")
    return [int(g) for g in gpus]


class EnergyTracker:
    """Measures a training job epoch by epoch and logs it to MLflow; the adapters drive it.

    Args:
        gpus: which GPUs: ``"auto"`` (those this process trains on), ``"all"`` (all visible to
            the process), a list of CUDA device indices, or ``None`` for none.
        measure_cpu: measure CPU (and DRAM where RAPL allows) once per node.
        sampling_period_s: the background sampler's period (default 0.05 s).
        cpu_tdp_w: CPU TDP for the estimate used when RAPL is not readable (default 85 W).
        country: ISO alpha-2/alpha-3 code or English name for the grid's carbon intensity.
        cloud_region: ``provider:region`` (``gcp:europe-west1``) for the carbon intensity.
        carbon_intensity_g_per_kwh: an explicit carbon intensity (g CO2e per kWh).
        carbon_intensity_csv: a ``timestamp,g_per_kwh`` CSV integrated over each window.
        pue: data-centre power usage effectiveness applied to emissions and cost (>= 1.0).
        price_per_kwh: electricity price per kWh, for cost metrics.
        currency: the price's currency code.
        tracking_uri: MLflow tracking URI when no run exists yet (MLflow's default otherwise).
        experiment_name: MLflow experiment for a run this package has to open.
        run_name: name of a run this package has to open.
        log_artifacts: artifacts to log at the end, any of ``epochs`` (CSV), ``trace`` (power
            trace CSV), ``plot`` (PNG), ``summary`` (JSON); ``True`` for all, ``False`` for none.
        efficiency_metrics: validation metrics to divide by cumulative kJ
            (``efficiency/<metric>_per_kj``); ``None`` for every validation metric.
        output_dir: local folder for artifacts and the MLflow spool.
        mlflow: log to MLflow at all (``False`` keeps the records local).
        cuda_sync: synchronise CUDA at window edges (``None``: when CUDA is in use).
    """

    def __init__(
        self,
        gpus: GpuSelection | None = "auto",
        measure_cpu: bool = True,
        sampling_period_s: float = DEFAULT_PERIOD_S,
        cpu_tdp_w: float | None = None,
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
        cuda_sync: bool | None = None,
    ) -> None:
        init_args = {k: v for k, v in locals().items() if k != "self"}
        # every check happens here, before training starts
        gpus = _check_gpus(gpus)
        if not _is_number(sampling_period_s) or not 0 < sampling_period_s <= 60:
            raise ValueError(f"sampling_period_s={sampling_period_s!r} must be a number of seconds in (0, 60]")
        if cpu_tdp_w is not None and not (_is_number(cpu_tdp_w) and cpu_tdp_w > 0):
            raise ValueError(f"cpu_tdp_w={cpu_tdp_w!r} must be a positive number of watts")
        numbers = (("price_per_kwh", price_per_kwh), ("carbon_intensity_g_per_kwh", carbon_intensity_g_per_kwh))
        for name, value in numbers:
            if value is not None and not _is_number(value):
                raise ValueError(f"{name}={value!r} must be a number")
        for name, value in (("country", country), ("cloud_region", cloud_region), ("currency", currency),
                            ("carbon_intensity_csv", carbon_intensity_csv)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} must be a string")
        if isinstance(log_artifacts, bool):
            artifacts = list(ARTIFACT_CHOICES) if log_artifacts else []
        elif isinstance(log_artifacts, Sequence) and not isinstance(log_artifacts, str):
            artifacts = list(log_artifacts)
            bad = [a for a in artifacts if a not in ARTIFACT_CHOICES]
            if bad:
                raise ValueError(f"log_artifacts={artifacts!r}: unknown {bad}; choose from {list(ARTIFACT_CHOICES)}")
        else:
            raise ValueError(f"log_artifacts={log_artifacts!r} must be True, False or a list from "
                             f"{list(ARTIFACT_CHOICES)}")
        if efficiency_metrics is not None and (isinstance(efficiency_metrics, str) or not all(
                isinstance(m, str) for m in efficiency_metrics)):
            raise ValueError(f"efficiency_metrics={efficiency_metrics!r} must be a list of metric names or None")
        series = IntensitySeries(carbon_intensity_csv) if carbon_intensity_csv else None
        self.accountant = Accountant(
            resolve_intensity(carbon_intensity_g_per_kwh, country, cloud_region), pue,
            None if price_per_kwh is None else float(price_per_kwh), currency, series)
        self.gpus = gpus
        self.measure_cpu = bool(measure_cpu)
        self.sampling_period_s = float(sampling_period_s)
        self.cpu_tdp_w = cpu_tdp_w
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifacts = artifacts
        self.efficiency_metrics = None if efficiency_metrics is None else list(efficiency_metrics)
        self.output_dir = Path(output_dir)
        self.use_mlflow = bool(mlflow)
        self.cuda_sync = cuda_sync
        # state that survives a checkpoint resume
        self.records: list[EpochRecord] = []
        self.cumulative_j = 0.0
        self.cumulative_g = 0.0
        self.cumulative_cost: float | None = None if price_per_kwh is None else 0.0
        self.stage_counts: dict[str, int] = {}
        self.run: RunRef | None = None
        # per process, rebuilt by start()
        self.rank = RankInfo()
        self.meter: EnergyMeter | None = None
        self.sink: MlflowSink | None = None
        self.last_window: Measurement | None = None  # this rank's latest epoch, for custom callbacks
        self.stoppers: list[Stopper] = []
        self.stop_decision: Decision | None = None
        self._samples: dict[str, int] = {}
        self._val_j = 0.0
        self._warned: set[str] = set()
        self._started = False
        self._params_logged = False
        self._reported = 0
        self._init_args = init_args

    # -- lifecycle ---------------------------------------------------------------------------
    @never_raises
    def start(self, rank: RankInfo, cuda_indices: Sequence[int] | None = None,
              run_id: str | None = None, tracking_uri: str | None = None) -> None:
        """Build the sensors and the meter on this rank; on rank 0 find the MLflow run."""
        if self._started:
            return
        self.rank = rank
        import pandas  # noqa: F401 - imported now, not first at interpreter exit where imports can fail

        sensors = build_sensors(self.gpus, cuda_indices, self.measure_cpu and rank.measures_host, self.cpu_tdp_w)
        self.meter = EnergyMeter(sensors, self.sampling_period_s, cuda_sync=self.cuda_sync).start()
        self._started = True
        self._finished = False
        _RUNNING.append(weakref.ref(self))
        _install_process_hooks()
        atexit.register(self._atexit)
        if rank.is_zero and self.use_mlflow:
            self._open_sink(run_id, tracking_uri)

    def _open_sink(self, run_id: str | None, tracking_uri: str | None) -> None:
        try:
            self.run = find_or_start_run(run_id, tracking_uri or self.tracking_uri, self.experiment_name,
                                         self.run_name, previous=self.run)
        except Exception as exc:
            log.warning("green-callbacks: no MLflow run could be found or opened (%r); energy is measured and "
                        "written to %s only.", exc, self.output_dir)
            return
        self.sink = MlflowSink(self.run, self.output_dir / f"spool-{self.run.run_id}.jsonl")
        if self.run.owned:
            self.sink.set_status("RUNNING")

    def _log_run_facts(self, record: EpochRecord, names: Sequence[Mapping[str, Mapping[str, str]]]) -> None:
        """Once per run: carbon settings and world size as params; methods and devices as tags."""
        if self.sink is None or self._params_logged:
            return
        self._params_logged = True
        params = {f"green.{k}": v for k, v in self.accountant.as_params().items()}
        params.update({"green.world_size": self.rank.world_size, "green.version": __version__})
        self.sink.log_params(params)
        gpu_names = [n for per_rank in names for n in per_rank.get("gpu", {}).values()]
        tags = {f"green.method.{c}": m for c, m in record.methods.items()}
        gpu_count = sum(d.startswith("gpu") for d in record.devices_j)
        tags.update({"green.gpu_count": gpu_count, "green.gpu_names": "; ".join(gpu_names) or "none",
                     "green.cpu": "; ".join(v for n in names for v in n.get("cpu", {}).values()) or "not measured"})
        for component in ("gpu", "cpu", "dram"):
            tags.setdefault(f"green.method.{component}", Method.UNAVAILABLE.value)
        self.sink.set_tags(tags)

    # -- windows -----------------------------------------------------------------------------
    @never_raises
    def begin_epoch(self) -> None:
        if self.meter is not None and not self.meter.is_open("epoch"):
            self._val_j = 0.0
            self.meter.begin("epoch")

    @never_raises
    def begin_validation(self) -> None:
        if self.meter is not None and not self.meter.is_open("validation"):
            self.meter.begin("validation")

    @never_raises
    def end_validation(self) -> None:
        if self.meter is not None and self.meter.is_open("validation"):
            self._val_j += self.meter.end("validation").total_j

    @property
    def epoch_open(self) -> bool:
        return self.meter is not None and self.meter.is_open("epoch")

    @never_raises
    def end_epoch(self, epoch: int, metrics: Mapping[str, float] | None = None,
                  collective: bool = True, partial: bool = False) -> EpochRecord | None:
        """Close the epoch window; every rank must call this together (it gathers the ranks)."""
        if not self.epoch_open:
            return None
        self.end_validation()
        assert self.meter is not None
        m = self.last_window = self.meter.end("epoch")
        payload = {**_window_payload(m, self.rank), "val_j": self._val_j, "names": self.meter.describe()}
        payloads = gather(payload) if collective else [payload]
        record = self._record(epoch, m, payloads, metrics or {}, partial)
        self.records.append(record)
        if self.rank.is_zero and self.sink is not None:
            self._log_run_facts(record, [p["names"] for p in payloads])
            self.sink.log_metrics(record.mlflow_metrics(self.efficiency_metrics), step=epoch)
        return record

    def _record(self, epoch: int, m: Measurement, payloads: Sequence[Mapping[str, Any]],
                metrics: Mapping[str, float], partial: bool, samples: int = 0) -> EpochRecord:
        devices, methods, peak = merge_ranks(payloads)
        components = {c: sum(d.values()) for c, d in devices.items()}
        energy = sum(components.values())
        fp = self.accountant.footprint(energy, m.start_unix, m.start_unix + m.duration_s)
        self.cumulative_j += energy
        self.cumulative_g += fp.g_co2e
        if self.cumulative_cost is not None and fp.cost is not None:
            self.cumulative_cost += fp.cost
        t0 = self.meter.t0_s if self.meter is not None else m.start_s
        return EpochRecord(
            epoch=epoch, duration_s=max(p["duration_s"] for p in payloads), energy_j=energy,
            components_j=components, devices_j={d: j for ds in devices.values() for d, j in ds.items()},
            methods=methods, val_j=sum(p.get("val_j", 0.0) for p in payloads), footprint=fp,
            cumulative_j=self.cumulative_j, cumulative_g=self.cumulative_g, cumulative_cost=self.cumulative_cost,
            gpu_peak_w=peak, start_rel_s=m.start_s - t0, end_rel_s=m.end_s - t0,
            metrics={k: float(v) for k, v in metrics.items()}, partial=partial, samples=samples)

    # -- stopping ------------------------------------------------------------------------------
    def attach(self, stopper: Stopper) -> None:
        """Ask ``stopper`` after every epoch (and every N steps, if it wants) whether to stop."""
        if stopper not in self.stoppers:
            if isinstance(stopper, BudgetStopper):
                stopper.validate_against(self.accountant.price_per_kwh, self.accountant.currency)
            self.stoppers.append(stopper)

    def totals(self) -> Totals:
        return Totals(self.cumulative_j, self.cumulative_g, self.cumulative_cost)

    def _per_epoch(self) -> Totals:
        recent = [r for r in self.records[-3:] if not r.partial] or self.records[-1:]
        n = max(len(recent), 1)
        cost = None if self.cumulative_cost is None else sum(r.footprint.cost or 0.0 for r in recent) / n
        return Totals(sum(r.energy_j for r in recent) / n, sum(r.footprint.g_co2e for r in recent) / n, cost)

    def decide(self, record: EpochRecord | None, remaining_epochs: float | None,
               reduce: Callable[[bool], bool]) -> Decision | None:
        """After an epoch: every stopper's verdict, made identical on all ranks by ``reduce``."""
        if not self.stoppers or record is None:
            return None
        so_far, per_epoch = self.totals(), self._per_epoch()
        local = None
        for stopper in self.stoppers:
            if isinstance(stopper, BudgetStopper) and remaining_epochs is not None and not stopper.projection_logged \
                    and len(self.records) >= stopper.budget.warmup_epochs:
                whole = stopper.project(so_far, per_epoch, remaining_epochs)
                self._log_metrics({"projection/energy_j": whole.j, "projection/emissions_g": whole.g,
                                   **({"projection/cost": whole.cost} if whole.cost is not None else {})},
                                  record.epoch)
            decision = stopper.after_epoch(so_far, record.metrics, per_epoch, remaining_epochs, len(self.records))
            local = local or (decision if decision.should_stop else None)
        return self._agree(local, reduce, record.epoch, remaining_epochs)

    def check_step(self, step: int, reduce: Callable[[bool], bool]) -> Decision | None:
        """Between epochs' ends: the budget stoppers that asked for a check every N steps.

        Called at every training step; a step where no stopper is due costs one modulo per stopper.
        """
        due = [s for s in self.stoppers if s.check_every_n_steps and step % s.check_every_n_steps == 0]
        if not due or not self.epoch_open:
            return None
        assert self.meter is not None
        peek = self.meter.peek("epoch")
        devices, _, _ = merge_ranks(gather(_window_payload(peek, self.rank)))
        joules = sum(sum(d.values()) for d in devices.values())
        fp = self.accountant.footprint(joules, peek.start_unix, peek.start_unix + peek.duration_s)
        so_far = self.totals() + Totals(joules, fp.g_co2e, fp.cost)
        local = next((d for d in (s.at_step(so_far) for s in due) if d.should_stop), None)
        epoch = self.records[-1].epoch + 1 if self.records else 0
        return self._agree(local, reduce, epoch, None)

    def _agree(self, local: Decision | None, reduce: Callable[[bool], bool], epoch: int,
               remaining_epochs: float | None) -> Decision | None:
        if not reduce(local is not None):
            return None
        decision = local or Decision(True, None, "another rank decided to stop")
        self.stop_decision = decision
        log.warning("green-callbacks: stopping: %s", decision.message)
        if self.rank.is_zero and self.sink is not None:
            self.sink.set_tags({"green.stop_reason": decision.reason.value if decision.reason else "other_rank",
                                "green.stop_message": decision.message})
        if remaining_epochs:
            saved = self._per_epoch()
            self._log_metrics({"energy/saved_j_projected": saved.j * remaining_epochs,
                               "emissions/saved_g_projected": saved.g * remaining_epochs}, epoch)
        return decision

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.rank.is_zero and self.sink is not None:
            self.sink.log_metrics(metrics, step=step)

    # -- test / predict / standalone evaluation -----------------------------------------------
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
        """Close a test/predict window (collective); logs ``energy/<label>_j`` and joules per sample."""
        if self.meter is None or not self.meter.is_open(window):
            return None
        m = self.meter.end(window)
        n = self._samples.pop(window, 0) if samples is None else samples
        stage = label or window
        payloads = gather({**_window_payload(m, self.rank), "samples": n})
        devices, methods, _ = merge_ranks(payloads)
        joules = sum(sum(d.values()) for d in devices.values())
        total_samples = sum(p["samples"] for p in payloads)
        fp = self.accountant.footprint(joules, m.start_unix, m.start_unix + m.duration_s)
        out = {f"energy/{stage}_j": joules, f"time/{stage}_s": max(p["duration_s"] for p in payloads),
               f"emissions/{stage}_g": fp.g_co2e, f"{stage}/samples": float(total_samples)}
        if total_samples:
            out[f"energy/{stage}_j_per_sample"] = joules / total_samples
        step = self.stage_counts.get(stage, 0)
        self.stage_counts[stage] = step + 1
        if self.rank.is_zero and self.sink is not None:
            self.sink.log_metrics(out, step=step)
            self.sink.set_tags({f"green.method.{stage}.{c}": v for c, v in methods.items()})
        return out

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (at most ``timeout_s``) until MLflow has what was logged so far; outside training only."""
        return self.sink.flush(timeout_s) if self.sink is not None else True

    # -- the end -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        fp_total = {"energy_j": self.cumulative_j, "energy_kwh": self.cumulative_j / 3.6e6,
                    "emissions_g": self.cumulative_g, "cost": self.cumulative_cost,
                    "currency": self.accountant.currency if self.cumulative_cost is not None else None,
                    "duration_s": sum(r.duration_s for r in self.records), "epochs": len(self.records),
                    "methods": self.records[-1].methods if self.records else {},
                    "world_size": self.rank.world_size, **self.accountant.as_params()}
        if self.run is not None:
            fp_total["mlflow_run_id"] = self.run.run_id
            fp_total["mlflow_tracking_uri"] = self.run.tracking_uri
        return fp_total

    def frame(self):  # -> pandas.DataFrame
        import pandas as pd

        return pd.DataFrame([r.row() for r in self.records])

    @never_raises
    def finish(self, status: str = "FINISHED", epoch: int | None = None) -> None:
        """Close the meter; on failure keep the partial epoch; write artifacts and the summary."""
        if not self._started or self._finished:
            return
        self._finished = True
        if self.epoch_open and epoch is not None:
            self.end_epoch(epoch, collective=False, partial=True)
        if self.meter is not None:
            trace = self.meter.trace_frame()
            self.meter.close()
        if self.rank.is_zero and len(self.records) > self._reported:
            # a later stage (test after fit) re-reports only when there is something new
            self._reported = len(self.records)
            self._write_outputs(trace)
            self._print_summary(status)
        if self.sink is not None:
            if self.run is not None and self.run.owned:
                self.sink.set_status(status)
            self.sink.close()
            self.sink = None
        self._started = False
        atexit.unregister(self._atexit)

    def _interrupted(self, status: str) -> None:
        """The process is ending mid-run: keep the partial epoch and write the summary."""
        last = self.records[-1].epoch + 1 if self.records else 0
        self.finish(status, epoch=last)

    def _atexit(self) -> None:
        if self._started and not self._finished:
            if _UNCAUGHT:
                self._interrupted("KILLED" if issubclass(_UNCAUGHT[-1], KeyboardInterrupt) else "FAILED")
            else:
                self._interrupted("KILLED" if self.epoch_open else "FINISHED")

    def _write_outputs(self, trace) -> None:  # trace: pandas.DataFrame
        if not self.records or not self.artifacts:
            return
        folder = self.output_dir / (self.run.run_id if self.run else "local")
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if "epochs" in self.artifacts:
            self.frame().to_csv(folder / "epochs.csv", index=False)
            written.append(folder / "epochs.csv")
        if "trace" in self.artifacts:
            trace.to_csv(folder / "power_trace.csv", index=False)
            written.append(folder / "power_trace.csv")
        if "summary" in self.artifacts:
            (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2, default=str))
            written.append(folder / "summary.json")
        if "plot" in self.artifacts:
            from green_callbacks.report import plot_power

            plot_power(trace, self.records, folder / "power.png")
            written.append(folder / "power.png")
        if self.sink is not None:
            for path in written:
                self.sink.log_artifact(path, ARTIFACT_DIR)

    def _print_summary(self, status: str) -> None:
        s = self.summary()
        cost = f", cost {s['cost']:.4f} {s['currency']}" if s["cost"] is not None else ""
        methods = ", ".join(f"{c} {m}" for c, m in s["methods"].items()) or "nothing measured"
        where = f"\n  MLflow run {self.run.run_id} at {self.run.tracking_uri}" if self.run else ""
        print(f"green-callbacks [{status.lower()}]: {s['epochs']} epochs, {s['energy_j']:.1f} J "
              f"({s['energy_kwh']:.6f} kWh), {s['emissions_g']:.3f} gCO2e{cost} over {s['duration_s']:.1f} s "
              f"({methods}; {s['carbon_intensity_g_per_kwh']} g/kWh, PUE {s['pue']}){where}", flush=True)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable totals, so a resumed run continues instead of restarting at zero."""
        return {"cumulative_j": self.cumulative_j, "cumulative_g": self.cumulative_g,
                "cumulative_cost": self.cumulative_cost, "stage_counts": dict(self.stage_counts),
                "records": [_record_to_json(r) for r in self.records],
                "run": asdict(self.run) if self.run is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cumulative_j = float(state["cumulative_j"])
        self.cumulative_g = float(state["cumulative_g"])
        self.cumulative_cost = state.get("cumulative_cost")
        self.stage_counts = dict(state.get("stage_counts", {}))
        self.records = [_record_from_json(r) for r in state.get("records", [])]
        run = state.get("run")
        if run and self.run is None:
            self.run = RunRef(**run)


def _record_to_json(r: EpochRecord) -> dict[str, Any]:
    return asdict(r)


def _record_from_json(d: Mapping[str, Any]) -> EpochRecord:
    return EpochRecord(**{**d, "footprint": Footprint(**d["footprint"])})


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the leading dimension of its first tensor-like value."""
    if hasattr(batch, "shape") and len(batch.shape) > 0:
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return next((batch_size(v) for v in batch.values() if batch_size(v)), 0)
    if isinstance(batch, list | tuple) and batch:
        return batch_size(batch[0]) if not isinstance(batch[0], int | float | str) else len(batch)
    return 0
