"""Starting a local Ray (raycv.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

from raycv.runtime import TRAIN_POLL_ENV

_PROBE = """
import os, ray
from raycv.runtime import ensure_ray, TRAIN_POLL_ENV
ensure_ray(None, num_cpus=1, include_dashboard=False)
@ray.remote(num_cpus=0)
def poll():
    return os.environ.get(TRAIN_POLL_ENV)
print("workers see", TRAIN_POLL_ENV, "=", ray.get(poll.remote()))
ray.shutdown()
"""


def test_a_local_ray_started_by_raycv_has_ray_train_poll_its_workers_every_half_second():
    """Ray Train's controller (a Ray worker) reads the interval from its environment: 2 s unless set, and every
    epoch's report waited for a poll. A local Ray that raycv starts hands its workers 0.5 s."""
    env = {k: v for k, v in os.environ.items() if k not in (TRAIN_POLL_ENV, "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"workers see {TRAIN_POLL_ENV} = 0.5" in done.stdout, done.stdout
