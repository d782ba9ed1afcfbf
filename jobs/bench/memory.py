"""Peak memory of `raycv annotate` as the archive grows: driver and Ray worker RSS at 1k, 4k and 16k images.

Tiny images and a tiny model (``test_classifier`` @ 32) so that each run takes seconds and only the
pipeline's own memory shows. A thread samples the RSS (psutil) of this driver and of every process of the
Ray cluster on this machine (the processes this driver started, or, with ``--address``, the workers the
state API lists) every ``--interval`` seconds while each run goes. Workers are the ``ray::`` processes;
the others (raylet with the object store, GCS, dashboard) are reported apart. RSS counts the object
store's shared pages in every process that touched them, so the sums over-count. Target: flat, i.e. the
peak at the largest size within 1.2x of the peak at the smallest.

    python -m jobs.bench.memory --sizes 1000 4000 16000 --json memory.json
"""

from __future__ import annotations

import os
import threading
import time

from . import _common as C

TARGET = "flat: peak at the largest size <= 1.2x the peak at the smallest"
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.base_parser(__doc__.split("\n")[0], n=0, arch="test_classifier", image_size=32, src_size=32)
    p.set_defaults(format="png")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    return p.parse_args(argv)


class RssSampler:
    """Peak RSS of the driver and of the Ray processes on this machine, sampled in a thread."""

    def __init__(self, interval: float, address: str | None) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval, self.address = interval, address
        self.peaks = {"driver": 0, "worker_max": 0, "workers_sum": 0, "ray_daemons_sum": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._state_pids: set[int] = set()

    def __enter__(self) -> RssSampler:
        if self.address:
            self._state_pids = _state_api_pids()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _processes(self) -> list:
        import psutil

        procs = self.me.children(recursive=True)
        if self.address:  # a cluster started elsewhere: the workers the state API knows, on this machine
            procs += [psutil.Process(p) for p in self._state_pids if psutil.pid_exists(p)]
        return procs

    def _run(self) -> None:
        import psutil

        refresh = time.monotonic()
        while not self._stop.is_set():
            if self.address and time.monotonic() - refresh > 5:
                self._state_pids, refresh = _state_api_pids(), time.monotonic()
            workers, daemons = [], []
            for p in self._processes():
                try:
                    rss, name = p.memory_info().rss, " ".join(p.cmdline()[:1])
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                (workers if name.startswith("ray::") else daemons).append(rss)
            self._peak("driver", self.me.memory_info().rss)
            self._peak("worker_max", max(workers, default=0))
            self._peak("workers_sum", sum(workers))
            self._peak("ray_daemons_sum", sum(daemons))
            self.samples += 1
            self._stop.wait(self.interval)

    def _peak(self, key: str, value: int) -> None:
        self.peaks[key] = max(self.peaks[key], value)


def _state_api_pids() -> set[int]:
    import socket

    from ray.util.state import list_workers

    host = socket.gethostbyname(socket.gethostname())
    rows = list_workers(detail=True, limit=10_000, raise_on_missing_output=False)
    return {int(w.pid) for w in rows if w.pid and getattr(w, "ip", host) in (host, "127.0.0.1")}


def linked_archive(full: list[str], root: str, n: int) -> str:
    """A folder holding hard links to the first ``n`` files of ``full`` (no copy, no re-encoding)."""
    os.makedirs(root, exist_ok=True)
    for uri in full[:n]:
        target = os.path.join(root, os.path.basename(uri))
        if not os.path.exists(target):
            os.link(uri, target)
    return root


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = sorted(args.sizes)
    rows: list[dict] = []
    with C.workdir(args.workdir) as wd:
        full = C.make_archive(
            os.path.join(wd, f"all-{args.src_size}.{args.format}"),
            n=sizes[-1],
            size=args.src_size,
            fmt=args.format,
        )
        run_dir = os.path.join(wd, "run")
        C.make_run(run_dir, arch=args.arch, image_size=args.image_size)
        with C.ray_session(args.address, args.num_cpus):
            for n in sizes:
                source = linked_archive(full, os.path.join(wd, f"archive-{n}"), n)
                with RssSampler(args.interval, args.address) as sampler:
                    summary = C.annotate(
                        run_dir,
                        source,
                        os.path.join(wd, f"out-{n}"),
                        batch_size=args.batch_size,
                        actors=args.actors,
                        cpus_per_actor=args.cpus_per_actor,
                        address=args.address,
                    )
                peaks = {k: v / MIB for k, v in sampler.peaks.items()}
                rows.append(
                    {
                        "images": n,
                        "ok": summary["ok"],
                        "images_per_s": summary["images_per_s"],
                        "samples": sampler.samples,
                        **{f"peak_{k}_mib": v for k, v in peaks.items()},
                    }
                )
    first, last = rows[0], rows[-1]
    growth = {
        f"{k}_growth": C.ratio(last[f"peak_{k}_mib"], first[f"peak_{k}_mib"])
        for k in ("driver", "worker_max", "workers_sum", "ray_daemons_sum")
    }
    results = {"runs": rows, **growth, "flat": all(g is not None and g <= 1.2 for g in growth.values())}
    table: list[tuple[str, object]] = []
    for r in rows:
        table.append(
            (
                f"{r['images']:>6} images",
                f"driver {r['peak_driver_mib']:.0f} MiB, worker max {r['peak_worker_max_mib']:.0f} MiB, "
                f"workers sum {r['peak_workers_sum_mib']:.0f} MiB, daemons {r['peak_ray_daemons_sum_mib']:.0f} MiB"
                f" ({r['images_per_s']:.0f} img/s)",
            )
        )
    table += [(f"growth {sizes[0]} -> {sizes[-1]}: {k[:-7]}", v) for k, v in growth.items()]
    table += [("target", TARGET)]
    C.print_table(f"peak RSS while annotating ({args.arch} @ {args.image_size}, {args.actors} actors)", table)
    return C.report("memory", args, results, target=TARGET)


if __name__ == "__main__":
    main()
