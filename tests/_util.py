"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import yaml


def write_yaml(folder: Path, name: str, data: dict) -> str:
    """Write ``data`` as ``folder/name`` (a config for the `raycv` CLI); returns the path."""
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def create_bucket(name: str) -> str:
    """Create a bucket on the test S3 server (AWS_ENDPOINT_URL); returns ``s3://name``."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside, restored to what they were after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
