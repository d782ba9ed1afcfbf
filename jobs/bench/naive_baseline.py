"""`raycv annotate` against the script everyone writes first, on the same archive, in one run.

The naive script is one process with torch's default threads (all cores): for each batch of files it
reads, decodes each image in full and resizes it (raycv's ``decode_image`` and ``resize_rgb``: what
``Image.open(f).convert("RGB").resize(size)`` computes for these JPEGs), runs the forward pass on plain
NCHW tensors and the softmax, appends the top-k rows to a list, and at the end writes one Parquet file.
It overlaps nothing. With ``--naive-like-raycv`` it also does what raycv does for each image (JPEGs
decoded at reduced DCT scale with ``decode_reduced``, BatchNorms folded into the convolutions, NHWC weights
and inputs), which leaves only the
pipelining in the ratio. The pipeline is the real :func:`raycv.annotation.pipeline.run_annotation` with its actors and
read tasks on the same cores. Speed-up = pipeline img/s / naive img/s, both end to end: start-up
included (the naive script's imports and model load; the pipeline's operators and actors starting,
importing and loading the model), and both in steady state: the naive script from its first batch on, the
pipeline between the first and the last batch its actors finished. The naive script runs in its own
process at the niceness of Ray's workers (read from one with psutil; Ray starts them at nice 15), so both
sides get the same share of a shared machine. Target on 2 cores: >= 1.5x.

    python -m jobs.bench.naive_baseline --n 400 --json naive.json
"""

from __future__ import annotations

import os
import time

from . import _common as C

TARGET = ">= 1.5x (2 cores)"


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.base_parser(__doc__.split("\n")[0], n=400, arch="resnet18", image_size=112, src_size=512)
    p.add_argument(
        "--actors", type=C.auto_or, default="auto", help="default: auto, as in a config without it"
    )
    p.add_argument("--cpus-per-actor", type=C.auto_or, default="auto", help="default: auto")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the naive script (default: torch's)"
    )
    p.add_argument(
        "--naive-like-raycv",
        action="store_true",
        help="the naive script with raycv's per-image speed-ups (reduced JPEG decode, conv-BN fusion, NHWC): "
        "pipelining alone",
    )
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="the pipeline with annotate channels_last: false (NCHW)",
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
    like_raycv: bool = False,
) -> tuple[float, float, int]:
    """The sequential script: read -> decode -> forward -> append -> one Parquet file.

    Timed from before its imports (torch, torchvision, the model code), which a user's script pays on every
    run as the pipeline's actors do. Returns (img/s end to end, img/s from the first batch on: what is left
    without the imports and the model load, torch threads: ``threads``, else torch's default).
    """
    t0 = time.perf_counter()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    if threads:
        torch.set_num_threads(threads)

    from raycv.annotation.actor import fuse_conv_bn
    from raycv.data.images import decode_image, decode_reduced, resize_rgb
    from raycv.data.transforms import normalize
    from raycv.models import saved
    from raycv.storage import Storage
    from raycv.tasks.classification import topk_rows

    store = Storage(endpoint_url=endpoint_url)  # a script's one handle on storage
    run = saved.load_run(run_dir, store, device=device)
    if like_raycv:
        run.model = fuse_conv_bn(run.model).to(memory_format=torch.channels_last)
    fmt = torch.channels_last if like_raycv else torch.contiguous_format

    def decode(data: bytes, uri: str) -> tuple[np.ndarray, int, int]:
        if like_raycv:
            image, width, height = decode_reduced(data, uri, run.size_hw)
        else:
            image = decode_image(data, uri)
            width, height = image.shape[1], image.shape[0]
        return resize_rgb(image, run.size_hw), width, height

    norm = run.card["normalization"]
    rows: list[dict] = []
    t_first = time.perf_counter()
    for i in range(0, len(uris), batch_size):
        chunk = uris[i : i + batch_size]
        images = [decode(store.read_bytes(u), u) for u in chunk]
        pixels = torch.from_numpy(np.stack([im for im, _, _ in images]))
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0).to(device)
        with torch.inference_mode():
            x = normalize(x, norm["mean"], norm["std"]).contiguous(memory_format=fmt)
            probs = torch.softmax(run.model(x).float(), dim=1).cpu()
        for uri, (_, w, h), top in zip(
            chunk, images, topk_rows(probs.numpy(), run.class_names, 5), strict=True
        ):
            rows.append({"image_uri": uri, "width": w, "height": h, "topk": top})
    table = pa.Table.from_pylist(rows)
    table = table.append_column("label", pa.array([r["topk"][0]["label"] for r in rows], pa.int32()))
    pq.write_table(table, out_path, compression="zstd")
    t_end = time.perf_counter()
    return len(uris) / (t_end - t0), len(uris) / (t_end - t_first), torch.get_num_threads()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with C.workdir(args.workdir) as wd:
        uris, root = C.inputs(args, wd)
        run_dir = os.path.join(wd, "run")
        C.make_run(run_dir, arch=args.arch, image_size=args.image_size)
        with C.ray_session(args.address, args.num_cpus):
            sz = C.sizing(args.actors, args.cpus_per_actor, 1.0 if args.device == "cuda" else 0.0)
            worker_nice = C.ray_worker_niceness()
            naive_nice, (naive, naive_steady, threads) = C.call_niced(
                worker_nice,
                naive_annotate,
                uris,
                run_dir,
                os.path.join(wd, "naive.parquet"),
                batch_size=args.batch_size,
                device=args.device,
                endpoint_url=args.endpoint_url,
                threads=args.threads,
                like_raycv=args.naive_like_raycv,
            )
            summary = C.annotate_as_args(
                args,
                run_dir,
                root,
                os.path.join(wd, "out"),
                gpus_per_actor=1.0 if args.device == "cuda" else 0.0,
                speed={"channels_last": args.channels_last},
            )
    results = {
        "images": len(uris),
        "ok": summary["ok"],
        "naive_images_per_s": naive,
        "naive_steady_images_per_s": naive_steady,
        "naive_torch_threads": threads,
        "naive_like_raycv": args.naive_like_raycv,
        "pipeline_channels_last": args.channels_last,
        "ray_worker_niceness": worker_nice,
        "naive_niceness": naive_nice,
        "driver_niceness": os.nice(0),
        "pipeline_images_per_s": summary["images_per_s"],
        "pipeline_steady_images_per_s": summary["steady_images_per_s"],
        "speedup": C.ratio(summary["images_per_s"], naive),
        "steady_speedup": C.ratio(summary["steady_images_per_s"], naive_steady),
        "layout": f"pipeline: {sz.describe_short()}; naive: 1 process x {threads} threads",
        "pipeline_first_rows_s": summary["first_rows_s"],
    }
    return C.print_and_report(
        "naive_baseline",
        args,
        results,
        title=f"pipeline vs naive script: {args.arch} @ {args.image_size} from {args.src_size} px "
        f"{args.format}, batch {args.batch_size}",
        rows=[
            ("images", len(uris)),
            ("naive script img/s (end to end)", naive),
            ("naive script img/s (steady state)", naive_steady),
            ("pipeline img/s (end to end)", summary["images_per_s"]),
            ("pipeline img/s (steady state)", summary["steady_images_per_s"]),
            ("speed-up end to end", results["speedup"]),
            ("speed-up steady state", results["steady_speedup"]),
            ("layout", results["layout"]),
            ("pipeline: first rows after (s)", summary["first_rows_s"]),
            ("pipeline channels_last", args.channels_last),
            ("naive script like raycv (reduced JPEG decode, NHWC)", args.naive_like_raycv),
            ("niceness: Ray workers, naive script", f"{worker_nice}, {naive_nice}"),
        ],
        target=TARGET,
    )


if __name__ == "__main__":
    main()
