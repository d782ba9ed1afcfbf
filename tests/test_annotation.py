"""Input planning and the read/decode stage, without a model (the full pipeline: test_end_to_end.py)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycv import storage
from raycv.annotation import plan_inputs, read_decode_batch
from raycv.data.images import encode_png
from raycv.errors import ConfigError


@pytest.fixture
def archive(tmp_path):
    for rel in ["a/1.png", "a/2.jpg", "b/3.png", "notes.txt"]:
        storage.write_bytes(str(tmp_path / rel), encode_png(np.zeros((4, 6, 3), np.uint8)))
    return tmp_path


def test_prefix_glob_and_list_inputs(archive):
    by_prefix = [u for u, _ in plan_inputs(str(archive))]
    assert [u.split(str(archive))[1] for u in by_prefix] == ["/a/1.png", "/a/2.jpg", "/b/3.png"]
    assert [u for u, _ in plan_inputs(str(archive / "*" / "*.png"))] == [
        str(archive / "a/1.png"),
        str(archive / "b/3.png"),
    ]
    listed = plan_inputs([str(archive / "b/3.png"), str(archive / "a/1.png"), str(archive / "b/3.png")])
    assert [u for u, _ in listed] == [
        str(archive / "b/3.png"),
        str(archive / "a/1.png"),
    ]  # order kept, de-duplicated
    assert all(f and f.startswith("size:") for _, f in listed)


def test_manifests_txt_csv_parquet(archive, tmp_path):
    uris = [str(archive / "a/1.png"), str(archive / "b/3.png")]
    storage.write_bytes(str(tmp_path / "m.txt"), ("# comment\n" + "\n".join(uris) + "\n").encode())
    storage.write_bytes(
        str(tmp_path / "m.csv"), ("image_uri,other\n" + "\n".join(f"{u},1" for u in uris)).encode()
    )
    pq.write_table(pa.table({"image_uri": uris}), str(tmp_path / "m.parquet"))
    for name in ["m.txt", "m.csv", "m.parquet"]:
        assert [u for u, _ in plan_inputs(str(tmp_path / name))] == uris
    pq.write_table(pa.table({"path": uris}), str(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match="needs an 'image_uri' column"):
        plan_inputs(str(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match="Nothing there"):
        plan_inputs(str(tmp_path / "missing"))


def test_read_decode_turns_each_failure_into_its_own_error(archive):
    uris = [str(archive / "a/1.png"), str(archive / "missing.png"), str(archive / "notes.txt")]
    batch = {"image_uri": np.array(uris, dtype=object), "image_id": np.array(["x", "y", "z"], dtype=object)}
    out = read_decode_batch(batch, size_hw=(8, 8), endpoint_url=None, max_pixels=10_000)
    assert out["pixels"].shape == (3, 8, 8, 3) and out["pixels"].dtype == np.uint8
    assert out["width"].tolist() == [6, -1, 6] and out["height"].tolist() == [4, -1, 4]
    assert list(out["error_stage"]) == ["", "read", ""]
    assert out["error_type"][1] == "FileNotFoundError" and "missing.png" in out["error_message"][1]
    small = read_decode_batch(batch, size_hw=(8, 8), endpoint_url=None, max_pixels=10)
    assert small["error_stage"][0] == "decode" and "pixels" in small["error_message"][0]
