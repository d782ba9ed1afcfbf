"""`raycv similar`: nearest images by embedding, over real Parquet outputs (local and on the S3 server).

The outputs are written directly: the common columns of raycv's schema plus ``embedding`` as
fixed_size_list<float32, 16> (the column the `embedding` task declares), three clusters of 50 unit vectors
and error rows with a null embedding, spread over three files.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycv.cli import main
from raycv.errors import ConfigError
from raycv.outputs import schema as outputs
from raycv.outputs.similar import Neighbour, nearest
from raycv.storage import Storage, join
from tests._outputs import common

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)
D, CLUSTERS, PER_CLUSTER, ERRORS, FILES = 16, 3, 50, 6, 3
EMBEDDING = pa.field("embedding", pa.list_(pa.float32(), D))


def _schema(embedding: bool = True) -> pa.Schema:
    return pa.schema(outputs.COMMON_FIELDS + ([EMBEDDING] if embedding else []))


def _vectors(rng: np.random.Generator) -> np.ndarray:
    """[CLUSTERS * PER_CLUSTER, D] unit vectors: cluster c's rows are c * PER_CLUSTER onwards."""
    centres = rng.normal(size=(CLUSTERS, D))
    points = np.repeat(centres, PER_CLUSTER, axis=0) + 0.15 * rng.normal(size=(CLUSTERS * PER_CLUSTER, D))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _tables(src: str, embedding: bool = True, scale: float = 1.0) -> tuple[list[pa.Table], dict]:
    """The rows (``scale`` x the unit vectors), shuffled into FILES tables, and what they hold."""
    rng = np.random.default_rng(0)
    vectors = _vectors(rng)
    uris = [os.path.join(src, f"c{i // PER_CLUSTER}_{i % PER_CLUSTER}.png") for i in range(len(vectors))]
    rows = [
        common(u, task="embedding", width=8, height=8, embedding=(scale * v).tolist())
        for u, v in zip(uris, vectors, strict=True)
    ]
    broken = [os.path.join(src, f"broken{i}.png") for i in range(ERRORS)]
    rows += [common(u, task="embedding", status="error", embedding=None) for u in broken]
    order = rng.permutation(len(rows))  # clusters and errors spread over every file
    schema = _schema(embedding)
    tables = [
        pa.Table.from_pylist([{k: rows[i].get(k) for k in schema.names} for i in part], schema=schema)
        for part in np.array_split(order, FILES)
    ]
    return tables, {"uris": uris, "vectors": vectors, "broken": broken}


def _write(out: str, tables: list[pa.Table]) -> None:
    for i, table in enumerate(tables):
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=20)  # several row groups per file
        STORE.write_bytes(join(out, "images", f"part-{i}.parquet"), sink.getvalue())


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb")
    (tmp / "src").mkdir()  # the URIs' folder exists, for the relative spellings (the files need not)
    tables, data = _tables(str(tmp / "src"))
    _write(str(tmp / "out"), tables)
    return {**data, "out": str(tmp / "out"), "src": str(tmp / "src"), "tables": tables}


def _cosine(vectors: np.ndarray, q: int) -> np.ndarray:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return v @ v[q]


def test_nearest_are_the_query_cluster_sorted_with_numpy_scores(emb):
    q = 7  # cluster 0
    found = nearest(emb["out"], STORE, image_id=outputs.image_id_of(emb["uris"][q]), k=5)
    assert len(found) == 5 and all(isinstance(n, Neighbour) for n in found)
    index = {u: i for i, u in enumerate(emb["uris"])}
    rows = [index[n.image_uri] for n in found]
    assert q not in rows  # never its own neighbour
    assert all(r // PER_CLUSTER == 0 for r in rows)
    scores = [n.score for n in found]
    assert scores == sorted(scores, reverse=True)
    cos = _cosine(emb["vectors"], q)
    np.testing.assert_allclose(scores, cos[rows], rtol=1e-5, atol=1e-6)
    cos[q] = -np.inf
    assert sorted(rows) == sorted(np.argsort(-cos)[:5].tolist())  # exactly numpy's top 5
    assert all(n.image_id == outputs.image_id_of(n.image_uri) for n in found)


def test_every_cluster_query_and_error_rows_never_returned(emb):
    for q in (0, PER_CLUSTER + 3, 2 * PER_CLUSTER + 49):
        found = nearest(emb["out"], STORE, image_id=outputs.image_id_of(emb["uris"][q]), k=5)
        index = {u: i for i, u in enumerate(emb["uris"])}
        assert all(index[n.image_uri] // PER_CLUSTER == q // PER_CLUSTER for n in found)
    everyone = nearest(emb["out"], STORE, image_id=outputs.image_id_of(emb["uris"][0]), k=10_000)
    assert len(everyone) == CLUSTERS * PER_CLUSTER - 1  # all other ok rows; no error row, no query
    assert not {n.image_uri for n in everyone} & set(emb["broken"])


def test_tiny_batches_give_the_same_answer(emb):
    qid = outputs.image_id_of(emb["uris"][60])
    small = nearest(emb["out"], STORE, image_id=qid, k=7, batch_rows=3)
    whole = nearest(emb["out"], STORE, image_id=qid, k=7)
    assert [n.image_id for n in small] == [n.image_id for n in whole]
    # float32 dot products may differ in the last bit with the shape of the batch (BLAS blocking)
    np.testing.assert_allclose([n.score for n in small], [n.score for n in whole], rtol=1e-6)
    assert len(nearest(emb["out"], STORE, image_id=qid, k=7, batch_rows=1)) == 7


def test_query_by_uri_in_any_local_spelling(emb, monkeypatch):
    by_id = nearest(emb["out"], STORE, image_id=outputs.image_id_of(emb["uris"][12]), k=5)
    monkeypatch.chdir(emb["src"])
    for spelling in ("./c0_12.png", "file://" + emb["uris"][12], emb["src"] + "//c0_12.png"):
        assert nearest(emb["out"], STORE, image_uri=spelling, k=5) == by_id


def test_rows_that_are_not_unit_length_are_renormalised(tmp_path):
    tables, data = _tables(str(tmp_path / "src"), scale=3.0)  # the ranking and scores must not change
    _write(str(tmp_path / "out"), tables)
    qid = outputs.image_id_of(data["uris"][3])
    found = nearest(str(tmp_path / "out"), STORE, image_id=qid, k=5)
    rows = [data["uris"].index(n.image_uri) for n in found]
    np.testing.assert_allclose([n.score for n in found], _cosine(data["vectors"], 3)[rows], rtol=1e-5)


def test_cli_prints_a_table_and_json(emb, capsys):
    qid = outputs.image_id_of(emb["uris"][100])
    assert main(["similar", emb["out"], "--id", qid, "--k", "3", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [set(d) for d in listed] == [{"image_id", "image_uri", "score"}] * 3
    assert listed == [vars(n) for n in nearest(emb["out"], STORE, image_id=qid, k=3)]
    assert all(emb["uris"].index(d["image_uri"]) // PER_CLUSTER == 2 for d in listed)
    assert main(["similar", emb["out"], "--image", emb["uris"][100], "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "score" in text
    assert all(d["image_id"] in text for d in listed)
    assert f"{listed[0]['score']:.4f}" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--id", "nope"], "image_id: got 'nope'. No row of"),
        (["--image", "/nowhere/x.png"], "image_uri: got '/nowhere/x.png'. No row of"),
        (["--id", "QID", "--k", "0"], "k: got 0. Ask for at least one neighbour"),
        (["--id", "BROKEN"], "has no embedding (its annotation failed"),
    ],
)
def test_cli_bad_queries_exit_2_with_the_reason(emb, capsys, argv, message):
    ids = {"QID": outputs.image_id_of(emb["uris"][0]), "BROKEN": outputs.image_id_of(emb["broken"][0])}
    assert main(["similar", emb["out"], *[ids.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_output_without_embeddings_says_to_annotate_with_the_embedding_task(tmp_path, capsys):
    tables, data = _tables(str(tmp_path / "src"), embedding=False)
    _write(str(tmp_path / "out"), tables)
    assert main(["similar", str(tmp_path / "out"), "--id", outputs.image_id_of(data["uris"][0])]) == 2
    err = capsys.readouterr().err
    assert "no `embedding` column" in err and "task: embedding" in err
    with pytest.raises(ConfigError, match="task: embedding"):
        nearest(str(tmp_path / "out"), STORE, image_id="x")


def test_files_with_different_dimensions_exit_2(emb, tmp_path, capsys):
    other = pa.schema([*outputs.COMMON_FIELDS, pa.field("embedding", pa.list_(pa.float32(), 8))])
    row = common(str(tmp_path / "other.png"), task="embedding", embedding=[0.5] * 8)
    odd = pa.Table.from_pylist([{k: row.get(k) for k in other.names}], schema=other)
    _write(str(tmp_path / "out"), [*emb["tables"], odd])
    assert main(["similar", str(tmp_path / "out"), "--id", outputs.image_id_of(emb["uris"][0])]) == 2
    assert "disagree on the `embedding` column" in capsys.readouterr().err


def test_cli_needs_exactly_one_query(emb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["similar", emb["out"], "--id", "a", "--image", "b"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exactly one"):
        nearest(emb["out"], STORE, k=3)


def test_nearest_over_the_s3_server(emb, bucket):
    out = f"{bucket}/emb"
    _write(out, emb["tables"])
    qid = outputs.image_id_of(emb["uris"][140])
    found = nearest(out, STORE, image_id=qid, k=5)
    assert found == nearest(emb["out"], STORE, image_id=qid, k=5)
    assert all(n.image_uri.startswith(emb["src"] + "/c2_") for n in found)
