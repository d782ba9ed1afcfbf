"""The benchmarks: one script per question, run from the repository root as modules, e.g.
``python -m jobs.bench.annotate_efficiency --n 600 --json eff.json``. raycv is imported as an installed
package; the shared pieces are the private modules here (see :mod:`jobs.bench._common`).
"""
