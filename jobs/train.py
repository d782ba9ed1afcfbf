"""Cluster entry point for training: ``python jobs/train.py CONFIG.yaml [--set k=v ...]``.

Submitted with ``raycv submit train`` or ``ray job submit -- python jobs/train.py ...``; it runs on the
head node, connects to the cluster (``RAY_ADDRESS`` is set by the Jobs API) and behaves like ``raycv train``.
"""

import sys

from raycv.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
