"""Fail fast at start: every service a session needs must answer before Ray starts or anything is written.

``ddsm-bench run``/``tune``/``report`` call these first; each raises :class:`ddsm.config.ConfigError`
(exit 2, one line, password redacted) naming what was tried and what to do, within
:data:`CONNECT_TIMEOUT_S` instead of the minutes MLflow's and Ray's own retries take:

- :func:`check_tracking_uri`: an MLflow tracking URI. ``http(s)://`` must answer ``GET /health``;
  a database URL must connect (:func:`check_database`); a SQLite file or a local folder is not a
  service (nothing to reach).
- :func:`check_database`: any SQLAlchemy URL (MLflow's store, Optuna's storage): the driver is
  installed (``postgresql://`` is psycopg 3 under SQLAlchemy 2.1: ``pip install -e '.[cluster]'``),
  the server accepts a connection, the credentials and the database exist.
- :func:`check_tcp`: something listens at ``host:port`` (the Ray address, see
  :func:`harness.ray_backend.connect`).
"""
from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

from ddsm.config import ConfigError
from harness.secrets import redact

__all__ = ["CONNECT_TIMEOUT_S", "check_database", "check_tcp", "check_tracking_uri", "is_database_url"]

CONNECT_TIMEOUT_S = 10  # per attempt; every check makes one attempt
# SQLAlchemy dialects MLflow and Optuna can store into, and what installs their default driver.
_DIALECTS = {"postgresql": "psycopg (pip install -e '.[cluster]', or pip install 'psycopg[binary]')",
             "mysql": "mysqlclient (pip install mysqlclient), or use mysql+pymysql:// with pymysql",
             "mssql": "pyodbc (pip install pyodbc)"}


def is_database_url(url: str) -> bool:
    """Whether ``url`` is a client/server database URL (``postgresql://``, ``mysql+pymysql://``, ...)."""
    return urlsplit(url).scheme.split("+")[0] in _DIALECTS


def check_tracking_uri(uri: str) -> None:
    """Raise ConfigError unless the MLflow tracking store at ``uri`` answers (see the module docstring)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri)
    elif is_database_url(uri):
        check_database(uri, what="MLflow tracking store (--tracking-uri)")


def check_database(url: str, *, what: str) -> None:
    """Connect once to the database at ``url`` (SQLAlchemy URL) with a timeout; ConfigError if that fails.

    ``what`` names the setting in the message (e.g. ``Optuna storage (search.storage)``). SQLite and
    anything that is not a client/server database pass without a check.
    """
    if not is_database_url(url):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = redact(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as e:
        raise ConfigError(f"{what} {shown!r} is not a valid database URL: {_first_line(e, url)}") from None
    dialect = parsed.get_backend_name()
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if dialect in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(parsed, poolclass=NullPool, connect_args=args)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
        driver = parsed.get_driver_name() if "+" in parsed.drivername else None
        need = f"the {driver} driver (pip install {driver})" if driver else _DIALECTS.get(dialect, "its driver")
        raise ConfigError(f"{what} {shown!r}: the database driver is not installed ({_first_line(e, url)}); "
                          f"install {need}") from None
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.DBAPIError as e:
        raise ConfigError(f"{what} {shown!r} did not accept a connection: {_db_reason(e, url)}") from None
    finally:
        engine.dispose()


def check_tcp(host: str, port: int, *, what: str, hint: str = "") -> None:
    """Raise ConfigError unless a TCP connection to ``host:port`` opens within :data:`CONNECT_TIMEOUT_S`."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise ConfigError(f"{what}: nothing answers at {host}:{port} ({reason}, tried for up to "
                          f"{CONNECT_TIMEOUT_S} s){'; ' + hint if hint else ''}") from None


def _check_http(uri: str) -> None:
    """``GET <uri>/health`` (an MLflow server's liveness endpoint); any HTTP answer but 401/403 passes."""
    import requests

    parts = urlsplit(uri)
    auth = (parts.username or "", parts.password or "") if parts.username else None
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    shown = redact(uri)
    try:
        answer = requests.get(health, auth=auth, timeout=(CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S))
    except requests.RequestException as e:
        raise ConfigError(f"MLflow tracking server {shown!r} is not reachable ({_http_reason(e)}, tried "
                          f"GET {redact(health)} for up to {CONNECT_TIMEOUT_S} s): start it (mlflow server "
                          "--host 0.0.0.0 --port 5000 ...) or pass another --tracking-uri") from None
    if answer.status_code in (401, 403):
        raise ConfigError(f"MLflow tracking server {shown!r} refused the credentials (HTTP {answer.status_code}): "
                          "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")


def _http_reason(e: Exception) -> str:
    import requests

    if isinstance(e, requests.ConnectTimeout):
        return "connection timed out"
    if isinstance(e, requests.ReadTimeout):
        return "no answer"
    if isinstance(e, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(e, requests.ConnectionError):
        return "connection refused or host unknown"
    return type(e).__name__


def _db_reason(e: Exception, url: str) -> str:
    """The server's own words (first line: refused, password authentication failed, no such database)."""
    return _first_line(getattr(e, "orig", None) or e, url)


def _first_line(e: object, url: str) -> str:
    """The first non-empty line of an error, with the URL's password removed however it was quoted."""
    text = redact(str(e))
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
