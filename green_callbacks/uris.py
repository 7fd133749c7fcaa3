"""Tracking URIs without their secrets: ``http://user:password@host`` is written and printed as ``http://host``.

The credentials travel the way MLflow intends, in its environment variables
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``) of the process that talks to the
server (the sender, or ``green-callbacks replay``), never in a file or a line of output. MLflow's
database stores (``postgresql://user:password@host/db``) read no such variable: SQLAlchemy takes the
user and password from the URI only. Theirs travel in this package's own variables
(``GREEN_CALLBACKS_DB_USERNAME`` / ``GREEN_CALLBACKS_DB_PASSWORD``) and are put back into the URI
(:func:`with_credentials`) where the client is made, in memory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from urllib.parse import quote, unquote, urlsplit, urlunsplit

USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
DB_USERNAME_ENV, DB_PASSWORD_ENV = "GREEN_CALLBACKS_DB_USERNAME", "GREEN_CALLBACKS_DB_PASSWORD"
# MLflow's database stores, with a driver or not (postgresql+psycopg2://): SQLAlchemy URLs
_DATABASE = re.compile(r"^(?:postgresql|mysql|mssql|sqlite)(?:\+[A-Za-z0-9_.-]+)?://", re.I)


def is_database(uri: str | None) -> bool:
    """Whether ``uri`` names one of MLflow's SQLAlchemy stores (sqlite, PostgreSQL, MySQL, SQL Server)."""
    return bool(uri) and _DATABASE.match(uri) is not None  # type: ignore[arg-type]


def split_credentials(uri: str | None) -> tuple[str | None, dict[str, str]]:
    """``uri`` without a user or password, and those as the environment variables that carry them (empty when
    none): MLflow's for a server, this package's for a database (see the module's docstring)."""
    if not uri or "@" not in uri:
        return uri, {}
    try:
        parts = urlsplit(uri)
        user, password, host = parts.username, parts.password, parts.hostname
    except ValueError:  # not a URL (a Windows path, say): nothing to take apart
        return uri, {}
    if user is None and password is None:
        return uri, {}
    names = (DB_USERNAME_ENV, DB_PASSWORD_ENV) if is_database(uri) else (USERNAME_ENV, PASSWORD_ENV)
    env = {names[0]: unquote(user or "")}
    if password is not None:
        env[names[1]] = unquote(password)
    if is_database(uri):  # (kept whole but for the user and password: a database on a socket has no host, and
        # urlunsplit would write its empty netloc without the "//" SQLAlchemy needs)
        head = _DATABASE.match(uri).end()  # type: ignore[union-attr]
        return uri[:head] + parts.netloc.rpartition("@")[2] + uri[head + len(parts.netloc):], env
    netloc = parts.netloc.rpartition("@")[2] if host else ""
    return urlunsplit(parts._replace(netloc=netloc)), env


def with_credentials(uri: str) -> str:
    """A database URI with the user and password :func:`split_credentials` took out of it put back, from this
    package's variables in this process's environment: for the client that connects, never for a file or a
    message. Any other URI, or one that has its own user, is returned as it is."""
    user = os.environ.get(DB_USERNAME_ENV)
    if not is_database(uri) or user is None:
        return uri
    head = _DATABASE.match(uri).end()  # type: ignore[union-attr]
    netloc = urlsplit(uri).netloc
    if "@" in netloc:
        return uri
    password = os.environ.get(DB_PASSWORD_ENV)
    userinfo = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe=""))
    return f"{uri[:head]}{userinfo}@{uri[head:]}"


# ``scheme://`` then anything up to the last "@": the user and password of a URI that cannot be taken apart (a "#",
# "/" or "?" in the password, a port that is no number, a broken IPv6 address, no host)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//([^/].*)@", re.S)


def without_credentials(uri: str | None) -> str | None:
    """``uri`` less the user and password it holds as a URL parser (MLflow's too) reads them, nothing else changed:
    for the URIs records are sent to (a spool's header, replay's destination). :func:`redact` is for what is shown
    or written, and hides more (``http://host/a@b`` is shown ``http://***@b``, as a password cut at "/" would be)."""
    return split_credentials(uri)[0]


def redact(uri: str | None) -> str | None:
    """``uri`` without its user and password (unchanged when it has none).

    A URI whose user and password cannot be taken apart cleanly (``http://me:p#w@host``: the "#" starts a
    fragment; ``http://me:pw@:5000``: no host) keeps no part of them either: everything between ``//`` and the
    last "@" is written ``***`` (a path with an "@" in it is cut too: a message shows less, never a password).
    """
    if not uri or "@" not in uri:
        return uri
    clean = split_credentials(uri)[0]
    try:
        parts = urlsplit(uri)
        taken_apart = clean != uri and bool(parts.hostname) and "@" not in clean
        whole = clean == uri and "@" not in parts.netloc + parts.path + parts.query + parts.fragment
    except ValueError:
        taken_apart = whole = False
    if taken_apart or whole:
        return clean
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}//***@", uri, count=1)


@contextlib.contextmanager
def temporary_env(env: Mapping[str, str]) -> Iterator[None]:
    """Environment variables (MLflow's credentials, its HTTP settings) set to ``env`` for a while, then as they
    were: MLflow reads them at every request."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
