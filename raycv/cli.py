"""The ``raycv`` command: parse, validate, call the library, print a one-screen summary.

Exit codes: 0 success; 2 bad usage or invalid config (one message, no traceback, nothing started);
1 runtime failure (a short message and where to look).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from raycv.errors import ConfigError, DatasetError, RaycvError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"raycv: error: {message}\n")


def _add_config_args(p: argparse.ArgumentParser, address: bool = True) -> None:
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key.path=value",
        help="override any config key (value parsed as YAML); repeatable",
    )
    if address:
        p.add_argument(
            "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)"
        )
        _add_verbose(p)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose", action="store_true", help="also show Ray's own output (worker logs, Ray Data)"
    )


def _add_submit_parser(sub: Any) -> None:
    p = sub.add_parser("submit", help="validate here, run train/annotate on a Ray cluster (Jobs API)")
    p.add_argument("kind", choices=["train", "annotate"])
    _add_config_args(p, address=False)
    p.add_argument(
        "--address", default=None, help="the dashboard URL, http://HEAD:8265 (default: RAY_ADDRESS)"
    )
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 0 if it succeeds, else 1")
    p.add_argument(
        "--no-check-paths",
        dest="check_paths",
        action="store_false",
        help="skip checking the config's input paths from here (storage only the cluster can reach)",
    )


def _add_results_parsers(sub: Any) -> None:
    """``inspect``, ``render``, ``export``, ``similar`` (annotation outputs) and ``report`` (training runs)."""
    sub.add_parser("inspect", help="counts, classes, scores and errors of an annotation output").add_argument(
        "output", metavar="OUTPUT"
    )
    where_help = 'filter, e.g. "score < 0.5" or "label_name == \'cat\' and score >= 0.9"; see README'
    render = sub.add_parser("render", help="draw masks/boxes/labels (and Grad-CAM) on the images, PNG")
    render.add_argument("output", metavar="OUTPUT")
    render.add_argument("--out", required=True, metavar="DIR", help="folder (or s3:// prefix) for the PNGs")
    render.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images")
    render.add_argument("--where", default=None, help=where_help)
    render.add_argument("--max-side", type=int, default=2048, help="scale larger images down to this side")
    export = sub.add_parser("export", help="an annotation output as COCO JSON, YOLO labels or GeoJSON")
    export.add_argument("output", metavar="OUTPUT")
    export.add_argument("--format", required=True, choices=["coco", "yolo", "geojson"])
    export.add_argument(
        "--out", required=True, metavar="PATH", help="a .json file (coco, geojson) or a folder (yolo)"
    )
    export.add_argument("--where", default=None, help=where_help)
    export.add_argument("--crs", default=None, help="geojson: reproject to this CRS (e.g. EPSG:4326)")
    export.add_argument("--copy-images", action="store_true", help="yolo: copy the images into PATH/images")
    similar = sub.add_parser("similar", help="the images nearest to one image by embedding (cosine)")
    similar.add_argument("output", metavar="OUTPUT", help="an output annotated with `task: embedding`")
    query = similar.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", default=None, metavar="URI", help="the query image, as it was annotated")
    query.add_argument("--id", default=None, metavar="IMAGE_ID", help="the query's image_id")
    similar.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")
    similar.add_argument("--json", action="store_true", help="a JSON list of {image_id, image_uri, score}")
    sub.add_parser("report", help="a run's model card and best metrics; writes curves.png").add_argument(
        "run_dir", metavar="RUN_DIR"
    )
    em = sub.add_parser("export-model", help="a trained run as one ONNX, torch.export or TorchScript file")
    em.add_argument("run_dir", metavar="RUN_DIR")
    em.add_argument("--format", required=True, choices=["onnx", "pt2", "torchscript"])
    em.add_argument(
        "--out", required=True, metavar="DIR", help="folder (or s3:// prefix): model file + model.json"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="raycv", description="Distributed training and bulk annotation of image archives on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_config_args(sub.add_parser("train", help="train a model with Ray Train"))
    _add_config_args(sub.add_parser("annotate", help="annotate an image archive into Parquet with Ray Data"))
    ev = sub.add_parser("evaluate", help="metrics of a trained run on a labelled dataset, as JSON")
    _add_config_args(ev, address=False)
    ev.add_argument("--split", choices=["val", "all"], default="val")
    demo = sub.add_parser("demo", help="end to end on generated data with a local Ray (minutes on a CPU)")
    demo.add_argument("--workdir", default="raycv-demo")
    _add_verbose(demo)
    _add_submit_parser(sub)
    models = sub.add_parser("models", help="list the model registry")
    models.add_argument("--task", default=None)
    models.add_argument("pattern", nargs="?", default="*")
    sub.add_parser("status", help="how far a running annotate or train job is").add_argument(
        "uri", metavar="OUTPUT|RUN_DIR"
    )
    cfg = sub.add_parser("config", help="print a commented example config, or its JSON Schema")
    cfg.add_argument("action", choices=["example", "schema"])
    cfg.add_argument("kind", choices=["train", "annotate"])
    _add_results_parsers(sub)
    return parser


def _validated(args: argparse.Namespace, kind: str) -> Any:
    from raycv.config import load_config
    from raycv.config.paths import check_paths

    cfg = load_config(args.config, args.overrides, kind=kind)  # type: ignore[arg-type]
    check_paths(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _validated(args, "train")  # before importing torch and Ray: a bad config answers at once
    from raycv.training.loop import run_training

    result = run_training(cfg, args.address)
    shown = ", ".join(f"{k}={v}" for k, v in result.best_metrics.items())
    print(
        f"\nraycv train: done in {result.duration_s:.1f}s, {result.epochs} epochs\n"
        f"  best: {shown}\n  run directory: {result.run_dir} (model.json, model.pt, metrics.jsonl)"
        + (f"\n  Ray's log of the run: {result.log}" if result.log else "")
    )
    return EXIT_OK


def cmd_annotate(args: argparse.Namespace) -> int:
    cfg = _validated(args, "annotate")
    from raycv.annotation.pipeline import run_annotation

    s = run_annotation(cfg, args.address)
    print(
        f"\nraycv annotate: {s.total} images: {s.ok} ok, {s.error} error, {s.skipped} skipped "
        f"in {s.duration_s:.1f}s ({s.images_per_s:.1f} img/s"
        + (f"; first rows after {s.first_rows_s:.1f}s" if s.first_rows_s is not None else "")
        + ")\n"
        f"  output: {s.output}/images (Parquet), summary: {s.output}/_summary.json\n"
        f"  run_id={s.run_id} model_id={s.model_id}" + (f"\n  Ray's log of the run: {s.log}" if s.log else "")
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _validated(args, "train")
    from raycv.training.evaluate import evaluate

    print(json.dumps(evaluate(cfg, args.split), indent=2))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from raycv.config import load_config
    from raycv.submit import SubmitError, auth_token, connect, dashboard_address, submit_job, wait_for_job

    address = dashboard_address(args.address)
    cfg = load_config(args.config, args.overrides, kind=args.kind)
    if args.check_paths:
        from raycv.config.paths import check_paths

        check_paths(cfg)
    try:
        client = connect(address)
        sid = submit_job(client, cfg, args.kind)
        # Ray's own CLI sends the token only in token mode.
        ray_cli = f"{'RAY_AUTH_MODE=token ' if auth_token() else ''}ray job"
        print(
            f"raycv submit: job {sid} submitted to {address}\n"
            f"  status: {ray_cli} status {sid} --address {address}\n"
            f"  logs:   {ray_cli} logs {sid} --address {address} --follow",
            flush=True,
        )
        if not args.wait:
            return EXIT_OK
        outcome = wait_for_job(client, sid)
    except SubmitError as exc:
        print(f"raycv submit: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if outcome.status == "SUCCEEDED":
        print(f"\nraycv submit: job {sid} SUCCEEDED\n  full log: {ray_cli} logs {sid} --address {address}")
        return EXIT_OK
    print(
        f"\nraycv submit: job {sid} {outcome.status}: {outcome.reason}\n"
        f"  full log: {ray_cli} logs {sid} --address {address}",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from raycv.demo import run_demo

    run_demo(args.workdir)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from raycv.tasks.registry import get_task, list_tasks

    if args.task is not None:
        try:
            get_task(args.task)
        except ValueError:
            raise ConfigError("--task", args.task, f"Choose one of {', '.join(list_tasks())}.") from None
    from raycv.models.registry import print_models

    print_models(args.pattern, task=args.task)
    return EXIT_OK


def _where(text: str | None) -> Any:
    from raycv.outputs.read import parse_where

    return None if text is None else parse_where(text)


def cmd_inspect(args: argparse.Namespace) -> int:
    from raycv.outputs.inspect import inspect_output
    from raycv.storage import Storage

    inspect_output(args.output, Storage())
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from raycv.outputs.render import render_output
    from raycv.storage import Storage

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", args.limit, "Give a positive number of images, or leave it out for all.")
    s = render_output(
        args.output, args.out, Storage(), limit=args.limit, where=_where(args.where), max_side=args.max_side
    )
    print(f"raycv render: {len(s.written)} PNGs in {s.out_dir} ({s.skipped_errors} error rows skipped)")
    for line in s.failed[:5]:
        print(f"  could not read {line}", file=sys.stderr)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from raycv.outputs.export import export_output
    from raycv.storage import Storage

    s = export_output(
        args.output,
        args.format,
        args.out,
        Storage(),
        where=_where(args.where),
        crs=args.crs,
        copy_images=args.copy_images,
    )
    what = {"coco": "annotations", "yolo": "label lines", "geojson": "features"}[args.format]
    print(f"raycv export: {s.images} images, {s.items} {what} -> {s.path} ({s.skipped} rows left out)")
    return EXIT_OK


def cmd_similar(args: argparse.Namespace) -> int:
    from raycv.outputs.similar import nearest, print_neighbours
    from raycv.storage import Storage

    found = nearest(args.output, Storage(), image_id=args.id, image_uri=args.image, k=args.k)
    print_neighbours(found, as_json=args.json)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from raycv.outputs.report import report_run
    from raycv.storage import Storage

    report_run(args.run_dir, Storage())
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from raycv.outputs.progress import print_status
    from raycv.storage import Storage

    print_status(args.uri, Storage())
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from raycv.config.examples import EXAMPLES, schema_json

    print(EXAMPLES[args.kind] if args.action == "example" else schema_json(args.kind), end="")
    return EXIT_OK


def cmd_export_model(args: argparse.Namespace) -> int:
    from raycv.models.export import export_model
    from raycv.models.saved import read_card
    from raycv.storage import Storage
    from raycv.tasks.registry import get_task

    store = Storage()
    objects = get_task(read_card(args.run_dir, store)["task"]).objects
    uri = export_model(args.run_dir, args.format, args.out, store, objects=objects)
    print(f"raycv export-model: {uri} + model.json; annotate it with `model: {args.out}`")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "config": cmd_config,
    "status": cmd_status,
    "train": cmd_train,
    "annotate": cmd_annotate,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "submit": cmd_submit,
    "models": cmd_models,
    "inspect": cmd_inspect,
    "render": cmd_render,
    "export": cmd_export,
    "similar": cmd_similar,
    "report": cmd_report,
    "export-model": cmd_export_model,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from raycv.runtime import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        if argv is None:  # the raycv command itself: Ray's own lines go to the run's log, not the console
            from raycv.runtime import core_lines_to_log, raycv_logging

            raycv_logging()
            with core_lines_to_log():
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"raycv: invalid config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DatasetError as exc:  # found while listing the dataset, before anything starts on the cluster
        print(f"raycv: invalid dataset: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RaycvError, FileNotFoundError, PermissionError) as exc:
        print(
            f"raycv {args.command}: {type(exc).__name__}: {exc}\n"
            "  (Ray's logs: /tmp/ray/session_latest/logs, or the dashboard's job page)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("raycv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
