"""Cluster entry points (``jobs/train.py``, ``jobs/annotate.py``), example configs and the benchmarks
(:mod:`jobs.bench`); a package so that the benchmarks run as modules from the repository root."""
