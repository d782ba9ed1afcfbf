"""How close `raycv annotate` comes to its model: pipeline img/s / bare-model img/s, measured in one run.

The pipeline is the real :func:`raycv.annotation.pipeline.run_annotation` (plan -> read + decode tasks -> model
actors -> Parquet -> commit) over an archive (generated, or ``--input`` on local disk or object storage).
The bare model is the same run directory's model on the same decoded pixels (what the read stage hands the
actors), same batch size, no Ray, no I/O. At defaults (``--actors``/``--cpus-per-actor`` auto, as in a config
without them) on CPU it is given all the machine's cores: one process, one torch thread per CPU of the
cluster. With explicit values it runs in the actors' layout of torch threads: one process per actor with
the threads raycv gives each. It is measured before and after the pipeline, and the
ratio uses their mean. The bare model runs at the niceness of Ray's workers (read from one with psutil;
Ray starts them at nice 15), so both sides get the same share of a machine shared with other work, and
with the same ``--precision``, ``--[no-]channels-last`` and ``--compile`` as the actors. Target on CPU: >= 0.90.

    python -m jobs.bench.annotate_efficiency --n 600 --json eff.json               # resnet18 @ 224, CPU
    python -m jobs.bench.annotate_efficiency --device cuda --arch resnet50 --n 20000 --batch-size 128 \\
        --actors 1 --cpus-per-actor 8 --precision bf16 --input s3://archive/images/ \\
        --address auto --json eff_gpu.json
"""

from __future__ import annotations

import os

from . import _common as C

TARGET = ">= 0.90 (CPU)"


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.base_parser(__doc__.split("\n")[0], n=600, arch="resnet18", image_size=224, src_size=256)
    p.add_argument("--model", default=None, help="an existing run directory instead of random weights")
    p.add_argument(
        "--actors", type=C.auto_or, default="auto", help="default: auto, as in a config without it"
    )
    p.add_argument("--cpus-per-actor", type=C.auto_or, default="auto", help="default: auto")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 with --device cuda, else 0")
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast (fp16: GPU)"
    )
    p.add_argument(
        "--channels-last",
        action=C.argparse.BooleanOptionalAction,
        default=True,
        help="NHWC weights and inputs (annotate's default; --no-channels-last for NCHW)",
    )
    p.add_argument(
        "--fuse-conv-bn",
        action=C.argparse.BooleanOptionalAction,
        default=True,
        help="BatchNorms folded into the convolutions (annotate's default; actors and bare model)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (actors and bare model)")
    p.add_argument(
        "--decode",
        choices=["tasks", "actor"],
        default="tasks",
        help="annotate decode: read tasks decode (default), or the actors (nvJPEG with --device cuda)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import ray

    from raycv.models import saved
    from raycv.storage import Storage

    args = parse_args(argv)
    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if args.device == "cuda" else 0.0)
    ep = args.endpoint_url
    store = Storage(endpoint_url=ep)
    with C.workdir(args.workdir) as wd:
        uris, source = C.inputs(args, wd)
        run_dir = args.model or os.path.join(wd, "run")
        if not args.model:
            C.make_run(run_dir, arch=args.arch, image_size=args.image_size)
        size = saved.read_card(run_dir, store)["image_size"]
        pixels = C.decoded_pixels(uris, int(size), store)
        speed = {
            "precision": args.precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "fuse_conv_bn": args.fuse_conv_bn,
        }
        with C.ray_session(args.address, args.num_cpus):
            sz = C.sizing(args.actors, args.cpus_per_actor, gpus)
            if sz.auto and not gpus:
                # At defaults the baseline is the bare model given all the machine's cores: one process,
                # one torch thread per core.
                processes, threads = 1, max(1, int(ray.cluster_resources().get("CPU", 1)))
                layout = f"{sz.describe_short()}; bare model: 1 process x {threads} threads (all cores)"
            else:
                processes, threads = sz.actors, sz.threads  # the actors' layout of torch threads
                layout = f"{sz.describe_short()}; bare model: the same processes x threads"
            bare_kw = {
                "batch_size": args.batch_size,
                "processes": processes,
                "threads": threads,
                "speed": speed,
            }
            # Ray's workers run at raylet + 15: the bare model gets the same niceness (both inside the session,
            # so Ray's idle processes are there for both sides too).
            worker_nice = C.ray_worker_niceness()
            bare_nice = max(worker_nice, os.nice(0))
            bare_kw["niceness"] = worker_nice
            bare_before = C.bare_model_rate(run_dir, pixels, device=args.device, **bare_kw)
            summary = C.annotate_as_args(
                args,
                run_dir,
                source,
                os.path.join(wd, "out"),
                gpus_per_actor=gpus,
                speed={**speed, "decode": args.decode},
            )
            bare_after = C.bare_model_rate(run_dir, pixels, device=args.device, **bare_kw)
    bare = (bare_before + bare_after) / 2
    results = {
        "images": len(uris),
        "ok": summary["ok"],
        "bare_model_images_per_s_before": bare_before,
        "bare_model_images_per_s_after": bare_after,
        "bare_model_images_per_s": bare,
        "pipeline_images_per_s": summary["images_per_s"],
        "pipeline_steady_images_per_s": summary["steady_images_per_s"],
        "pipeline_duration_s": summary["duration_s"],
        "efficiency": C.ratio(summary["images_per_s"], bare),
        "steady_efficiency": C.ratio(summary["steady_images_per_s"], bare),
        "torch_threads_per_actor": sz.threads,
        "bare_model_processes": processes,
        "bare_model_threads": threads,
        "pipeline_first_rows_s": summary["first_rows_s"],
        "ray_worker_niceness": worker_nice,
        "bare_model_niceness": bare_nice,
        "driver_niceness": os.nice(0),
        **speed,
        "decode": args.decode,
        "layout": layout,
    }
    return C.print_and_report(
        "annotate_efficiency",
        args,
        results,
        title=f"annotate efficiency: {args.arch} @ {size}, batch {args.batch_size}, {results['layout']}",
        rows=[
            ("images", len(uris)),
            ("bare model img/s (before, after)", f"{bare_before:.2f}, {bare_after:.2f}"),
            ("pipeline img/s (end to end)", summary["images_per_s"]),
            ("pipeline img/s (steady state)", summary["steady_images_per_s"]),
            ("efficiency end to end", results["efficiency"]),
            ("efficiency steady state", results["steady_efficiency"]),
            ("pipeline: first rows after (s)", summary["first_rows_s"]),
            ("niceness: Ray workers, bare model", f"{worker_nice}, {bare_nice}"),
            (
                "precision, channels_last, compile, fuse_conv_bn",
                f"{args.precision}, {args.channels_last}, {args.compile}, {args.fuse_conv_bn}",
            ),
            ("decode", args.decode),
        ],
        target=TARGET,
    )


if __name__ == "__main__":
    main()
