"""What an MLflow error means to the sender: MLflow's verdict on a record (set it aside), a refusal of the
credentials (every record of the run: keep them for a replay), a store no retry will open, or an outage (try
again); an artifact store's failure apart from the tracking server's; each said in one short line.

Everything here runs in the sender process (or ``green-callbacks replay``), never in training.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

# a local store that is not one (a file of another kind, a damaged database), or that cannot be opened or written
# (a read-only folder or mount): no retry will open it
BROKEN_STORE = ("file is not a database", "database disk image is malformed", "unable to open database file",
                "attempt to write a readonly database")
# two processes creating the same new local store at once: the loser's first try fails, its next succeeds
STORE_RACE = ("already exists", "Online migration expected to match one row", "duplicate column name")
# MLflow's words for an HTTP answer whose body is not JSON: a proxy's, a gateway's or a balancer's, not MLflow's
NOT_MLFLOWS = re.compile(r"API request to endpoint \S+ failed with error code \d+")
# a 4xx that is no verdict on the request's content: credentials (the whole run's), slow or too many requests,
# and an endpoint not found (a gateway mid-deploy, a route missing for a while)
NO_VERDICT = (401, 403, 408, 429)
ACCESS = (401, 403)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions that caused it, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an answer, as far as it is known: a probe's (see ``RunClient``), an ``HTTPError``'s, or
    the one MLflow's error code stands for (a body that is not MLflow's JSON error reads as 500)."""
    from mlflow.exceptions import MlflowException

    probed = getattr(exc, "green_http_status", None)
    if isinstance(probed, int):
        return probed
    response = getattr(exc, "response", None)
    if isinstance(getattr(response, "status_code", None), int):
        return int(response.status_code)
    if isinstance(exc, MlflowException):
        return int(exc.get_http_status_code())
    return None


# an answer that came, in MLflow's words: its retries spent on 5xx answers, or an answer that is not MLflow's JSON
ANSWERED = re.compile(r"too many (\d{3}) error responses|failed with error code (\d{3})")
NOT_JSON = "was successful but the response body was not in a valid JSON format"  # a 200 page: a login page


def answer_of(exc: BaseException) -> str | None:
    """What the server, or something in front of it, answered a failed request with (``HTTP 503``, ``JSON that is
    not MLflow's``, ``a page that is not MLflow's API``); None where no answer came (the connection refused or reset,
    the request timed out): "answers HTTP 500" is not "cannot be reached". Only this error and its explicit causes
    are read, not an earlier error handled on the way (a refusal before the server went down)."""
    from mlflow.exceptions import RestException

    while exc is not None:
        status = getattr(exc, "green_http_status", None)  # a probe's: another request, so only a failure's is told
        if not (isinstance(status, int) and status >= 300):
            status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 300:
            return f"HTTP {status}"
        if isinstance(exc, RestException):
            return "JSON that is not MLflow's" if foreign_json(exc) else f"HTTP {exc.get_http_status_code()}"
        if found := ANSWERED.search(str(exc)):
            return f"HTTP {found.group(1) or found.group(2)}"
        if NOT_JSON in str(exc):
            return "a page that is not MLflow's API"
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def foreign_json(exc: BaseException) -> bool:
    """Whether an error answer was JSON without MLflow's ``error_code`` (``{"message": "Unauthorized"}`` from an
    auth gateway): MLflow reads it as INTERNAL_ERROR (500) whatever its real status was."""
    from mlflow.exceptions import RestException
    from mlflow.protos.databricks_pb2 import ErrorCode

    if not isinstance(exc, RestException):
        return False
    code = exc.json.get("error_code") if isinstance(getattr(exc, "json", None), dict) else None
    return not (isinstance(code, str) and code in ErrorCode.DESCRIPTOR.values_by_name)


def mlflow_verdict(exc: BaseException) -> bool:
    """Whether MLflow itself judged the request's content and refused it (``INVALID_PARAMETER_VALUE``,
    ``BAD_REQUEST``, ``RESOURCE_DOES_NOT_EXIST``: a 4xx in MLflow's own error, or a local store's). Not an
    answer from something in front of MLflow (a body that is not MLflow's JSON error), not ``ENDPOINT_NOT_FOUND``
    (a gateway's 404 during a deploy), not 401/403 (the credentials: the whole run's), 408 or 429 (try again)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException) or foreign_json(exc) or NOT_MLFLOWS.search(str(exc)):
        return False
    if exc.error_code == "ENDPOINT_NOT_FOUND":
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in NO_VERDICT


def permanent(exc: BaseException) -> bool:
    """Whether the request was refused for good: MLflow's verdict on it (see ``mlflow_verdict``), or a local
    store that no retry will open (not a database, a read-only folder). Everything else (an outage, a gateway's
    answer, a refusal of the credentials: see ``access_refused``) is not."""
    if mlflow_verdict(exc):
        return True
    if any(marker in str(e) for e in causes(exc) for marker in BROKEN_STORE):
        return True
    return isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError)


def access_refused(exc: BaseException) -> bool:
    """Whether the credentials were refused (401: a token expired; 403: write permission lost), by MLflow or by
    a gateway in front of it (plain text, or JSON of its own: its status found by a probe): a refusal of every
    record of the run, never of one record's content."""
    return any(http_status(e) in ACCESS for e in causes(exc))


def store_race(exc: BaseException) -> bool:
    """Whether the store was being created by another process at that moment (retried without a word)."""
    return any(marker in str(e) for e in causes(exc) for marker in STORE_RACE)


def timed_out(exc: BaseException) -> bool:
    """Whether a request went unanswered within the HTTP timeout (a slow server, or a hung one); a connection
    that could not be made in time (a host that drops packets) is not: a longer wait would not help it."""
    chain = list(causes(exc))
    if any("ConnectTimeout" in type(e).__name__ or "connect timeout" in str(e).lower() for e in chain):
        return False
    return any(type(e).__name__ in ("ReadTimeout", "ReadTimeoutError", "TimeoutError") or "timed out" in str(e)
               for e in chain)


def http_timeout_s() -> int:
    """MLflow's HTTP request timeout as this process has it: its environment variable, else MLflow's default."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

    try:
        return max(1, int(float(MLFLOW_HTTP_REQUEST_TIMEOUT.get())))
    except (TypeError, ValueError):
        return 120


def describe(exc: BaseException) -> str:
    """An exception in one short line: MLflow's error code and message, or the type and message. A long one keeps
    its start and its end, where MLflow's advice (``set MLFLOW_ALLOW_FILE_STORE=true``) and the root cause
    (``Connection refused``) are."""
    code = getattr(exc, "error_code", None)
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:200] + " ... " + text[-200:]
    if isinstance(getattr(exc, "green_http_status", None), int):  # a gateway's JSON: its real status, not MLflow's 500
        return f"HTTP {exc.green_http_status} from {exc.green_http_probe}: {text.removeprefix(f'{code}: ')}"
    return f"{code}: {text.removeprefix(f'{code}: ')}" if code else f"{type(exc).__name__}: {text}"  # said once


class ArtifactFailed(Exception):
    """The artifact store did not take a file, though the tracking server answered. ``refused``: it judged the
    file (a 4xx such as 413, too large for a proxy; a local folder that cannot be written), and no retry will
    change that; otherwise it failed (a 5xx, unreachable, a full disk) and may take it later."""

    def __init__(self, path: str, cause: BaseException) -> None:
        status = http_status(cause)
        self.path = path
        self.refused = permanent(cause) or (status is not None and 400 <= status < 500
                                            and status not in (*NO_VERDICT, 404))
        super().__init__(describe(cause))


class _NotRecognized(logging.Filter):
    """MLflow's warning for an error answer without its ``error_code`` (a gateway's JSON), given at every try:
    the sender says what happened once, in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Received error code not recognized")


NOT_RECOGNIZED = _NotRecognized()


def sqlite_unwritable(uri: str) -> str | None:
    """Why a sqlite store cannot be opened for writing (its folder missing or read-only, the file read-only), or
    None. MLflow would find out only after minutes of retries inside its engine's start-up; ``os.access`` says
    so at once, a read-only mount included (for root too)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest.startswith(":memory:"):
        return None
    path = Path(rest)
    if path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):  # sqlite writes its journal beside the file
            return f"the MLflow store {path} cannot be written: its folder {path.parent} is read-only"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"the MLflow store {path} cannot be written: the file is read-only"
        return None
    folder = next((p for p in path.parents if p.exists()), None)  # MLflow creates the folders missing below it
    if folder is not None and not folder.is_dir():
        return f"the MLflow store {path} cannot be created: {folder} is a file, not a folder"
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        return f"the MLflow store {path} cannot be created: {folder} is read-only"
    return None
