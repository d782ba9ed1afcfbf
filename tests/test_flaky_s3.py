"""A flaky object store is survived (issue 20 item 5): 5% of S3 requests throttled, 1% of connections reset.

Everything goes through :class:`tests._fault_proxy.FaultProxy` in front of the session's S3 server: the
Storage operations one by one, then `raycv annotate` and `raycv train`, whose Ray workers reach S3 through
the proxy too (``storage.endpoint_url`` in their config).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raycv import storage
from raycv.annotation.read import read_bytes_batch
from raycv.cli import main
from raycv.data.synthetic import write_flat_archive, write_imagefolder
from raycv.errors import StorageError
from raycv.models import create_model
from raycv.storage import Storage, retry
from tests._fault_proxy import FaultProxy
from tests._util import write_yaml

DIRECT = Storage()  # the S3 server itself, no faults: to set up and to check


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint, slowdown=0.05, reset=0.01, seed=20) as p:
        yield p


@pytest.fixture
def short_retries(monkeypatch):
    """This process's retries cut short (a permanent failure gives up in about a second), fresh clients."""
    monkeypatch.setattr(retry, "S3_REQUEST_ATTEMPTS", 2)
    monkeypatch.setattr(retry, "S3FS_RETRIES", 1)
    monkeypatch.setattr(retry, "OPERATION_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})


def test_writes_reads_lists_and_moves_survive_throttling_and_resets(proxy, bucket):
    flaky = Storage(endpoint_url=proxy.url)
    blobs = {
        f"{bucket}/data/{i % 4}/{i:03d}.bin": np.random.default_rng(i).bytes(2000 + i) for i in range(200)
    }
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: flaky.write_bytes(*kv), blobs.items()))
        assert list(pool.map(flaky.read_bytes, blobs)) == list(blobs.values())
        listed = [e.uri for e in flaky.iter_files(f"{bucket}/data")]
        assert listed == sorted(blobs)
        assert flaky.list_dirs(f"{bucket}/data") == ["0", "1", "2", "3"]
        moved = {uri: uri.replace("/data/", "/moved/") for uri in list(blobs)[:100]}
        list(pool.map(lambda kv: flaky.move(*kv), moved.items()))
        assert not any(pool.map(flaky.exists, moved))
        assert list(pool.map(flaky.read_bytes, moved.values())) == [blobs[u] for u in moved]
    fs, path = flaky.pyarrow_filesystem(f"{bucket}/moved")
    assert len(fs.get_file_info(pafs.FileSelector(path, recursive=True))) >= 100
    flaky.remove(f"{bucket}/moved", recursive=True)
    assert not DIRECT.exists(f"{bucket}/moved/0/000.bin")
    assert sorted(e.uri for e in DIRECT.iter_files(bucket)) == sorted(set(blobs) - set(moved))
    # ~1000 requests: about 50 throttled and 10 reset, every one of them retried away
    print(f"faults injected: {proxy.counts}")
    assert (
        proxy.counts["slowdown"] >= 20 and proxy.counts["reset_before"] + proxy.counts["reset_after"] >= 2
    ), proxy.counts


def test_missing_and_denied_objects_fail_at_once(s3_endpoint, bucket):
    with FaultProxy(s3_endpoint, slowdown=0, reset=0) as proxy:
        flaky = Storage(endpoint_url=proxy.url)
        DIRECT.write_bytes(f"{bucket}/secret.bin", b"x")
        proxy.fail["/secret.bin"] = (403, "AccessDenied")
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
            flaky.read_bytes(f"{bucket}/missing.bin")
        with pytest.raises(StorageError, match="PermissionError"):
            flaky.read_bytes(f"{bucket}/secret.bin")
        assert time.monotonic() - start < 5
        name = bucket.removeprefix("s3://")
        # one GET each: neither botocore, s3fs nor raycv asked again
        assert proxy.paths[f"/{name}/missing.bin"] == 1 and proxy.paths[f"/{name}/secret.bin"] == 1, (
            proxy.paths
        )


def test_is_transient_tells_throttling_and_resets_from_missing_and_denied():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> Exception:
        err = ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )
        translated = OSError(5, "as s3fs translates an unknown code")
        translated.__cause__ = err
        return translated

    assert retry.is_transient(client_error("SlowDown", 503))
    assert retry.is_transient(client_error("InternalError", 500))
    assert retry.is_transient(EndpointConnectionError(endpoint_url="http://x", error=ConnectionResetError()))
    assert retry.is_transient(ConnectionResetError(104, "reset"))
    assert not retry.is_transient(client_error("AccessDenied", 403))
    assert not retry.is_transient(client_error("NoSuchKey", 404))
    assert not retry.is_transient(FileNotFoundError("s3://b/k"))
    assert not retry.is_transient(ValueError("bad"))


def test_a_file_that_still_cannot_be_read_becomes_an_error_row(proxy, bucket, short_retries):
    uris = [f"{bucket}/img/{i}.png" for i in range(3)]
    for uri in uris:
        DIRECT.write_bytes(uri, b"png bytes")
    proxy.slowdown = proxy.reset = 0
    proxy.fail["/img/1.png"] = (503, "SlowDown")
    batch = {"image_uri": np.array(uris, dtype=object), "image_id": np.array(["a", "b", "c"], dtype=object)}
    out = read_bytes_batch(batch, store=Storage(endpoint_url=proxy.url), max_pixels=10_000)
    assert list(out["error_stage"]) == ["", "read", ""]
    assert "img/1.png" in out["error_message"][1], out["error_message"][1]
    assert list(out["data"][[0, 2]]) == [b"png bytes", b"png bytes"]
    assert proxy.counts["failed"] >= 2  # tried more than once, then given up


def test_annotate_finishes_through_a_flaky_store_with_every_image_once(proxy, bucket, tmp_path, ray_local):
    truth = write_flat_archive(f"{bucket}/archive", n=60, size=32, seed=5)
    model = tmp_path / "classifier.ts"
    net = create_model("test_classifier", num_classes=3).eval()
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(model))
    out = f"{bucket}/out"
    cfg = {
        "model": {
            "task": "classification",
            "file": str(model),
            "num_classes": 3,
            "preprocess": {"resize": [32, 32]},
        },
        "input": f"{bucket}/archive/",
        "output": out,
        "batch_size": 8,
        "actors": 1,
        "cpus_per_actor": 0.5,
        "storage": {"endpoint_url": proxy.url},
    }
    assert main(["annotate", write_yaml(tmp_path, "annotate.yaml", cfg)]) == 0
    fs, path = DIRECT.pyarrow_filesystem(out)
    rows = pq.read_table(f"{path}/images", filesystem=fs).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == sorted(truth)  # each once
    assert all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows if r["status"] != "ok"]
    print(f"faults injected while annotating: {proxy.counts}")
    assert proxy.faults >= 1, proxy.counts  # ~150 requests: about 9 faults


def test_train_finishes_through_a_flaky_store(proxy, bucket, tmp_path, ray_local):
    write_imagefolder(f"{bucket}/shapes", n_per_class=8, size=32, seed=0)
    train = {
        "model": {"arch": "test_classifier"},
        "data": {"train": f"{bucket}/shapes", "image_size": 32, "val_fraction": 0.25},
        "train": {"epochs": 2, "batch_size": 8, "seed": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"dir": f"{bucket}/run"},
        "storage": {"endpoint_url": proxy.url},
    }
    assert main(["train", write_yaml(tmp_path, "train.yaml", train)]) == 0
    assert DIRECT.exists(f"{bucket}/run/model.json") and DIRECT.exists(f"{bucket}/run/model.pt")
    print(f"faults injected while training: {proxy.counts}")
    assert proxy.faults >= 1, proxy.counts  # ~100 requests: about 6 faults
