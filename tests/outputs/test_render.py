"""`raycv render`, `raycv inspect`, `raycv report`, the `--where` filter, and the drawing helpers."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raycv.cli import main
from raycv.config import TrainConfig
from raycv.data import draw as viz
from raycv.data.images import encode_png
from raycv.data.synthetic_scenes import CLASSES, render_scene
from raycv.errors import ConfigError
from raycv.outputs.read import filter_table, parse_where
from raycv.storage import Storage
from raycv.tasks.segmentation import class_pixels
from raycv.training import run_directory
from tests._outputs import common, detection_output, write_images

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

SEG_NAMES = ["background", *CLASSES]


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    return detection_output(tmp_path_factory.mktemp("det"))


def test_render_detections_draws_boxes_at_the_image_size(det, tmp_path, capsys):
    out = tmp_path / "png"
    assert main(["render", det["out"], "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 PNGs" in text and "1 error rows skipped" in text
    files = sorted(out.iterdir())
    assert len(files) == 4
    for f in files:
        uri = next(u for u in det["scenes"] if f.name.startswith(u.rsplit("/", 1)[1][:-4] + "-"))
        scene = det["scenes"][uri]
        drawn = _png(f)
        assert drawn.shape == scene.image.shape
        changed = (drawn != scene.image).any(axis=2)
        x1, y1, x2, y2 = scene.boxes[0].astype(int)
        assert changed[y1:y2, x1:x2].mean() > 0.3  # the instance mask and box outline are painted
        assert changed.mean() < 0.9  # the background is left alone


def test_render_where_on_scores_and_limit(det, tmp_path):
    out = tmp_path / "png"
    assert main(["render", det["out"], "--out", str(out), "--where", "score >= 0.9", "--limit", "2"]) == 0
    assert len(list(out.iterdir())) == 2
    assert main(["render", det["out"], "--out", str(tmp_path / "none"), "--where", "score > 0.95"]) == 0
    assert not (tmp_path / "none").exists()


def test_render_segmentation_blends_classes_and_downscales(tmp_path):
    scene = render_scene(np.random.default_rng(3), size=(120, 200), n_objects=2)
    uri = str(tmp_path / "big.png")
    (tmp_path / "big.png").write_bytes(encode_png(scene.image))
    out = str(tmp_path / "out")
    row = common(
        uri,
        task="semantic_segmentation",
        width=200,
        height=120,
        mask_png=encode_png(scene.mask),
        class_pixels=class_pixels(scene.mask, SEG_NAMES),
    )
    write_images(out, [row], "semantic_segmentation")
    assert main(["render", out, "--out", str(tmp_path / "png"), "--max-side", "100"]) == 0
    (f,) = (tmp_path / "png").iterdir()
    drawn = _png(f)
    assert drawn.shape == (60, 100, 3)
    small = viz.fit(scene.image, 100).astype(int)
    mask = viz.resize_labels(scene.mask, 60, 100)
    diff = np.abs(drawn.astype(int) - small).sum(axis=2)
    assert diff[mask > 0].mean() > 3 * diff[:, :40][mask[:, :40] == 0].mean()  # shapes painted, not the rest


def test_inspect_prints_counts_classes_scores_and_errors(det, capsys):
    assert main(["inspect", det["out"]]) == 0
    text = capsys.readouterr().out
    assert "rows by status" in text and "objects by class" in text and "object scores" in text
    lines = {w[0]: w for w in (ln.replace("│", " ").split() for ln in text.splitlines()) if w}
    assert lines["ok"][-1] == "4" and lines["error"][-1] == "1"
    for name in CLASSES:
        n = sum(o["label_name"] == name for o in det["objects"])
        assert n == 0 or lines[name][1] == str(n)
    assert "DecodeError" in text and "broken.png" in text


def test_inspect_classification_counts_labels(tmp_path, capsys):
    out = str(tmp_path / "out")
    rows = [
        common(
            f"/x/{i}.png",
            task="classification",
            width=8,
            height=8,
            label=i % 2,
            label_name=("cat", "dog")[i % 2],
            score=0.55 + 0.1 * (i % 4),
            topk=[],
        )
        for i in range(7)
    ]
    write_images(out, rows, "classification")
    with open(f"{out}/_summary.json", "w") as f:
        json.dump({"total": 7, "ok": 7, "error": 0, "skipped": 0, "run_id": "r0"}, f)
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "images by class" in text and "top-class scores" in text and '"run_id": "r0"' in text
    words = [ln.replace("│", " ").split() for ln in text.splitlines()]
    counts = {w[0]: w[1] for w in words if w[:1] in (["cat"], ["dog"])}
    assert counts == {"cat": "4", "dog": "3"}


# -- --where ---------------------------------------------------------------------------------------------------


def _table() -> pa.Table:
    return pa.table(
        {
            "score": pa.array([0.2, 0.6, None, 0.95], pa.float32()),
            "label_name": ["cat", "dog", None, "cat"],
            "status": ["ok", "ok", "error", "ok"],
            "width": pa.array([10, 5000, None, 20], pa.int32()),
        }
    )


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("score < 0.5", [0]),
        ("label_name == 'cat' and score >= 0.9", [3]),
        ("status = \"error\" or (width > 4000 and not label_name in ('cat'))", [1, 2]),
        ("score is null", [2]),
        ("label_name not in ('cat', 'dog')", []),
        ("NOT (score <= 0.5) AND width != 20", [1]),
        ("width >= 1e1", [0, 1, 3]),
    ],
)
def test_where_filters(text, rows):
    t = _table().append_column("i", pa.array(range(4)))
    assert filter_table(t, parse_where(text))["i"].to_pylist() == rows


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        # in / not in on a null cell are unknown, and not keeps them unknown: row 2 (null label) is dropped
        ("not label_name in ('cat', 'dog')", []),
        ("not label_name in ('dog')", [0, 3]),
        ("not (label_name not in ('cat'))", [0, 3]),
        ("label_name not in ('dog')", [0, 3]),
        ("not width > 5", []),
        ("not score < 0.5", [1, 3]),
        ("not (width > 4000 or label_name in ('dog'))", [0, 3]),
        # Kleene's and/or: null or true is true, null and false is false (so its negation holds)
        ("label_name in ('cat') or status == 'error'", [0, 2, 3]),
        ("width > 4000 or status == 'error'", [1, 2]),
        ("not (label_name in ('cat') and status == 'ok')", [1, 2]),
        ("not (width > 15 and status == 'ok')", [0, 2]),
    ],
)
def test_where_null_cells_follow_three_valued_logic(text, rows):
    t = _table().append_column("i", pa.array(range(4)))
    assert filter_table(t, parse_where(text))["i"].to_pylist() == rows


@pytest.mark.parametrize(
    ("text", "literal", "fix"),
    [
        ("width > 99999999999999999999", "99999999999999999999", "1e+20"),
        ("width in (1, -9223372036854775809)", "-9223372036854775809", "-9.22337e+18"),
    ],
)
def test_where_refuses_an_integer_beyond_64_bits(text, literal, fix):
    with pytest.raises(ConfigError, match=f"The number {literal} does not fit a 64-bit integer") as exc:
        parse_where(text)
    assert f"write it as a float, e.g. {fix}" in str(exc.value)


def test_where_limits_of_64_bits_and_float32_columns_evaluate():
    t = _table().append_column("i", pa.array(range(4)))
    for text, rows in [
        ("width < 9223372036854775807 and width > -9223372036854775808", [0, 1, 3]),
        ("score < 9223372036854775807", [0, 1, 3]),
        ("width > 1e20", []),
    ]:
        assert filter_table(t, parse_where(text))["i"].to_pylist() == rows


@pytest.mark.parametrize("command", ["render", "export"])
def test_cli_where_with_an_integer_beyond_64_bits_exits_2(det, tmp_path, capsys, command):
    out = ["--out", str(tmp_path / "out")] + (["--format", "coco"] if command == "export" else [])
    assert main([command, det["out"], *out, "--where", "width > 99999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "99999999999999999999" in err and "write it as a float, e.g. 1e+20" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("score <", "Expected a value but found the end"),
        ("__import__('os').system('x')", "Cannot read it from position 16"),
        ("score", "Expected a comparison"),
        ("(score < 1", "Expected '\\)' but found the end"),
        ("score < 1 label_name", "Unexpected 'label_name'"),
        ("", "empty"),
        ("score ~ 1", "Cannot read it"),
        ("height > 3", "No column height"),
        ("score > 'high'", "Cannot evaluate"),
    ],
)
def test_where_rejects_bad_filters_with_the_fix(text, message):
    with pytest.raises(ConfigError, match=message):
        filter_table(_table(), parse_where(text))


# -- Training runs ---------------------------------------------------------------------------------------------


def _history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "accuracy": 0.5 + 0.1 * e,
            "precision": 0.5,
            "recall": 0.6,
            "f1": 0.55,
            "lr": 0.001,
            "epoch_s": 1.0,
        }
        for e in range(1, epochs + 1)
    ]


def test_training_writes_curves_and_the_best_confusion_matrix(tmp_path):
    from raycv.training.run_directory import write_run_dir

    cfg = TrainConfig.model_validate(
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": str(tmp_path / "ds")},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    info = {"num_classes": 3, "class_names": list(CLASSES), "n_train": 30, "n_val": 9}
    cm = [[3, 0, 0], [1, 2, 0], [0, 0, 3]]
    best = {"epoch": 3, "metrics": {"accuracy": 0.89}, "confusion": cm}
    write_run_dir(cfg, info, {"history": _history(3), "best": best, "resumed_at_epochs": []})
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["best_confusion"] == cm
    assert _png(tmp_path / "run" / "curves.png").shape == (380, 1120, 3)
    assert _png(tmp_path / "run" / "confusion.png").shape[0] > 100


def test_report_prints_the_card_and_best_metrics_and_refreshes_curves(tmp_path, capsys):
    run = tmp_path / "run"
    card = {
        "task": "classification",
        "arch": "simple_cnn",
        "num_classes": 3,
        "class_names": list(CLASSES),
        "image_size": 32,
        "best_epoch": 4,
        "best_metrics": {"accuracy": 0.9375, "f1": 0.91},
    }
    STORE.write_json(str(run / "model.json"), card)
    run_directory.write_metrics(str(run), _history(4))
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert "simple_cnn" in text and "best metrics (epoch 4)" in text and "0.9375" in text
    curves = _png(run / "curves.png")
    assert (curves != 255).any(axis=2).mean() > 0.02  # axes, lines and labels were drawn
    assert not (run / "confusion.png").exists()  # no confusion matrix in this card
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_heatmap_colours_and_blend():
    heat = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    colours = viz.heat_colours(heat)
    assert colours[0, 0, 2] > colours[0, 0, 0]  # cold is blue
    assert colours[-1, -1, 0] > colours[-1, -1, 2]  # hot is red
    image = np.full((16, 16, 3), 100, np.uint8)
    blended = viz.blend_heatmap(image, heat)
    assert blended.shape == image.shape
    assert np.abs(blended[0, 0].astype(int) - 100).sum() < np.abs(blended[-1, -1].astype(int) - 100).sum()
    assert Image.open(io.BytesIO(viz.png_bytes(blended))).size == (16, 16)
