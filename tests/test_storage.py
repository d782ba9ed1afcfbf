import os

import pytest

from raycv import storage
from raycv.errors import StorageError


def test_local_paths_and_file_uris(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.read_bytes("file://" + uri) == b"hello"
    assert storage.exists(uri) and not storage.exists(uri + "x")
    assert not [p for p in os.listdir(tmp_path / "a") if ".tmp-" in p]  # atomic write left no temp file


def test_listing_prefix_glob_and_extensions(tmp_path):
    for rel in ["x/1.jpg", "x/2.PNG", "x/sub/3.jpg", "x/notes.txt", "x/_SUCCESS", "x/.hidden.jpg"]:
        storage.write_bytes(str(tmp_path / rel), b"0123")
    all_imgs = [e.uri for e in storage.iter_files(str(tmp_path / "x"), extensions=(".jpg", ".png"))]
    assert [os.path.relpath(u, tmp_path) for u in all_imgs] == ["x/1.jpg", "x/2.PNG", "x/sub/3.jpg"]
    globbed = [e.uri for e in storage.iter_files(str(tmp_path / "x" / "*.jpg"))]
    assert [os.path.basename(u) for u in globbed] == ["1.jpg"]
    entry = next(storage.iter_files(str(tmp_path / "x" / "1.jpg")))
    assert entry.size == 4 and entry.fingerprint.startswith("size:4-mtime:")
    assert storage.list_dirs(str(tmp_path / "x")) == ["sub"]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        storage.read_bytes(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError):
        list(storage.iter_files(str(tmp_path / "nothing")))
    with pytest.raises(StorageError, match=r"Unsupported URI scheme 'gs://'"):
        storage.read_bytes("gs://bucket/x")


def test_s3_round_trip_listing_and_etags(bucket):
    storage.write_bytes(f"{bucket}/imgs/a.jpg", b"aaa")
    storage.write_bytes(f"{bucket}/imgs/deep/b.png", b"bbbb")
    storage.write_bytes(f"{bucket}/other/c.jpg", b"c")
    assert storage.read_bytes(f"{bucket}/imgs/a.jpg") == b"aaa"
    entries = list(storage.iter_files(f"{bucket}/imgs/"))
    assert [e.uri for e in entries] == [f"{bucket}/imgs/a.jpg", f"{bucket}/imgs/deep/b.png"]
    assert [e.size for e in entries] == [3, 4]
    assert all(e.fingerprint.startswith("etag:") for e in entries)
    assert [e.uri for e in storage.iter_files(f"{bucket}/**/*.jpg")] == [
        f"{bucket}/imgs/a.jpg",
        f"{bucket}/other/c.jpg",
    ]
    storage.move(f"{bucket}/imgs/a.jpg", f"{bucket}/moved/a.jpg")
    assert (
        not storage.exists(f"{bucket}/imgs/a.jpg") and storage.read_bytes(f"{bucket}/moved/a.jpg") == b"aaa"
    )
    storage.remove(f"{bucket}/imgs", recursive=True)
    assert not storage.exists(f"{bucket}/imgs/deep/b.png")


def test_endpoint_comes_from_config_or_environment(s3_endpoint, monkeypatch):
    assert storage.resolve_endpoint(None) == s3_endpoint
    assert storage.resolve_endpoint("http://other:9000") == "http://other:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.resolve_endpoint(None) is None
