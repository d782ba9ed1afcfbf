"""``raycv submit``: validate a config here, then run ``raycv train|annotate`` on a Ray cluster as a job.

The config is validated (and its input paths checked) on the submitting machine, so a bad config exits 2
before anything reaches the cluster. The validated config, ``--set`` overrides applied, travels as the
job's ``working_dir`` (one YAML file, nothing else is uploaded); the cluster's image must have raycv
installed (cluster/Dockerfile). Every path in the config is read by the cluster, not by this machine.

Token authentication (Ray >= 2.59): the dashboard and the Jobs API answer only requests that carry the
cluster's token. It is found the way Ray's own clients find it: ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. It is sent as a header and never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

import yaml

from raycv.config import AnnotateConfig, TrainConfig, build_config, config_to_dict
from raycv.errors import ConfigError, RaycvError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

CONFIG_NAME = "raycv-config.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RaycvError, RuntimeError):
    """The cluster could not be reached, refused the request, or the job did not succeed."""


@dataclass
class JobOutcome:
    """How a submitted job ended: ``status`` is SUCCEEDED, FAILED or STOPPED; ``message`` is Ray's reason."""

    submission_id: str
    status: str
    message: str

    @property
    def reason(self) -> str:
        """The first line of Ray's message (the rest repeats the job's log)."""
        return (self.message.strip().splitlines() or ["no reason given"])[0][:300]


def auth_token() -> str | None:
    """The cluster token: ``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def dashboard_address(address: str | None) -> str:
    """The Jobs API URL: ``--address``, else ``RAY_ADDRESS``; it must be the dashboard's http(s) URL."""
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr or not addr.startswith(("http://", "https://")):
        raise ConfigError(
            "--address", addr, "Give the Ray dashboard's URL (Jobs API), e.g. --address http://HEAD:8265."
        )
    return addr.rstrip("/")


@contextlib.contextmanager
def _address_from_argument_only() -> Iterator[None]:
    # Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address argument (the one a job
    # driver or a local ray.init leaves in the environment); the user's --address must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> JobSubmissionClient:
    """A Jobs API client for ``address`` that sends the cluster token (when one is found).

    Raises:
        SubmitError: the address cannot be reached or the cluster refuses the token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _address_from_argument_only():
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        how = (
            "The cluster refused the token found here"
            if token
            else "The cluster requires a token and none was found"
        )
        raise SubmitError(
            f"{how} ({address}). Set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding the "
            "cluster's token (default ~/.ray/auth_token; `ray get-auth-token` on the head prints it)."
        ) from exc
    except (ConnectionError, RuntimeError, OSError) as exc:
        raise SubmitError(
            f"Cannot reach the Ray Jobs API at {address}: {exc}. Is the head up and its dashboard "
            "port (default 8265) reachable from here?"
        ) from exc


def _job_id(kind: str) -> str:
    return f"raycv-{kind}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def submit_job(
    client: JobSubmissionClient,
    cfg: TrainConfig | AnnotateConfig,
    kind: Literal["train", "annotate"],
) -> str:
    """Submit ``raycv KIND <config>`` with the validated config as the job's working_dir; returns its id."""
    data = config_to_dict(cfg)
    build_config(type(cfg), data)  # the YAML shipped must validate to the same config on the cluster
    submission_id = _job_id(kind)
    with tempfile.TemporaryDirectory(prefix="raycv-submit-") as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            return client.submit_job(
                entrypoint=f"raycv {kind} {shlex.quote(CONFIG_NAME)}",
                submission_id=submission_id,
                runtime_env={"working_dir": tmp},
                metadata={"raycv_command": kind},
            )
        except Exception as exc:  # HTTP errors arrive as RuntimeError / AuthenticationError
            raise SubmitError(f"The cluster did not accept the job: {exc}") from exc


async def _stream(client: JobSubmissionClient, submission_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(chunk)
        out.flush()


def wait_for_job(
    client: JobSubmissionClient, submission_id: str, out: TextIO | None = None, poll_s: float = 1.0
) -> JobOutcome:
    """Stream the job's logs to ``out`` (default stdout) until it ends; returns how it ended."""
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
    try:
        asyncio.run(_stream(client, submission_id, out or sys.stdout))
    except Exception as exc:  # a dropped log stream is not the job's end: fall back to polling
        print(f"raycv submit: log stream interrupted ({exc}); waiting for the job", file=sys.stderr)
    while True:
        try:
            info = client.get_job_info(submission_id)
        except Exception as exc:
            raise SubmitError(f"Lost the cluster while waiting for {submission_id}: {exc}") from exc
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return JobOutcome(submission_id, status, info.message or "")
        time.sleep(poll_s)
