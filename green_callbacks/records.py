"""Interval records (epoch, evaluation, logging point) and the MLflow metric contract (ranks.py merges ranks).

Every name green-callbacks logs to MLflow is written in this file; ``docs/metrics.md`` is its
reader's version. Points that belong to a moment of training are logged at the trainer's global
step, so in the MLflow UI they overlay the loss and accuracy charts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from green_callbacks.accounting import J_PER_KWH, Footprint
from green_callbacks.sensors import Method

VALIDATION_PREFIXES = ("val", "eval_")  # Lightning's and HF's naming of validation metrics


class Kind(str, enum.Enum):
    """What closed an interval."""

    EPOCH = "epoch"            # a training epoch, its evaluations included
    EVALUATION = "evaluation"  # from the previous evaluation's end (or the start) to this evaluation's end
    POINT = "point"            # a logging point every N steps, between evaluations
    END = "end"                # what is left when the run ends (or is interrupted)


@dataclass(frozen=True)
class IntervalRecord:
    """One interval of the whole job, every rank's devices summed.

    ``start_step``..``step`` are the trainer's global steps the interval covers; ``eval_j`` is
    the energy of the evaluation(s) inside it (an epoch's validation, or the evaluation that
    closes an evaluation interval).
    """

    kind: Kind
    index: int
    epoch: int
    start_step: int
    step: int
    duration_s: float
    energy_j: float
    components_j: dict[str, float]
    devices_j: dict[str, float]
    methods: dict[str, str]
    footprint: Footprint
    cumulative_j: float
    cumulative_g: float
    cumulative_cost: float | None
    start_rel_s: float
    end_rel_s: float
    eval_j: float = 0.0
    eval_s: float = 0.0
    gpu_peak_w: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    partial: bool = False
    unread: tuple[str, ...] = ()  # devices (labels as in devices_j) not read for some of the interval
    components_w: dict[str, float] = field(default_factory=dict)  # mean power per component (see Merged.watts)

    @property
    def mean_power_w(self) -> float:
        if self.components_w:
            return sum(self.components_w.values())
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        """A flat row for ``intervals.csv`` and pandas."""
        fp = self.footprint
        row: dict[str, Any] = {
            "kind": self.kind.value, "index": self.index, "epoch": self.epoch, "start_step": self.start_step,
            "step": self.step, "duration_s": self.duration_s, "energy_j": self.energy_j,
            **{f"{c}_j": j for c, j in self.components_j.items()}, "eval_j": self.eval_j, "kwh": fp.kwh,
            "g_co2e": fp.g_co2e, "cost": fp.cost, "cumulative_j": self.cumulative_j,
            "cumulative_g": self.cumulative_g, "gpu_peak_w": self.gpu_peak_w, "partial": self.partial}
        row.update({f"method_{c}": m for c, m in self.methods.items()})
        row.update(self.metrics)
        return row

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IntervalRecord:
        return cls(**{**d, "kind": Kind(d["kind"]), "footprint": Footprint(**d["footprint"]),
                      "unread": tuple(d.get("unread", ()))})


def run_methods(records: Sequence[IntervalRecord]) -> dict[str, str]:
    """Per component, the weakest method over ``records``: the run's totals are only as good as their worst part."""
    seen: dict[str, list[Method]] = {}
    for record in records:
        for component, method in record.methods.items():
            seen.setdefault(component, []).append(Method(method))
    return {c: Method.weakest(ms).value for c, ms in seen.items()}


# -- the metric contract ---------------------------------------------------------------------------
def cumulative_metrics(cumulative_j: float, cumulative_g: float, cumulative_cost: float | None,
                       mean_power_w: float) -> dict[str, float]:
    """At most once per global step, at the first point (evaluation, epoch end, every-N-steps) of that step;
    ``power/mean_w`` is the mean total power since the previous point."""
    out = {"energy/cumulative_j": cumulative_j, "emissions/cumulative_g": cumulative_g, "power/mean_w": mean_power_w}
    if cumulative_cost is not None:
        out["cost/cumulative"] = cumulative_cost
    return out


def read_throughout(r: IntervalRecord) -> bool:
    """Whether some component was read throughout ``r``: where none was (the only GPU lost before or during it),
    its joules, emissions and cost are no measurement and are not logged (a 0 would read as one)."""
    return not r.components_j or any(c not in r.unread for c in r.components_j)


def epoch_metrics(r: IntervalRecord) -> dict[str, float]:
    """At each epoch's end: the epoch's energy by component and device, power, time, emissions."""
    fp = r.footprint
    if not read_throughout(r):
        return {"time/epoch_s": r.duration_s}
    out = {"energy/epoch_j": r.energy_j, "energy/val_j": r.eval_j, "energy/epoch_kwh": fp.kwh,
           "emissions/epoch_g": fp.g_co2e, "time/epoch_s": r.duration_s}
    unread = set(r.unread)
    for component, joules in r.components_j.items():
        if component in r.unread:  # none of its devices read throughout: a 0 would read as a measurement
            continue
        out[f"energy/{component}_j"] = joules
        out[f"power/{component}_mean_w"] = r.components_w[component] if component in r.components_w else \
            joules / r.duration_s if r.duration_s > 0 else 0.0
    if "gpu" in r.components_j and "gpu" not in unread:
        out["power/gpu_peak_w"] = r.gpu_peak_w
    # GPUs, and host devices labelled by node when several nodes measured theirs (node0/cpu, node1/cpu); a device
    # not read throughout the epoch (lost, MIG, a failed sensor) has no number of its own
    out.update({f"energy/{d}_j": j for d, j in r.devices_j.items()
                if (d.startswith("gpu") or "/" in d) and d not in unread})
    if fp.cost is not None:
        out["cost/epoch"] = fp.cost
    return out


def point_metrics(r: IntervalRecord, first_at_step: bool, mean_power_w: float,
                  wanted: Sequence[str] | None) -> dict[str, float]:
    """Everything one point logs at ``r.step``: the cumulative series (first point of a step only), and the
    epoch's or the evaluation's own names."""
    out = cumulative_metrics(r.cumulative_j, r.cumulative_g, r.cumulative_cost, mean_power_w) if first_at_step else {}
    if not read_throughout(r):  # nothing read since the last point: no power measured for it
        out.pop("power/mean_w", None)
    if r.kind is Kind.EPOCH:
        out.update(epoch_metrics(r))
    elif r.kind is Kind.EVALUATION:
        out.update(evaluation_metrics(r, wanted))
    return out


def efficiency_metrics(metrics: Mapping[str, float], cumulative_j: float,
                       wanted: Sequence[str] | None) -> dict[str, float]:
    """``efficiency/<metric>_per_kj``: an evaluation metric per kJ of the run's cumulative energy."""
    if cumulative_j <= 0:
        return {}
    return {f"efficiency/{k}_per_kj": v / (cumulative_j / 1000.0) for k, v in metrics.items()
            if (k.startswith(VALIDATION_PREFIXES) if wanted is None else k in wanted) and math.isfinite(v)}


def evaluation_metrics(r: IntervalRecord, wanted: Sequence[str] | None) -> dict[str, float]:
    """At each evaluation: the evaluation itself, the interval since the previous one, efficiency."""
    if not read_throughout(r):
        return {"time/eval_s": r.eval_s, "time/interval_s": r.duration_s}
    out = {"energy/eval_j": r.eval_j, "time/eval_s": r.eval_s, "energy/interval_j": r.energy_j,
           "time/interval_s": r.duration_s, "emissions/interval_g": r.footprint.g_co2e}
    if r.footprint.cost is not None:
        out["cost/interval"] = r.footprint.cost
    out.update(efficiency_metrics(r.metrics, r.cumulative_j, wanted))
    return out


def total_metrics(cumulative_j: float, cumulative_g: float, cost: float | None, duration_s: float) -> dict[str, float]:
    """Once, when the run ends: the totals (the last value of the cumulative series may predate the end)."""
    out = {"energy/total_j": cumulative_j, "energy/total_kwh": cumulative_j / J_PER_KWH,
           "emissions/total_g": cumulative_g, "time/total_s": duration_s}
    if cost is not None:
        out["cost/total"] = cost
    return out


def device_tags(names: Sequence[Mapping[str, Mapping[str, str]]]) -> dict[str, str]:
    """What every rank's devices are (``names``: each rank's :meth:`~green_callbacks.meter.EnergyMeter.describe`):
    tags set at the first point, and again at the end where they changed (the processes an estimate found, window
    edges that stopped reading a slow counter)."""
    # each GPU under the job-wide label its metrics have (gpu0.. in rank order), with the CUDA device it is on its
    # rank: a training on cuda:1 logs energy/gpu0_j, and this says which card that is
    gpus: list[tuple[str, str]] = []
    at: dict[tuple[str, str], tuple[int, int]] = {}  # a GPU several ranks of a node describe: listed once, as
    for r, per_rank in enumerate(names):  # merge_ranks counts it (where its first rank lists it)
        node, ids = per_rank.get("where", {}).get("node", ""), per_rank.get("gpu_ids", {})
        for k, n in per_rank.get("gpu", {}).items():
            if k == "edges":
                continue
            key = (node, ids.get(k, ""))
            if key[1] and key in at and at[key][1] != r:
                i = at[key][0]
                if gpus[i][1].startswith("unknown (") and not n.startswith("unknown ("):
                    gpus[i] = (gpus[i][0], n)  # (a rank whose NVML failed on the name)
                continue
            if key[1]:
                at.setdefault(key, (len(gpus), r))
            gpus.append((k, n))
    gpu_names = [f"gpu{i} = cuda:{k.removeprefix('gpu')} {n}" for i, (k, n) in enumerate(gpus)]
    tags = {"green.gpu_names": "; ".join(gpu_names) or "none",
            "green.cpu": "; ".join(v for n in names for k, v in n.get("cpu", {}).items()
                                   if k != "attribution") or "not measured",
            "green.cpu_attribution": "; ".join(n["cpu"]["attribution"] for n in names
                                               if "attribution" in n.get("cpu", {})) or "not measured"}
    edges = sorted({n["gpu"]["edges"] for n in names if "edges" in n.get("gpu", {})})
    if edges:
        tags["green.gpu_edges"] = "; ".join(edges)
    return tags


def run_facts(accountant_params: Mapping[str, str], world_size: int, version: str, record: IntervalRecord,
              names: Sequence[Mapping[str, Mapping[str, str]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Once per run: carbon settings and world size as params; methods and devices as tags."""
    params: dict[str, Any] = {f"green.{k}": v for k, v in accountant_params.items()}
    params.update({"green.world_size": world_size, "green.version": version})
    tags: dict[str, Any] = {f"green.method.{c}": m for c, m in record.methods.items()}
    tags["green.gpu_count"] = sum(d.startswith("gpu") for d in record.devices_j)
    tags.update(device_tags(names))
    for component in ("gpu", "cpu", "dram"):
        tags.setdefault(f"green.method.{component}", Method.UNAVAILABLE.value)
    return params, tags


# what is logged only where something is measured: the energy and what follows from it
MEASURED_PREFIXES = ("energy/", "emissions/", "cost/", "power/", "efficiency/", "throughput/", "projection/")


def stage_metrics(stage: str, joules: float, duration_s: float, g_co2e: float, samples: int,
                  cost: float | None = None) -> dict[str, float]:
    """``trainer.test``/``predict`` (Lightning), ``evaluate``/``predict`` outside training (HF)."""
    out = {f"energy/{stage}_j": joules, f"time/{stage}_s": duration_s, f"emissions/{stage}_g": g_co2e,
           f"{stage}/samples": float(samples)}
    if cost is not None:  # with a price
        out[f"cost/{stage}"] = cost
    if samples:
        out[f"energy/{stage}_j_per_sample"] = joules / samples
    return out


def throughput_metrics(samples: int, tokens: int | None, training_j: float) -> dict[str, float]:
    """At every point whose interval trained something: samples (and tokens) per joule of that interval's
    training energy (the interval's energy less the evaluation inside it), every rank summed."""
    if samples <= 0 or training_j <= 0:
        return {}
    out = {"throughput/samples_per_j": samples / training_j}
    if tokens is not None:
        out["throughput/tokens_per_j"] = tokens / training_j
    return out


# keys whose list values a tokenizer, feature extractor or image processor writes one entry per sample
PER_SAMPLE_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", "labels",
                             "pixel_values", "input_values", "input_features"})


def uncollated(batch: Any) -> bool:
    """A list of samples not yet collated: several mappings, the first holding nothing batched (2-D or more)."""
    return isinstance(batch, list | tuple) and len(batch) > 1 and all(isinstance(b, Mapping) for b in batch) and \
        not any(len(getattr(v, "shape", ())) >= 2 for v in batch[0].values())


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the leading dimension of its first tensor-like value.

    A mapping's value that is a plain list of scalars, strings or lists, or any list under a key a tokenizer or
    processor writes without ``return_tensors`` (``input_ids``, ``pixel_values``...), holds one entry per sample;
    a list of mappings none of which holds a batched (2-D) value is samples not yet collated; any other list or
    tuple is the batch's fields (``[inputs, targets]``, a ``CombinedLoader``'s batches), counted by the first. A
    dataclass is read as a mapping of its fields. Something with no length to read counts 0: never an error."""
    try:
        shape = getattr(batch, "shape", None)
        if shape is not None and not isinstance(shape, str | bytes) and len(shape) > 0:
            return int(shape[0])
        if dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # a batch class of the user's
            batch = vars(batch) if hasattr(batch, "__dict__") else {
                f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        if isinstance(batch, Mapping):
            for key, value in batch.items():
                per_sample = isinstance(value, list) and bool(value) and (
                    isinstance(value[0], numbers.Number | str | bytes | list | tuple) or key in PER_SAMPLE_KEYS)
                size = len(value) if per_sample else batch_size(value)
                if size:
                    return size
            return 0
        if isinstance(batch, list | tuple) and batch:
            first = batch[0]
            return len(batch) if isinstance(first, numbers.Number | str | bytes) or uncollated(batch) else \
                batch_size(first)
    except Exception:  # a batch type whose shape or length cannot be read
        return 0
    return 0
