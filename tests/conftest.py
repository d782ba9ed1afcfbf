"""Shared fixtures: one S3-compatible server (moto over HTTP on 127.0.0.1) and one local Ray per session.

The AWS variables are set before ``ray.init`` so that Ray's workers inherit them (NOTES.md).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise

# Ray Train's controller polls its workers every 2 s, and a worker's report() waits until the previous one
# was polled (a queue of one): the tests' sub-second epochs took ~2 s each and every run ended up to 4 s after
# its loop. Polling every 0.5 s changes no behaviour, only the wait; set here so that every Ray the tests
# start (ray.init, `ray start` heads, the CLI in subprocesses) inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 API on http://127.0.0.1:PORT, with the standard AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A new empty bucket; returns ``s3://NAME``."""
    import boto3

    name = f"raycv-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray with 2 CPUs for the whole session (started after the S3 variables are set)."""
    import ray

    # The dashboard serves the state API (ray.util.state) that the failure tests use to find workers.
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: they run on a GPU machine and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
