"""Every EnergyTracker argument checked before training: a ValueError naming it, its value and the choices."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from green_callbacks.sensors.estimate import CPU_SCOPES
from green_callbacks.units import brief, currency_code, is_finite_number, is_integer
from green_callbacks.uris import redact

ARTIFACT_CHOICES = ("intervals", "trace", "plot", "summary")
MIN_SAMPLING_PERIOD_S = 0.005  # NVML and RAPL refresh every 1-100 ms: faster sampling only burns a core
GPU_CHOICES = '"auto", "all", None (no GPU) or a list of CUDA device indices like [0, 1]'
_CURRENCY = re.compile(r"^[A-Z]{3}$")
TWO_MONITORS = ("two EnergyMonitors in one Trainer: keep one (it measures every device of the run; gpus='all' or a "
                "list of indices picks which)")


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={brief(value)} must be True or False")
    return value


def _number(name: str, value: Any, low: float, high: float = math.inf, optional: bool = False,
            what: str = "") -> float | None:
    if value is None and optional:
        return None
    if not is_finite_number(value) or not low <= value <= high:  # (10**400: no float, not finite)
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name}={brief(value)} must be a finite number {bounds}{what}"
                         f"{' or None' if optional else ''}")
    return float(value)


def named_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """A public ``__init__`` whose unknown keyword (a typo in a Hydra config, ``enrgy=``) is a TypeError naming the
    class the user wrote, the close name and every argument, not Python's ``BudgetStopper.__init__() got an
    unexpected keyword argument`` (an inherited class's name, no choices). The signature stays ``init``'s
    (``functools.wraps``): LightningCLI and jsonargparse read it."""
    params = inspect.signature(init).parameters
    names = [n for n, p in list(params.items())[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            raise TypeError(f"{type(self).__name__} has no argument {unknown[0]!r}"
                            f"{f' (did you mean {close[0]!r}?)' if close else ''}; its arguments are {names}")
        init(self, *args, **kwargs)

    return checked


def _string(name: str, value: Any, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) and name in ("country", "cloud_region", "currency"):  # YAML 1.1: NO (Norway)...
        raise ValueError(f"{name}={brief(value)} must be a non-empty string; a YAML file reads an unquoted NO, No, "
                         f"yes, on or off as {value}: quote it ({name}: \"NO\")")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={brief(value)} must be a non-empty string{' or None' if optional else ''}")
    return value


_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # with a driver too: postgresql+psycopg2://
_STORE_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc", *_DB_SCHEMES)


def _store_schemes() -> list[str]:
    """The schemes MLflow takes a tracking URI in: its own and those of installed tracking-store plugins."""
    from importlib.metadata import entry_points

    return [*_STORE_SCHEMES[1:], *sorted(e.name for e in entry_points(group="mlflow.tracking_store"))]


def _uri_parts(name: str, uri: str) -> tuple[Any, str]:
    """``uri`` taken apart, and as it is shown: without its user and password. A URI that cannot be read, or a server
    URI without a host or with port 0, is refused here."""
    shown = redact(uri)
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        reason = str(exc) if shown == uri else _reason_without_secrets(shown)
        raise ValueError(f"{name}={brief(shown)} is not a URI MLflow can open ({reason})") from None
    base = parts.scheme.lower()
    if base in ("http", "https") and shown != uri and "@" in parts.path + parts.query + parts.fragment:
        raise ValueError(f"{name}={brief(shown)} is not a URI MLflow can open ({_reason_without_secrets(shown)})")
    if base in ("http", "https") and not parts.hostname:
        raise ValueError(f"{name}={brief(shown)} names no host; like 'http://127.0.0.1:5000'")
    if base in ("http", "https") and port == 0:
        raise ValueError(f"{name}={brief(shown)}: port 0 is no server's port; like 'http://127.0.0.1:5000'")
    return parts, shown


def _reason_without_secrets(shown: str) -> str:
    """Why a URI with a user or password cannot be read, said of the URI without them (urlsplit's own message
    can quote a piece of the password: ``http://me:p#w@host`` reads "p" as the port)."""
    try:
        _ = urlsplit(shown).port  # (reading the port is what raises)
    except ValueError as exc:
        return str(exc)
    return ("its user or password holds a character a URI takes only percent-encoded there, like '#', '/', '?' or "
            "'@' (%23, %2F, %3F, %40); or give them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


def check_server_uri(name: str, uri: str) -> None:
    """The form of a tracking URI given to read from (``green-callbacks report --tracking-uri``): readable, and a
    server URI with a host, said without the URI's user and password, in a scheme MLflow has a store for."""
    parts, shown = _uri_parts(name, uri)
    scheme = parts.scheme.lower()
    if not ((len(scheme) == 1 and scheme.isalpha()) or scheme in ("", "file")):
        _check_scheme(name, scheme, shown)


def check_tracking_uri(name: str, uri: str) -> None:
    """A URI MLflow could never open (a misspelt scheme, no host, a port that is no number, an in-memory
    sqlite store that would die with the process that sends) is an error now, not an outage reported after
    training. Whether the store answers or can be written is found at the start, as a fault. No message shows
    the URI's user or password."""
    parts, shown = _uri_parts(name, uri)
    scheme = parts.scheme.lower()
    if (len(scheme) == 1 and scheme.isalpha()) or scheme in ("", "file"):  # a file store (C:\mlruns: a Windows path)
        _check_file_store_taken(name, shown)
        return
    base = _check_scheme(name, scheme, shown)
    if base == "sqlite":
        from green_callbacks.sinks.vetting import local_store

        if local_store(uri) is None:
            raise ValueError(f"{name}={brief(shown)} names no database file (an in-memory store would be lost with "
                             "the process that sends to it); like 'sqlite:///mlflow.db'")


def _check_scheme(name: str, scheme: str, shown: str) -> str:
    """The scheme (a database's without its driver: ``postgresql+pg8000``), one MLflow has a tracking store for."""
    base = scheme.split("+", 1)[0] if scheme.split("+", 1)[0] in _DB_SCHEMES else scheme
    if base not in _STORE_SCHEMES and base not in _store_schemes():
        raise ValueError(f"{name}={brief(shown)}: MLflow has no tracking store for the scheme {brief(scheme)}; "
                         f"choose from {_store_schemes()}, like 'sqlite:///mlflow.db' or 'http://127.0.0.1:5000'")
    return base


def _check_file_store_taken(name: str, shown: str) -> None:
    """MLflow from 3.13 on refuses a file store (``./mlruns``, ``file:./mlruns``, a folder path) unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true: an error now, not "nothing more can be sent" after the training. Only a
    file store's URI pays MLflow's import here."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow that takes file stores as they are
        return
    try:
        if MLFLOW_ALLOW_FILE_STORE.get():
            return
    except ValueError:  # MLFLOW_ALLOW_FILE_STORE=yes: MLflow would refuse the store for it
        raise ValueError(f"MLFLOW_ALLOW_FILE_STORE={brief(os.environ.get('MLFLOW_ALLOW_FILE_STORE'))} is not a value "
                         "MLflow reads; choose from ['true', 'false', '1', '0']") from None
    from importlib.metadata import version

    raise ValueError(f"{name}={brief(shown)} names a file store (a folder of runs), which MLflow {version('mlflow')} "
                     "refuses unless MLFLOW_ALLOW_FILE_STORE=true; choose a database store, like "
                     "'sqlite:///mlflow.db' (`mlflow migrate-filestore` moves an existing folder into one), a server, "
                     "like 'http://127.0.0.1:5000', or set MLFLOW_ALLOW_FILE_STORE=true")


def check_no_nul(name: str, path: Any) -> None:
    """A path with a NUL character in it is no path: refused now, by name, not a bare ``ValueError('embedded null
    byte')`` from the first ``open`` after training."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(text, str | bytes) and ("\x00" in text if isinstance(text, str) else b"\x00" in text):
        raise ValueError(f"{name}={brief(text)} holds a NUL character ('\\x00'), which no file path can hold; "
                         "give the path of a file or folder")


def _path(name: str, value: Any, optional: bool = True) -> str | None:
    """A file or folder: a string or a ``pathlib.Path``."""
    check_no_nul(name, value)
    return _string(name, os.fspath(value) if isinstance(value, os.PathLike) else value, optional)


def check_gpus(gpus: Any) -> Any:
    """``"auto"``, ``"all"``, ``None`` (no GPU) or a list of CUDA indices; anything else is an error."""
    if gpus is None or (isinstance(gpus, str) and gpus in ("auto", "all")):
        return gpus
    if isinstance(gpus, str | bytes) or not isinstance(gpus, Sequence):
        raise ValueError(f"gpus={brief(gpus)} is not valid; choose {GPU_CHOICES}")
    if not all(is_integer(g) and g >= 0 for g in gpus):
        raise ValueError(f"gpus={brief(list(gpus))}: CUDA device indices are integers >= 0; choose {GPU_CHOICES}")
    indices = [int(g) for g in gpus]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:  # gpu0 listed (and its joules counted) twice
        raise ValueError(f"gpus={brief(indices)}: device(s) {twice} given more than once; list each CUDA device "
                         f"index once; choose {GPU_CHOICES}")
    return indices or None  # an empty list: no GPU, as None (not "NVML sees no GPU")


def check_currency(currency: Any) -> str:
    if not isinstance(currency, str) or not _CURRENCY.match(currency.upper()):
        raise ValueError(f"currency={brief(currency)} must be an ISO 4217 code of three letters, like 'EUR', 'USD', "
                         "'GBP'")
    return currency_code("currency", currency, currency)


def check_tracker_args(a: Mapping[str, Any]) -> dict[str, Any]:
    """The EnergyTracker's arguments, checked and normalised."""
    out = dict(a)
    out["gpus"] = check_gpus(a["gpus"])
    for name in ("measure_cpu", "mlflow"):
        out[name] = _bool(name, a[name])
    if a["cuda_sync"] is not None:
        _bool("cuda_sync", a["cuda_sync"])
    out["sampling_period_s"] = _number("sampling_period_s", a["sampling_period_s"], MIN_SAMPLING_PERIOD_S, 60.0,
                                       what=" seconds (the sensors refresh no faster than every few ms)")
    out["cpu_tdp_w"] = _number("cpu_tdp_w", a["cpu_tdp_w"], 1.0, 10_000.0, optional=True, what=" watts")
    if a["cpu_scope"] not in CPU_SCOPES:
        raise ValueError(f"cpu_scope={brief(a['cpu_scope'])} is not valid; choose from {list(CPU_SCOPES)}")
    out["price_per_kwh"] = _number("price_per_kwh", a["price_per_kwh"], 0.0, 1e6, optional=True)
    out["carbon_intensity_g_per_kwh"] = _number("carbon_intensity_g_per_kwh", a["carbon_intensity_g_per_kwh"],
                                                0.0, 5000.0, optional=True, what=" g CO2e per kWh")
    out["pue"] = _number("pue", a["pue"], 1.0, 10.0, what=" (1.0 = no facility overhead; about 1.1 hyperscale, "
                                                          "1.58 industry average)")
    out["currency"] = check_currency(a["currency"])
    for name in ("country", "cloud_region", "tracking_uri", "experiment_name", "run_name"):
        out[name] = _string(name, a[name])
    out["carbon_intensity_csv"] = _path("carbon_intensity_csv", a["carbon_intensity_csv"])
    if out["carbon_intensity_csv"] is not None:
        also = {k: a[k] for k in ("carbon_intensity_g_per_kwh", "country", "cloud_region") if a[k] is not None}
        if also:
            settings = ", ".join(f"{k}={brief(v)}" for k, v in also.items())
            raise ValueError(f"carbon intensity is set more than once (carbon_intensity_csv="
                             f"{brief(out['carbon_intensity_csv'])}, {settings}); choose one of carbon_intensity_csv, "
                             "carbon_intensity_g_per_kwh, country, cloud_region")
    if out["mlflow"]:
        if out["tracking_uri"] is not None:
            check_tracking_uri("tracking_uri", out["tracking_uri"])
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            check_tracking_uri("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    if out["experiment_name"] is not None and len(out["experiment_name"]) > 500:
        raise ValueError(f"experiment_name of {len(out['experiment_name'])} characters: MLflow accepts at most 500")
    out["output_dir"] = _path("output_dir", a["output_dir"], optional=False)
    artifacts = a["log_artifacts"]
    if isinstance(artifacts, bool):
        out["log_artifacts"] = list(ARTIFACT_CHOICES) if artifacts else []
    elif isinstance(artifacts, Sequence) and not isinstance(artifacts, str | bytes):
        artifacts = ["intervals" if x == "epochs" else x for x in artifacts]  # the name before intervals
        bad = [x for x in artifacts if x not in ARTIFACT_CHOICES]
        if bad:
            raise ValueError(f"log_artifacts={brief(list(artifacts))}: unknown {brief(bad)}; choose from "
                             f"{list(ARTIFACT_CHOICES)}")
        out["log_artifacts"] = list(artifacts)
    else:
        raise ValueError(f"log_artifacts={brief(artifacts)} must be True, False or a list from "
                         f"{list(ARTIFACT_CHOICES)}")
    metrics = a["efficiency_metrics"]
    if metrics is not None and (isinstance(metrics, str | bytes) or not isinstance(metrics, Sequence)
                                or not all(isinstance(m, str) and m for m in metrics)):
        raise ValueError(f"efficiency_metrics={brief(metrics)} must be a list of metric names or None")
    out["efficiency_metrics"] = None if metrics is None else list(metrics)
    n = a["log_every_n_steps"]
    if n is not None and (not is_integer(n) or n < 1):
        raise ValueError(f"log_every_n_steps={brief(n)} must be an integer >= 1, or None to derive it from log_every_s")
    out["log_every_n_steps"] = None if n is None else int(n)
    out["log_every_s"] = _number("log_every_s", a["log_every_s"], 0.1, 86_400.0, what=" seconds")
    out["mlflow_wait_s"] = _number("mlflow_wait_s", a["mlflow_wait_s"], 0.0, 3600.0, what=" seconds")
    return out
