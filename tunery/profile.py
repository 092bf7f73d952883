"""The store profile: which Prefect server, MLflow server and DVC remote this project uses.

With no profile, every store is the embedded default (Prefect's temporary server, the sqlite
MLflow store in the project, the DVC remote of `.dvc/config`). A profile is one environment file,
`.env` in the project root (or the file `TUNERY_ENV_FILE` names; `tunery.env.example` documents
it), that switches all of them at once:

    PREFECT_API_URL       a Prefect server's API (http://HOST:4200/api)
    MLFLOW_TRACKING_URI   an MLflow tracking server (http://HOST:5000), artifacts proxied by it
    MLFLOW_REGISTRY_URI   only when the registry is on another server
    TUNERY_DVC_REMOTE     the DVC default remote's URL (s3://BUCKET/PATH, or a folder)
    TUNERY_DVC_ENDPOINT   the endpoint of an S3-compatible store (MinIO, Ceph, moto)

A variable already set in the environment wins over the file. The DVC remote is applied as the
remote `profile` in `.dvc/config.local` (not in git). Credentials never go in the file's
example or in the repo: storage credentials (AWS_ACCESS_KEY_ID, ...) come from the environment
of the process that needs them, and a URL's password is never shown.

`verify()` asks each configured store whether it answers (seconds, no retries) and raises
`StoreUnavailable` naming the store and the URL: `tunery check` calls it, and so do the commands
that run stages, before any stage starts. A server is asked twice: its health path (which both
servers answer without credentials), then a cheap read with the credentials this process's
clients would send (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD for MLflow,
PREFECT_API_AUTH_STRING or PREFECT_API_KEY for Prefect, from the environment): a refusal is
`CredentialsRefused`, saying which variables to set, at start rather than at the first write.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tunery.errors import ConfigError, TuneryError
from tunery.io import atomic_path

ENV_FILE = ".env"
EXAMPLE_FILE = "tunery.env.example"
DVC_REMOTE = "profile"  # the remote's name in .dvc/config.local
KEYS = (
    "TUNERY_PROFILE",
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "TUNERY_DVC_REMOTE",
    "TUNERY_DVC_ENDPOINT",
)
STORE_KEYS = KEYS[1:]
TIMEOUT_S = 5.0
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


class StoreUnavailable(TuneryError):
    """A configured store does not answer (down, refused, wrong credentials): nothing was run."""

    def __init__(self, store: str, url: str, reason: str, message: str | None = None) -> None:
        self.store, self.url, self.reason = store, url, reason
        super().__init__(message or f"{store} at {url} does not answer: {reason} (nothing was run)")


@dataclass(frozen=True)
class Profile:
    name: str  # "embedded" when no store is switched
    source: str | None  # the environment file it came from, if any
    values: dict[str, str] = field(default_factory=dict)  # the store keys in force

    def get(self, key: str) -> str | None:
        return self.values.get(key) or None


def env_file(root: Path) -> Path:
    named = os.environ.get("TUNERY_ENV_FILE")
    path = Path(named) if named else root / ENV_FILE
    return path if path.is_absolute() else root / path


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (`export` and quotes allowed, `#` comments); a bad line is a named error."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"{path}: line {number}: [env_syntax] expected KEY=VALUE")
        key, raw = match.groups()
        try:
            parts = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{path}: line {number}: [env_syntax] {exc}") from None
        values[key] = " ".join(parts)
    return values


def load(root: Path, environ: Mapping[str, str] | None = None) -> tuple[Profile, dict[str, str]]:
    """The profile in force, and what the environment file adds to the environment."""
    environ = os.environ if environ is None else environ
    path = env_file(root)
    from_file = read_env_file(path) if path.is_file() else {}
    # an empty value in the file means "not set" (an empty PREFECT_API_URL would name no server)
    added = {k: v for k, v in from_file.items() if v and k not in environ}
    merged = {**from_file, **{k: environ[k] for k in KEYS if k in environ}}
    values = {k: merged[k] for k in STORE_KEYS if merged.get(k)}
    name = merged.get("TUNERY_PROFILE") or ("custom" if values else "embedded")
    return Profile(name, str(path) if path.is_file() else None, values), added


def apply(root: Path) -> Profile:
    """Put the profile in force for this process and its children: the file's variables (those
    the environment lacks) and the DVC default remote."""
    profile, added = load(root)
    os.environ.update(added)
    if profile.get("TUNERY_DVC_REMOTE"):
        set_dvc_remote(
            root, profile.values["TUNERY_DVC_REMOTE"], profile.get("TUNERY_DVC_ENDPOINT")
        )
    return profile


def set_dvc_remote(root: Path, url: str, endpoint: str | None) -> None:
    """The DVC default remote `profile` in .dvc/config.local; written only when it changes."""
    path = root / ".dvc" / "config.local"
    if not path.parent.is_dir():
        return  # not a DVC repository (yet)
    config = configparser.ConfigParser(interpolation=None)
    config.read(path)
    section = f"'remote \"{DVC_REMOTE}\"'"
    wanted = {"url": url, **({"endpointurl": endpoint} if endpoint else {})}
    current = dict(config[section]) if config.has_section(section) else {}
    remote = config.get("core", "remote", fallback=None)
    if current == wanted and remote == DVC_REMOTE:
        return
    if not config.has_section("core"):
        config.add_section("core")
    config.set("core", "remote", DVC_REMOTE)
    config.remove_section(section)
    config.add_section(section)
    for key, value in wanted.items():
        config.set(section, key, value)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        config.write(f)


def shown(url: str) -> str:
    """A URL as it may be printed: a password in it is masked."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- does it answer?
class CredentialsRefused(StoreUnavailable):
    """A store answers but refuses this process's credentials (HTTP 401/403): nothing was run."""

    def __init__(self, store: str, url: str, status: int, fix: str) -> None:
        refused = f"{store} at {url} refused the credentials (HTTP {status}): {fix}"
        super().__init__(store, url, f"HTTP {status}", f"{refused} (nothing was run)")


@dataclass(frozen=True)
class _Server:
    """How to ask one kind of server: its unauthenticated health path, a cheap read that needs
    the credentials (health answers without them on both servers), and where they come from."""

    health: str
    probe: str
    fix: str
    headers: Callable[[Mapping[str, str]], dict[str, str]]


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _mlflow_headers(environ: Mapping[str, str]) -> dict[str, str]:
    # what MLflow's REST client sends (mlflow.utils.rest_utils): a token, else basic auth
    if environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {environ['MLFLOW_TRACKING_TOKEN']}"}
    user = environ.get("MLFLOW_TRACKING_USERNAME")
    password = environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + _b64(f"{user}:{password}")}
    return {}


def _prefect_headers(environ: Mapping[str, str]) -> dict[str, str]:
    # what Prefect's client sends: the auth string of a self-hosted server, else an API key
    if environ.get("PREFECT_API_AUTH_STRING"):
        return {"Authorization": "Basic " + _b64(environ["PREFECT_API_AUTH_STRING"])}
    if environ.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {environ['PREFECT_API_KEY']}"}
    return {}


_MLFLOW_FIX = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in "
    "this process's environment to an account of that server"
)
PREFECT = _Server(
    "/health",
    "/admin/version",
    "set PREFECT_API_AUTH_STRING (user:password, the server's PREFECT_SERVER_API_AUTH_STRING) or "
    "PREFECT_API_KEY in this process's environment",
    _prefect_headers,
)
MLFLOW_TRACKING = _Server(
    "/health", "/api/2.0/mlflow/experiments/search?max_results=1", _MLFLOW_FIX, _mlflow_headers
)
MLFLOW_REGISTRY = _Server(
    "/health",
    "/api/2.0/mlflow/registered-models/search?max_results=1",
    _MLFLOW_FIX,
    _mlflow_headers,
)


def _get(store: str, url: str, path: str, headers: Mapping[str, str]) -> int:
    """The HTTP status of GET url+path; StoreUnavailable when nothing answers."""
    request = urllib.request.Request(url.rstrip("/") + path, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreUnavailable(store, shown(url), str(reason)) from None


def _http(store: str, url: str, server: _Server, environ: Mapping[str, str] | None = None) -> None:
    """The server answers its health path, then a read with this process's credentials."""
    environ = os.environ if environ is None else environ
    status = _get(store, url, server.health, {})
    if status != 200:
        raise StoreUnavailable(store, shown(url), f"{server.health} answered HTTP {status}")
    status = _get(store, url, server.probe, server.headers(environ))
    if status in (401, 403):
        raise CredentialsRefused(store, shown(url), status, server.fix)
    if status != 200:
        path = server.probe.split("?", 1)[0]
        raise StoreUnavailable(store, shown(url), f"{path} answered HTTP {status}")


def _s3(url: str, endpoint: str | None) -> None:
    store = "DVC remote (S3)"
    where = url + (f" via {endpoint}" if endpoint else "")
    try:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise StoreUnavailable(
            store, where, "dvc-s3 is not installed (pip install dvc-s3)"
        ) from None
    bucket = urllib.parse.urlsplit(url).netloc
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}
        ),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        detail = {
            "403": "access denied: check the credentials in this process's environment",
            "404": f"no bucket {bucket!r}",
        }.get(str(code), error.get("Message") or str(code))
        raise StoreUnavailable(store, where, detail) from None
    except BotoCoreError as exc:
        raise StoreUnavailable(store, where, str(exc)) from None


def _dvc_remote_url(root: Path) -> tuple[str | None, str | None]:
    config = configparser.ConfigParser(interpolation=None)
    config.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    name = config.get("core", "remote", fallback=None)
    if not name:
        return None, None
    section = f"'remote \"{name}\"'"
    return config.get(section, "url", fallback=None), config.get(
        section, "endpointurl", fallback=None
    )


def verify(root: Path) -> dict[str, str]:
    """Ask each store in force whether it answers; `StoreUnavailable` at the first that does not.
    Returns store -> what was checked (embedded stores need no answer)."""
    checked: dict[str, str] = {}
    prefect = os.environ.get("PREFECT_API_URL")
    if prefect:
        _http("Prefect server", prefect, PREFECT)
        checked["prefect"] = f"{shown(prefect)} answers"
    else:
        checked["prefect"] = "embedded (a temporary server per run)"
    for store, key, server in (
        ("MLflow tracking server", "MLFLOW_TRACKING_URI", MLFLOW_TRACKING),
        ("MLflow registry", "MLFLOW_REGISTRY_URI", MLFLOW_REGISTRY),
    ):
        uri = os.environ.get(key)
        if uri and uri.split(":", 1)[0] in ("http", "https"):
            _http(store, uri, server)
            checked[key] = f"{shown(uri)} answers"
        elif uri:
            checked[key] = f"{shown(uri)} (not a server: not asked)"
    url, endpoint = _dvc_remote_url(root)
    if url is None:
        checked["dvc_remote"] = "none configured"
    elif url.startswith("s3://"):
        _s3(url, endpoint)
        checked["dvc_remote"] = f"{url} answers"
    elif "://" not in url:
        folder = Path(url) if Path(url).is_absolute() else root / ".dvc" / url
        if not folder.is_dir() and not folder.parent.is_dir():
            raise StoreUnavailable("DVC remote (folder)", url, f"{folder.parent} does not exist")
        checked["dvc_remote"] = f"{url} (folder)"
    else:
        checked["dvc_remote"] = f"{url} (not checked: only s3:// and folders are)"
    return checked
