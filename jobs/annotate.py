"""Cluster entry point for annotation: ``python jobs/annotate.py CONFIG.yaml [--set k=v ...]``."""

import sys

from raycv.cli import main

if __name__ == "__main__":
    sys.exit(main(["annotate", *sys.argv[1:]]))
