"""Where raycv's work runs: joining a Ray cluster, or starting a local one, once per command."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray, unless already connected."""
    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
