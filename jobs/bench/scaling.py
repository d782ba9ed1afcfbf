"""`raycv annotate` on one Ray node, then on two: does throughput double when the replicas double?

The model is ``bench_fixed_cost`` (registered in every Ray worker by a ``worker_process_setup_hook``): its
forward sleeps a fixed time per image, so a replica's throughput does not depend on free cores, and two
nodes on one machine can show what the pipeline itself (planning, read tasks, scheduling across nodes,
object transfer, Parquet writes, commit) does to scaling. Locally the script starts its own head and
second node with ``ray start`` (free ports, its own temp dir, token auth) and stops exactly the processes
it started. With ``--address`` it uses that cluster as it is and doubles the replica count instead.
Speed-up = two-node img/s / one-node img/s: mid-run (between the batches that completed 20% and 90% of
the rows, so the second node's late-starting actors and the tail are left out), steady state (first to
last batch) and end to end. Target: ~2x (>= 1.8x) mid-run.

    python -m jobs.bench.scaling --n 4000 --json scaling.json
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from . import _common as C
from . import _inputs  # holds register_bench_models, which Ray workers get by value

TARGET = "~2x (>= 1.8x) mid-run"


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.base_parser(__doc__.split("\n")[0], n=4000, arch=C.FIXED_COST_ARCH, image_size=32, src_size=32)
    p.set_defaults(format="png")
    p.add_argument("--seconds-per-image", type=float, default=0.05, help="the fixed cost of the model")
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--actors-per-node", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """Ray nodes started with ``ray start`` in a temp dir of our own; :meth:`stop` kills only those."""

    def __init__(self, cpus_per_node: int) -> None:
        self.cpus = cpus_per_node
        self.temp_dir = tempfile.mkdtemp(prefix="rcvb", dir="/tmp")  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # A busy machine starts the dashboard agent slowly; the raylet's default wait is too short there.
            "RAY_agent_register_timeout_ms": "120000",
        }
        self.nodes = 0

    def _ports(self) -> list[str]:
        names = [
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        ]
        return [f"--{name}={free_port()}" for name in names]

    def add_node(self) -> None:
        common = [
            f"--num-cpus={self.cpus}",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            *self._ports(),
        ]
        if self.nodes == 0:
            cmd = ["ray", "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}"]
            cmd += ["--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
        else:
            cmd = ["ray", "start", f"--address={self.address}"]
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        done = subprocess.run(
            [ray_bin, *cmd[1:], *common], env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        self.nodes += 1

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        import ray

        deadline = time.monotonic() + timeout
        while sum(1 for n in ray.nodes() if n["Alive"]) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {sum(n['Alive'] for n in ray.nodes())} of {count} Ray nodes came up"
                )
            time.sleep(0.5)

    def pids(self) -> list[int]:
        """The processes of these nodes: every process whose command line names our temp dir."""
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(self.temp_dir in part for part in p.info["cmdline"] or []):
                found.append(p.info["pid"])
        return found

    def stop(self) -> None:
        import psutil

        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for p in self.pids() if p != os.getpid()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ runs


def _one(args: C.argparse.Namespace, run_dir: str, source: str, out: str, actors: int) -> dict:
    return C.annotate(
        run_dir,
        source,
        out,
        batch_size=args.batch_size,
        actors=actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=1.0 if args.device == "cuda" else 0.0,
        endpoint_url=args.endpoint_url,
    )


def _three(s: dict) -> str:
    return ", ".join(C.fmt(s[k]) for k in ("mid_run_images_per_s", "steady_images_per_s", "images_per_s"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cluster = None if args.address else LocalCluster(args.cpus_per_node)
    if cluster is not None:  # before Ray is imported: it reads the auth mode once
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.env["RAY_AUTH_TOKEN"])
    try:
        return _main(args, cluster)
    finally:
        if cluster is not None:
            cluster.stop()


def _main(args: C.argparse.Namespace, cluster: LocalCluster | None) -> dict:
    import ray
    import ray.cloudpickle

    C.register_bench_models()
    ray.cloudpickle.register_pickle_by_value(_inputs)  # the hook travels by value: workers need not import it
    runtime_env = {"worker_process_setup_hook": C.register_bench_models}
    k = args.actors_per_node
    with C.workdir(args.workdir) as wd:
        uris, source = C.inputs(args, wd)
        run_dir = os.path.join(wd, "run")
        options = {"seconds_per_image": args.seconds_per_image} if args.arch == C.FIXED_COST_ARCH else None
        C.make_run(run_dir, arch=args.arch, image_size=args.image_size, options=options)
        if cluster is not None:
            cluster.add_node()
        with C.ray_session(args.address or cluster.address, runtime_env=runtime_env):  # type: ignore[union-attr]
            one = _one(args, run_dir, source, os.path.join(wd, "out-1"), k)
            if cluster is not None:
                cluster.add_node()
                cluster.wait_for_nodes(2)
            two = _one(args, run_dir, source, os.path.join(wd, "out-2"), 2 * k)
            nodes = sum(1 for n in ray.nodes() if n["Alive"])
    results = {
        "images": len(uris),
        "nodes": nodes,
        "one_node_images_per_s": one["images_per_s"],
        "two_node_images_per_s": two["images_per_s"],
        "one_node_steady_images_per_s": one["steady_images_per_s"],
        "two_node_steady_images_per_s": two["steady_images_per_s"],
        "ideal_one_node_images_per_s": k / args.seconds_per_image if options else None,
        "one_node_mid_run_images_per_s": one["mid_run_images_per_s"],
        "two_node_mid_run_images_per_s": two["mid_run_images_per_s"],
        "mid_run_speedup": C.ratio(two["mid_run_images_per_s"], one["mid_run_images_per_s"]),
        "speedup": C.ratio(two["images_per_s"], one["images_per_s"]),
        "steady_speedup": C.ratio(two["steady_images_per_s"], one["steady_images_per_s"]),
        "layout": f"{k} actor(s) x {args.cpus_per_actor} CPU per node, {args.cpus_per_node} CPUs per node",
    }
    C.print_table(
        f"scaling: {args.arch} ({args.seconds_per_image} s/image), {results['layout']}",
        [
            ("images", len(uris)),
            ("1 node img/s (mid-run, steady, end to end)", _three(one)),
            ("2 nodes img/s (mid-run, steady, end to end)", _three(two)),
            ("ideal 1 node img/s", results["ideal_one_node_images_per_s"]),
            ("speed-up mid-run (20% -> 90% of rows)", results["mid_run_speedup"]),
            ("speed-up steady state", results["steady_speedup"]),
            ("speed-up end to end", results["speedup"]),
            ("target", TARGET),
        ],
    )
    return C.report("scaling", args, results, target=TARGET)


if __name__ == "__main__":
    main()
