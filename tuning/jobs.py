"""Remote submission: send an experiment to a Ray cluster as a Ray job and follow it.

Everything here goes through the Ray Jobs API, which the head node's
dashboard serves (by default on port 8265). A submission uploads a small
working directory, which contains the experiment file and the local files
it names, and starts `python -m tuning run` on the cluster with the same
overrides. The cluster must have frozen-tune installed (see cluster/).

Token authentication: Ray 2.52 and newer reject Jobs API requests without
the cluster's token when the cluster runs with `RAY_AUTH_MODE=token`. The
token is read the way Ray reads it, from `RAY_AUTH_TOKEN`, else the file
named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`, and is sent as an
`Authorization: Bearer` header whatever `RAY_AUTH_MODE` is on this machine.

Example:
    >>> client = connect("http://127.0.0.1:8265")  # doctest: +SKIP
    >>> job_id = submit_experiment(client, "examples/quickstart.yaml", config, {"storage": "/mnt/shared/runs"})  # doctest: +SKIP
    >>> wait_for_job(client, job_id, print)  # doctest: +SKIP
    'SUCCEEDED'
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
import yaml
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from tuning.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
# Default token file, written by `ray get-auth-token --generate` (Ray 2.52 to 2.60).
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")

# Seconds to wait for a TCP connection to the dashboard before giving up.
CONNECT_TIMEOUT_SECONDS = 5
# Seconds to wait for the dashboard's response to one request once connected.
RESPONSE_TIMEOUT_SECONDS = 60

# Ray's dashboard rejects uploads above 100 MiB (ray_constants.DASHBOARD_CLIENT_MAX_SIZE in Ray 2.60).
MAX_WORKING_DIR_BYTES = 100 * 1024**2

# Fields of an experiment file that may name a local file or folder the run reads. The
# job's working directory gets a copy of each one that exists on this machine. Storage
# and cache_dir are never copied, because they contain run folders and caches.
INPUT_FIELDS: tuple[str, ...] = ("search.warm_start", "dataset.path", "backbone.pretrain.path", "backbone.weights")
# Values of the fields above that are keywords, not paths.
INPUT_KEYWORDS = frozenset({"pretrained", "none", "imagenet"})

INPUTS_FOLDER = "inputs"
JOB_ID_PREFIX = "frozen-tune"
METADATA_EXPERIMENT = "frozen_tune_experiment"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Seconds between status requests when the log stream ends before the job does.
STATUS_POLL_SECONDS = 2


class JobError(RuntimeError):
    """A request to the cluster that failed, with a message that names what to check."""


@dataclass(frozen=True)
class Token:
    """The cluster token and where it came from (a variable name or a file), never printed."""

    value: str
    source: str


def read_token() -> Token | None:
    """Find the cluster token the way Ray does: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`.

    Returns:
        The token, or None when none of the three is set.

    Raises:
        JobError: when `RAY_AUTH_TOKEN_PATH` names a file that is missing,
            unreadable or empty (Ray treats that as fatal too).
    """
    value = os.environ.get(TOKEN_VARIABLE, "").strip()
    if value:
        return Token(value, TOKEN_VARIABLE)

    token_path = os.environ.get(TOKEN_PATH_VARIABLE)
    if token_path:
        path = Path(token_path).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise JobError(f"{TOKEN_PATH_VARIABLE}={token_path!r} cannot be read ({error}); point it at the file that contains the cluster token") from None
        if not value:
            raise JobError(f"{TOKEN_PATH_VARIABLE}={token_path!r} is empty; point it at the file that contains the cluster token")
        return Token(value, f"{TOKEN_PATH_VARIABLE} ({path})")

    path = DEFAULT_TOKEN_FILE.expanduser()
    if path.is_file():
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise JobError(f"the token file {path} cannot be read ({error})") from None
        if value:
            return Token(value, str(path))
    return None


def dashboard_url(address: str) -> str:
    """Normalise a Jobs API address to `http(s)://HOST:PORT`.

    Raises:
        ConfigError: for `auto`, `ray://` addresses and anything without a host.
    """
    text = address.strip()
    if text == "auto" or text.startswith("ray://"):
        raise ConfigError(
            f"--address {address!r} is not a Jobs API address; jobs go to the head node's dashboard, "
            "e.g. http://HEAD:8265 (through `ray dashboard CLUSTER.yaml`: http://127.0.0.1:8265)"
        )
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--address {address!r} is invalid; use the dashboard's URL, e.g. http://HEAD:8265")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"--address {address!r} has an invalid port; use the dashboard's URL, e.g. http://HEAD:8265") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def connect(address: str) -> Any:
    """Open a Jobs API client for the dashboard at `address`, sending the cluster token if one is found.

    Fails within `CONNECT_TIMEOUT_SECONDS` when nothing listens at the
    address; Ray's client alone would wait for the operating system's TCP
    timeout, which is minutes for a host that drops packets.

    Raises:
        ConfigError: for an address that is not a dashboard URL.
        JobError: when the dashboard cannot be reached or rejects the token.
    """
    url = dashboard_url(address)
    _check_reachable(url)
    token = read_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    if token:
        logger.debug("sending the cluster token from %s", token.source)

    try:
        return _TimedJobSubmissionClient(url, headers=headers)
    except AuthenticationError as error:
        raise _authentication_error(url, token, error) from None
    except (ConnectionError, RuntimeError) as error:
        if _answered_without_http(error):
            raise JobError(
                f"{url} does not respond in HTTP, so it is not the Ray dashboard; Ray's GCS (6379) and Ray Client (10001) "
                "ports use gRPC. Use the dashboard's address (port 8265 by default)"
            ) from None
        raise JobError(f"cannot talk to the Ray dashboard at {url}: {error}; check that this is the dashboard's address (port 8265 by default)") from None


def _answered_without_http(error: BaseException) -> bool:
    """Tell whether an error from requests wraps an `http.client` error, such as the BadStatusLine a gRPC port causes."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, http.client.HTTPException):
            return True
        pending.extend(argument for argument in getattr(current, "args", ()) if isinstance(argument, BaseException))
        pending.extend(cause for cause in (current.__cause__, current.__context__) if cause is not None)
    return False


def _check_reachable(url: str) -> None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as error:
        raise JobError(
            f"cannot reach the Ray dashboard at {url}: {error.strerror or error}; check that the cluster is running "
            "and that this machine can reach that host and port (for a cloud cluster, run `ray dashboard CLUSTER.yaml` "
            "and use http://127.0.0.1:8265)"
        ) from None


# Places a client reads the cluster token from, for error messages.
TOKEN_HELP = (
    f"set {TOKEN_VARIABLE}, or {TOKEN_PATH_VARIABLE} to a file that contains it, or save it as {DEFAULT_TOKEN_FILE}; "
    "`ray get-auth-token` on the head node prints it"
)


def _authentication_error(url: str, token: Token | None, error: Exception) -> JobError:
    # Ray's client raises AuthenticationError with "Authentication required" for HTTP 401
    # (no token sent) and "Authentication failed" for HTTP 403 (wrong token).
    if token is None or str(error).startswith("Authentication required"):
        return JobError(f"the Ray cluster at {url} requires an authentication token (HTTP 401) and none was found; {TOKEN_HELP}")
    return JobError(f"the Ray cluster at {url} rejected the token from {token.source} (HTTP 403); use the cluster's token: {TOKEN_HELP}")


class _TimedJobSubmissionClient(JobSubmissionClient):
    """Ray's JobSubmissionClient with a timeout on every HTTP request.

    NOTE: Ray 2.60's client sends requests without a timeout and offers no
    option for one, so this overrides its private `_do_request`.
    """

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_SECONDS, RESPONSE_TIMEOUT_SECONDS))
        try:
            return super()._do_request(method, endpoint, **kwargs)
        except requests.exceptions.Timeout:
            raise JobError(f"the Ray dashboard at {self._address} timed out: no response to {method} {endpoint} within {RESPONSE_TIMEOUT_SECONDS} s") from None
        except requests.exceptions.ConnectionError as error:
            raise JobError(f"the connection to the Ray dashboard at {self._address} failed: {error}") from None


def stage_working_dir(experiment_path: str | Path, folder: Path) -> Path:
    """Write the job's working directory into `folder`: the experiment file and the local files it names.

    Each local input (see `INPUT_FIELDS`) is copied to
    `inputs/<field>/<name>`, and the copied experiment file points there, so
    the run on the cluster reads the same files. Paths are resolved from the
    current directory, as `frozen-tune run` does.

    Returns:
        The experiment file's path inside `folder`.

    Raises:
        ConfigError: when the inputs exceed `MAX_WORKING_DIR_BYTES`.
    """
    experiment_path = Path(experiment_path)
    data = yaml.safe_load(experiment_path.read_text(encoding="utf-8"))

    for dotted in INPUT_FIELDS:
        value = _get_dotted(data, dotted)
        if not isinstance(value, str) or value in INPUT_KEYWORDS or "://" in value:
            continue
        source = Path(value).expanduser()
        if not source.exists():
            continue
        target = Path(INPUTS_FOLDER) / dotted / source.name
        if source.is_dir():
            shutil.copytree(source, folder / target)
        else:
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / target)
        _set_dotted(data, dotted, target.as_posix())
        logger.info("job input %s: %s", dotted, source)

    staged = folder / experiment_path.name
    staged.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    if size > MAX_WORKING_DIR_BYTES:
        raise ConfigError(
            f"the job's working directory would hold {size / 1024**2:.0f} MiB, and Ray's dashboard accepts at most "
            f"{MAX_WORKING_DIR_BYTES // 1024**2} MiB; put large data on storage every node can reach, "
            "or run `frozen-tune run --address auto` on the head node"
        )
    return staged


def _get_dotted(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def entrypoint_command(experiment_file: str, overrides: dict[str, Any], log_level: str = "info") -> str:
    """Build the shell command the job runs on the cluster: `frozen-tune run` with the same overrides.

    Args:
        experiment_file: The experiment file's name inside the working directory.
        overrides: `num_trials`, `storage` and `name`, where None values are
            left out, and `resume`, which adds `--resume` when true.
        log_level: The `--log-level` of the run.
    """
    words = ["python", "-m", "tuning", "--log-level", log_level, "run", experiment_file, "--address", "auto"]
    for option, key in (("--num-trials", "num_trials"), ("--storage", "storage"), ("--name", "name")):
        if overrides.get(key) is not None:
            words += [option, str(overrides[key])]
    if overrides.get("resume"):
        words.append("--resume")
    return shlex.join(words)


def submit_experiment(client: Any, experiment_path: str | Path, config: ExperimentConfig, overrides: dict[str, Any], log_level: str = "info") -> str:
    """Submit a validated experiment as a Ray job and return its submission id.

    Args:
        client: From `connect`.
        experiment_path: The experiment file as the user named it.
        config: The same file, validated with the overrides applied.
        overrides: `num_trials`, `storage`, `name` and `resume` from the command line.
        log_level: The `--log-level` of the run on the cluster.

    Raises:
        ConfigError: when the working directory is too large.
        JobError: when the cluster rejects the submission.
    """
    job_id = f"{JOB_ID_PREFIX}-{config.name}-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="frozen-tune-job-") as folder:
        staged = stage_working_dir(experiment_path, Path(folder))
        entrypoint = entrypoint_command(staged.name, overrides, log_level)
        try:
            submitted = client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env={"working_dir": folder},
                metadata={METADATA_EXPERIMENT: config.name},
            )
        except RuntimeError as error:
            raise JobError(f"the cluster did not accept the job: {error}") from None
    logger.info("submitted job %s: %s", submitted, entrypoint)
    return submitted


def job_info(client: Any, job_id: str) -> Any:
    """Return Ray's JobDetails for `job_id`.

    Raises:
        JobError: when the cluster has no job with that id.
    """
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        raise _job_request_error(client, job_id, error) from None


def list_jobs(client: Any) -> list[Any]:
    """Return every job the cluster has run or is running, oldest first."""
    try:
        jobs = client.list_jobs()
    except RuntimeError as error:
        raise JobError(f"listing jobs failed: {error}") from None
    return sorted(jobs, key=lambda job: job.start_time or 0)


def job_logs(client: Any, job_id: str) -> str:
    """Return the job's output so far (the driver's stdout and stderr)."""
    job_info(client, job_id)
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as error:
        raise _job_request_error(client, job_id, error) from None


def stop_job(client: Any, job_id: str) -> bool:
    """Ask the cluster to stop the job; returns False when it had already finished."""
    job_info(client, job_id)
    try:
        return bool(client.stop_job(job_id))
    except RuntimeError as error:
        raise _job_request_error(client, job_id, error) from None


def follow_logs(client: Any, job_id: str, echo: Callable[[str], None]) -> None:
    """Pass the job's output to `echo` as it is written, until the job ends."""
    job_info(client, job_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as error:
        # The log stream can close early (e.g. when the dashboard restarts); the job itself goes on.
        logger.warning("following the output of job %s stopped: %s", job_id, error)


def wait_for_job(client: Any, job_id: str, echo: Callable[[str], None]) -> str:
    """Stream the job's output to `echo` until it ends, then return its final status."""
    follow_logs(client, job_id, echo)
    status = str(job_info(client, job_id).status)
    while status not in TERMINAL_STATUSES:
        # The stream ended before the job did; poll until it finishes.
        time.sleep(STATUS_POLL_SECONDS)
        status = str(job_info(client, job_id).status)
    return status


def _job_request_error(client: Any, job_id: str, error: Exception) -> JobError:
    # Ray's client raises RuntimeError("Request failed with status code 404: ...") for an unknown id.
    if "status code 404" in str(error):
        return JobError(f"job {job_id!r} not found at {client.get_address()}; `frozen-tune jobs list` shows the jobs there")
    return JobError(f"the request for job {job_id!r} failed: {error}")
