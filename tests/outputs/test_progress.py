"""The progress record of a running job and `raycv status`: current every period, final state on exit,
"stale" when its writer is gone."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from raycv.cli import main
from raycv.outputs.progress import OUTPUT_RECORD, ProgressWriter, progress_line, rate_and_eta, read_progress
from raycv.storage import Storage

STORE = Storage()


def test_the_record_is_kept_current_while_running_and_final_on_exit(tmp_path, capsys):
    out = tmp_path / "out"
    done = {"n": 0}
    started = time.time()

    def fields():
        return {"done": done["n"], "total": 100, "errors": 1, **rate_and_eta(done["n"], 100, started)}

    with ProgressWriter(str(out / OUTPUT_RECORD), STORE, fields, period_s=0.2):
        first = read_progress(str(out), STORE)
        assert first["state"] == "running" and first["done"] == 0 and not first["stale"]
        done["n"] = 40
        time.sleep(0.6)
        live = read_progress(str(out), STORE)
        assert live["done"] == 40 and live["total"] == 100 and live["img_s"] > 0 and live["eta_s"] > 0
        assert main(["status", str(out)]) == 0
        line = capsys.readouterr().out
        assert line.startswith("running  40/100 images") and "1 errors" in line and "ETA" in line
    final = read_progress(str(out), STORE)
    assert final["state"] == "done" and final["done"] == 40


def test_a_failing_job_leaves_failed_and_a_silent_writer_reads_stale(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), ProgressWriter(str(out / OUTPUT_RECORD), STORE, dict, period_s=10):
        raise RuntimeError("boom")
    assert read_progress(str(out), STORE)["state"] == "failed"
    record = json.loads((out / OUTPUT_RECORD).read_text())
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    record.update(state="running", updated_at=old.isoformat(timespec="seconds"))
    (out / OUTPUT_RECORD).write_text(json.dumps(record))
    assert read_progress(str(out), STORE)["stale"]
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.startswith("stale (its writer stopped updating it)")
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "No job has written its progress there" in capsys.readouterr().err


def test_training_line_shows_the_epoch():
    line = progress_line(
        {
            "state": "running",
            "unit": "epochs",
            "epoch": 3,
            "epochs": 10,
            "done": 3,
            "total": 10,
            "img_s": 120.0,
            "eta_s": 70,
            "age_s": 2,
            "host": "node-1",
        }
    )
    assert line.startswith(
        "running  epoch 3/10  3/10 epochs  120.0 img/s  ETA 70 s  updated 2 s ago on node-1"
    )
