"""`raycv annotate` against the script everyone writes first, on the same archive, in one run.

The naive script is one process with torch's default threads (all cores): for each batch of files it
reads, decodes (raycv's own ``decode_image`` and resize, so both sides compute the same pixels), runs the
forward pass and the softmax, appends the top-k rows to a list, and at the end writes one Parquet file.
It overlaps nothing. The pipeline is the real :func:`raycv.annotation.run_annotation` with its actors and
read tasks on the same cores. Speed-up = pipeline img/s / naive img/s, both end to end (start-up
included). The naive script runs in its own process at the niceness of Ray's workers (read from one with
psutil; Ray starts them at nice 15), so both sides get the same share of a shared machine. Target on 2
cores: >= 1.5x.

    python jobs/bench/naive_baseline.py --n 400 --json naive.json
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, when imported from elsewhere

import _common as C

TARGET = ">= 1.5x (2 cores)"


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.base_parser(__doc__.split("\n")[0], n=400, arch="resnet18", image_size=112, src_size=512)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the naive script (default: torch's)"
    )
    return p.parse_args(argv)


def naive_annotate(
    uris: list[str],
    run_dir: str,
    out_path: str,
    *,
    batch_size: int,
    device: str,
    endpoint_url: str | None,
    threads: int | None = None,
) -> tuple[float, int]:
    """The sequential script: read -> decode -> forward -> append -> one Parquet file.

    Returns (img/s, torch threads): ``threads``, else torch's default.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    if threads:
        torch.set_num_threads(threads)

    from raycv import runs, storage
    from raycv.data.images import decode_image
    from raycv.data.transforms import normalize, to_tensor_resized
    from raycv.tasks.classification import topk_rows

    t0 = time.perf_counter()
    run = runs.load_run(run_dir, device=device)
    norm = run.card["normalization"]
    rows: list[dict] = []
    for i in range(0, len(uris), batch_size):
        chunk = uris[i : i + batch_size]
        images = [decode_image(storage.read_bytes(u, endpoint_url), u) for u in chunk]
        x = torch.stack([to_tensor_resized(im, run.size_hw) for im in images]).to(device)
        with torch.inference_mode():
            probs = torch.softmax(run.model(normalize(x, norm["mean"], norm["std"])).float(), dim=1).cpu()
        for uri, im, top in zip(chunk, images, topk_rows(probs.numpy(), run.class_names, 5), strict=True):
            rows.append({"image_uri": uri, "width": im.shape[1], "height": im.shape[0], "topk": top})
    table = pa.Table.from_pylist(rows)
    table = table.append_column("label", pa.array([r["topk"][0]["label"] for r in rows], pa.int32()))
    pq.write_table(table, out_path, compression="zstd")
    return len(uris) / (time.perf_counter() - t0), torch.get_num_threads()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with C.workdir(args.workdir) as wd:
        uris, root = C.inputs(args, wd)
        run_dir = os.path.join(wd, "run")
        C.make_run(run_dir, arch=args.arch, image_size=args.image_size)
        with C.ray_session(args.address, args.num_cpus):
            worker_nice = C.ray_worker_niceness()
            naive_nice, (naive, threads) = C.call_niced(
                worker_nice,
                __file__,
                "naive_annotate",
                uris,
                run_dir,
                os.path.join(wd, "naive.parquet"),
                batch_size=args.batch_size,
                device=args.device,
                endpoint_url=args.endpoint_url,
                threads=args.threads,
            )
            summary = C.annotate(
                run_dir,
                root,
                os.path.join(wd, "out"),
                batch_size=args.batch_size,
                actors=args.actors,
                cpus_per_actor=args.cpus_per_actor,
                gpus_per_actor=1.0 if args.device == "cuda" else 0.0,
                endpoint_url=args.endpoint_url,
                address=args.address,
            )
    results = {
        "images": len(uris),
        "ok": summary["ok"],
        "naive_images_per_s": naive,
        "naive_torch_threads": threads,
        "ray_worker_niceness": worker_nice,
        "naive_niceness": naive_nice,
        "driver_niceness": os.nice(0),
        "pipeline_images_per_s": summary["images_per_s"],
        "pipeline_steady_images_per_s": summary["steady_images_per_s"],
        "speedup": C.ratio(summary["images_per_s"], naive),
        "steady_speedup": C.ratio(summary["steady_images_per_s"], naive),
        "layout": f"pipeline: {args.actors} actor(s) x {args.cpus_per_actor} CPU; naive: 1 process x {threads} threads",
    }
    C.print_table(
        f"pipeline vs naive script: {args.arch} @ {args.image_size} from {args.src_size} px {args.format}, "
        f"batch {args.batch_size}",
        [
            ("images", len(uris)),
            ("naive script img/s", naive),
            ("pipeline img/s (end to end)", summary["images_per_s"]),
            ("pipeline img/s (steady state)", summary["steady_images_per_s"]),
            ("speed-up end to end", results["speedup"]),
            ("speed-up steady state", results["steady_speedup"]),
            ("layout", results["layout"]),
            ("niceness: Ray workers, naive script", f"{worker_nice}, {naive_nice}"),
            ("target", TARGET),
        ],
    )
    return C.report("naive_baseline", args, results, target=TARGET)


if __name__ == "__main__":
    main()
