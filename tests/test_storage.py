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


def test_every_spelling_of_a_local_path_has_one_canonical_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = str(tmp_path / "ds")
    spellings = ["ds", "./ds", "ds/", "x/../ds", "~/ds", "file://ds", "file://./ds", "file://" + ds, ds + "/"]
    assert {storage.canonical_uri(s) for s in spellings} == {ds}
    assert storage.canonical_uri("file://localhost" + ds) == ds
    assert storage.canonical_uri("//" + ds.lstrip("/") + "//a.png") == ds + "/a.png"
    assert storage.canonical_uri("S3://b/k.png") == "s3://b/k.png"
    assert storage.canonical_uri("s3://b/a//k.png") == "s3://b/a//k.png"  # another S3 key than a/k.png


def test_relative_roots_list_absolute_uris(tmp_path, monkeypatch):
    storage.write_bytes(str(tmp_path / "ds" / "cat" / "1.png"), b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for root in ["ds", "./ds", "~/ds", "file://ds", "file://" + str(tmp_path / "ds")]:
        assert [e.uri for e in storage.iter_files(root)] == [str(tmp_path / "ds" / "cat" / "1.png")], root


def test_names_with_glob_characters_are_not_globs(tmp_path):
    """``img[1].png`` is that file, not ``img1.png`` (which the glob ``img[1].png`` matches)."""
    storage.write_bytes(str(tmp_path / "img1.png"), b"one")
    storage.write_bytes(str(tmp_path / "img[1].png"), b"bracket")
    storage.write_bytes(str(tmp_path / "d1" / "a.png"), b"a")
    storage.write_bytes(str(tmp_path / "d[1]" / "b.png"), b"bb")
    listed = list(storage.iter_files(str(tmp_path / "img[1].png")))
    assert [(e.uri, e.size) for e in listed] == [(str(tmp_path / "img[1].png"), len(b"bracket"))]
    assert storage.file_entry(str(tmp_path / "img[1].png")) == listed[0]
    assert [e.uri for e in storage.iter_files(str(tmp_path / "d[1]"))] == [str(tmp_path / "d[1]" / "b.png")]
    assert [e.uri for e in storage.iter_files(str(tmp_path / "img?.png"))] == [str(tmp_path / "img1.png")]
    (tmp_path / "img[1].png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img\[1\]\.png"):
        storage.file_entry(str(tmp_path / "img[1].png"))  # the glob would have found img1.png
    with pytest.raises(FileNotFoundError):
        storage.file_entry(str(tmp_path / "d1"))  # a folder is not a file


def test_s3_names_with_glob_characters_are_not_globs(bucket):
    storage.write_bytes(f"{bucket}/p/img1.png", b"one")
    storage.write_bytes(f"{bucket}/p/img[1].png", b"bracket")
    storage.write_bytes(f"{bucket}/p[1]/x.png", b"x")
    assert [(e.uri, e.size) for e in storage.iter_files(f"{bucket}/p/img[1].png")] == [
        (f"{bucket}/p/img[1].png", len(b"bracket"))
    ]
    entry = storage.file_entry(f"{bucket}/p/img[1].png")
    assert entry.size == len(b"bracket") and entry.fingerprint.startswith("etag:")
    assert entry.fingerprint != storage.file_entry(f"{bucket}/p/img1.png").fingerprint
    assert [e.uri for e in storage.iter_files(f"{bucket}/p[1]/")] == [f"{bucket}/p[1]/x.png"]
    assert [e.uri for e in storage.iter_files(f"{bucket}/p/img?.png")] == [f"{bucket}/p/img1.png"]
