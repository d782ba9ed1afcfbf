import json
import os
import pickle

import pytest

from raycv import storage
from raycv.errors import StorageError
from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


def test_local_paths_and_file_uris(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    STORE.write_bytes(uri, b"hello")
    assert STORE.read_bytes(uri) == b"hello"
    assert STORE.read_bytes("file://" + uri) == b"hello"
    assert STORE.exists(uri) and not STORE.exists(uri + "x")
    assert not [p for p in os.listdir(tmp_path / "a") if ".tmp-" in p]  # atomic write left no temp file


def test_listing_prefix_glob_and_extensions(tmp_path):
    for rel in ["x/1.jpg", "x/2.PNG", "x/sub/3.jpg", "x/notes.txt", "x/_SUCCESS", "x/.hidden.jpg"]:
        STORE.write_bytes(str(tmp_path / rel), b"0123")
    all_imgs = [e.uri for e in STORE.iter_files(str(tmp_path / "x"), extensions=(".jpg", ".png"))]
    assert [os.path.relpath(u, tmp_path) for u in all_imgs] == ["x/1.jpg", "x/2.PNG", "x/sub/3.jpg"]
    globbed = [e.uri for e in STORE.iter_files(str(tmp_path / "x" / "*.jpg"))]
    assert [os.path.basename(u) for u in globbed] == ["1.jpg"]
    entry = next(STORE.iter_files(str(tmp_path / "x" / "1.jpg")))
    assert entry.size == 4 and entry.fingerprint.startswith("size:4-mtime:")
    assert STORE.list_dirs(str(tmp_path / "x")) == ["sub"]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        STORE.read_bytes(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError):
        list(STORE.iter_files(str(tmp_path / "nothing")))
    with pytest.raises(StorageError, match=r"Unsupported URI scheme 'gs://'"):
        STORE.read_bytes("gs://bucket/x")


def test_s3_round_trip_listing_and_etags(bucket):
    STORE.write_bytes(f"{bucket}/imgs/a.jpg", b"aaa")
    STORE.write_bytes(f"{bucket}/imgs/deep/b.png", b"bbbb")
    STORE.write_bytes(f"{bucket}/other/c.jpg", b"c")
    assert STORE.read_bytes(f"{bucket}/imgs/a.jpg") == b"aaa"
    entries = list(STORE.iter_files(f"{bucket}/imgs/"))
    assert [e.uri for e in entries] == [f"{bucket}/imgs/a.jpg", f"{bucket}/imgs/deep/b.png"]
    assert [e.size for e in entries] == [3, 4]
    assert all(e.fingerprint.startswith("etag:") for e in entries)
    assert [e.uri for e in STORE.iter_files(f"{bucket}/**/*.jpg")] == [
        f"{bucket}/imgs/a.jpg",
        f"{bucket}/other/c.jpg",
    ]
    STORE.move(f"{bucket}/imgs/a.jpg", f"{bucket}/moved/a.jpg")
    assert not STORE.exists(f"{bucket}/imgs/a.jpg") and STORE.read_bytes(f"{bucket}/moved/a.jpg") == b"aaa"
    STORE.remove(f"{bucket}/imgs", recursive=True)
    assert not STORE.exists(f"{bucket}/imgs/deep/b.png")


def test_endpoint_comes_from_config_or_environment(s3_endpoint, monkeypatch):
    assert storage.resolve_endpoint(None) == s3_endpoint
    assert storage.resolve_endpoint("http://other:9000") == "http://other:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.resolve_endpoint(None) is None


def test_a_handle_with_an_endpoint_reads_writes_lists_and_moves_on_s3(bucket, s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the handle knows the S3 server now
    store = Storage(endpoint_url=s3_endpoint)
    store.write_bytes(f"{bucket}/in/a.jpg", b"aaa")
    store.write_json(f"{bucket}/in/sub/card.json", {"arch": "resnet18"})
    assert store.read_bytes(f"{bucket}/in/a.jpg") == b"aaa"
    assert json.loads(store.read_bytes(f"{bucket}/in/sub/card.json")) == {"arch": "resnet18"}
    assert [e.uri for e in store.iter_files(f"{bucket}/in", extensions=(".jpg",))] == [f"{bucket}/in/a.jpg"]
    assert store.list_dirs(f"{bucket}/in") == ["sub"]
    assert store.file_entry(f"{bucket}/in/a.jpg").size == 3
    store.move(f"{bucket}/in/a.jpg", f"{bucket}/out/a.jpg")
    assert not store.exists(f"{bucket}/in/a.jpg") and store.read_bytes(f"{bucket}/out/a.jpg") == b"aaa"
    fs, path = store.pyarrow_filesystem(f"{bucket}/out/a.jpg")
    assert fs.get_file_info(path).size == 3
    store.remove(f"{bucket}/in", recursive=True)
    assert not store.exists(f"{bucket}/in/sub/card.json")


def test_a_handle_pickles_small_and_works_after_unpickling(bucket, s3_endpoint):
    store = Storage(endpoint_url=s3_endpoint)
    store.write_bytes(f"{bucket}/x.bin", b"xyz")  # opens (and caches) this process's filesystem
    data = pickle.dumps(store)
    assert len(data) < 200 and b"S3FileSystem" not in data  # the endpoint only, never a filesystem
    again = pickle.loads(data)
    assert again == store and again.read_bytes(f"{bucket}/x.bin") == b"xyz"


def test_a_handle_works_inside_a_ray_task(bucket, s3_endpoint, ray_local):
    store = Storage(endpoint_url=s3_endpoint)

    @ray_local.remote
    def copy(store: Storage, src: str, dst: str) -> list[str]:
        store.write_bytes(dst, store.read_bytes(src) + b"!")
        return [e.uri for e in store.iter_files(dst)]

    store.write_bytes(f"{bucket}/src.bin", b"abc")
    assert ray_local.get(copy.remote(store, f"{bucket}/src.bin", f"{bucket}/dst.bin")) == [
        f"{bucket}/dst.bin"
    ]
    assert store.read_bytes(f"{bucket}/dst.bin") == b"abc!"


def test_handles_with_one_endpoint_share_the_cached_filesystem(s3_endpoint):
    a, b = Storage(endpoint_url=s3_endpoint), Storage(endpoint_url=s3_endpoint)
    assert a.filesystem("s3://bucket/k")[0] is b.filesystem("s3://other/k")[0]
    assert (
        a.filesystem("s3://bucket/k")[0] is Storage().filesystem("s3://bucket/k")[0]
    )  # same endpoint, from env
    assert (
        a.filesystem("s3://bucket/k")[0]
        is not Storage(endpoint_url="http://other:9000").filesystem("s3://b/k")[0]
    )
    assert a.filesystem("/tmp/x")[0] is b.filesystem("file:///tmp/y")[0]
    with pytest.raises(TypeError):
        Storage(s3_endpoint)  # keyword-only


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
    STORE.write_bytes(str(tmp_path / "ds" / "cat" / "1.png"), b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for root in ["ds", "./ds", "~/ds", "file://ds", "file://" + str(tmp_path / "ds")]:
        assert [e.uri for e in STORE.iter_files(root)] == [str(tmp_path / "ds" / "cat" / "1.png")], root


def test_names_with_glob_characters_are_not_globs(tmp_path):
    """``img[1].png`` is that file, not ``img1.png`` (which the glob ``img[1].png`` matches)."""
    STORE.write_bytes(str(tmp_path / "img1.png"), b"one")
    STORE.write_bytes(str(tmp_path / "img[1].png"), b"bracket")
    STORE.write_bytes(str(tmp_path / "d1" / "a.png"), b"a")
    STORE.write_bytes(str(tmp_path / "d[1]" / "b.png"), b"bb")
    listed = list(STORE.iter_files(str(tmp_path / "img[1].png")))
    assert [(e.uri, e.size) for e in listed] == [(str(tmp_path / "img[1].png"), len(b"bracket"))]
    assert STORE.file_entry(str(tmp_path / "img[1].png")) == listed[0]
    assert [e.uri for e in STORE.iter_files(str(tmp_path / "d[1]"))] == [str(tmp_path / "d[1]" / "b.png")]
    assert [e.uri for e in STORE.iter_files(str(tmp_path / "img?.png"))] == [str(tmp_path / "img1.png")]
    (tmp_path / "img[1].png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img\[1\]\.png"):
        STORE.file_entry(str(tmp_path / "img[1].png"))  # the glob would have found img1.png
    with pytest.raises(FileNotFoundError):
        STORE.file_entry(str(tmp_path / "d1"))  # a folder is not a file


def test_s3_names_with_glob_characters_are_not_globs(bucket):
    STORE.write_bytes(f"{bucket}/p/img1.png", b"one")
    STORE.write_bytes(f"{bucket}/p/img[1].png", b"bracket")
    STORE.write_bytes(f"{bucket}/p[1]/x.png", b"x")
    assert [(e.uri, e.size) for e in STORE.iter_files(f"{bucket}/p/img[1].png")] == [
        (f"{bucket}/p/img[1].png", len(b"bracket"))
    ]
    entry = STORE.file_entry(f"{bucket}/p/img[1].png")
    assert entry.size == len(b"bracket") and entry.fingerprint.startswith("etag:")
    assert entry.fingerprint != STORE.file_entry(f"{bucket}/p/img1.png").fingerprint
    assert [e.uri for e in STORE.iter_files(f"{bucket}/p[1]/")] == [f"{bucket}/p[1]/x.png"]
    assert [e.uri for e in STORE.iter_files(f"{bucket}/p/img?.png")] == [f"{bucket}/p/img1.png"]
