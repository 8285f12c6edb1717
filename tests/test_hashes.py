"""The hashing baselines: phash and dhash as binary codes, searched by Hamming distance."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import update

from embedsearch.cli.main import main
from embedsearch.core.schema import IndexEntry
from embedsearch.core.vectors import VectorIndex
from embedsearch.data.images import InputSpec, decode_bytes, decode_file
from embedsearch.encoders.base import BinaryEncoder, encoder_class
from embedsearch.encoders.hashes import HashOptions
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError, ModelError
from embedsearch.evaluation.compare import run_compare
from embedsearch.evaluation.scores import CompareConfig
from helpers import noise_image, png_bytes

SPEC = InputSpec(32, 3)
MAX_PIXELS = 10**7


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between packed codes, broadcasting over leading axes."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


def jpeg_copy(path: Path, quality: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, "JPEG", quality=quality)
    return decode_bytes(buf.getvalue(), SPEC, "copy.jpg", MAX_PIXELS)[1]


def make_encoder(kind: str, hash_size: int = 8) -> BinaryEncoder:
    encoder = encoder_class(kind).fit(np.zeros((0, *SPEC.shape), np.uint8), SPEC, HashOptions(hash_size), Path("."))
    assert isinstance(encoder, BinaryEncoder)
    return encoder


# -- the codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "most", "mean"), [("phash", 8, 2.0), ("dhash", 12, 4.0)])
def test_a_jpeg_copy_hashes_close_to_its_original_and_far_from_others(
    shapes_master: Path, kind: str, most: int, mean: float
) -> None:
    files = sorted(shapes_master.rglob("*.png"))
    originals = np.stack([decode_file(str(f), SPEC, MAX_PIXELS)[1] for f in files])
    encoder = make_encoder(kind)
    codes = encoder.encode(originals)
    copies = encoder.encode(np.stack([jpeg_copy(f) for f in files]))
    assert codes.dtype == np.uint8 and codes.shape == (len(files), 8) and encoder.dim == 64

    own = hamming(codes, copies)  # (N,) bits between each image and its own JPEG copy
    assert own.max() <= most and own.mean() <= mean
    cross = hamming(copies[:, None], codes[None])  # (N, N): copy i against original j
    np.fill_diagonal(cross, 10**6)
    assert (own < cross.min(axis=1)).all(), "a JPEG copy is nearer to another image than to its original"
    noise = encoder.encode(decode_bytes(png_bytes(noise_image(5, 32)), SPEC, "noise.png", MAX_PIXELS)[1][None])
    assert hamming(codes, noise).min() >= 12  # an unrelated picture is far from every shape


def test_hash_size_sets_the_bits_and_codes_are_deterministic(shapes_master: Path) -> None:
    image = decode_file(str(next(shapes_master.rglob("*.png"))), SPEC, MAX_PIXELS)[1][None]
    big = make_encoder("phash", 16)
    assert big.dim == 256 and big.code_bytes == 32 and big.encode(image).shape == (1, 32)
    odd = make_encoder("dhash", 3)  # 9 bits, padded with zero bits to two bytes
    assert odd.dim == 16 and odd.encode(image)[0, 1] & 0x7F == 0
    assert np.array_equal(make_encoder("phash").encode(image), make_encoder("phash").encode(image))
    with pytest.raises(InvalidArgumentError, match="--hash-size must be between 2 and 32"):
        make_encoder("phash", 1)


def test_binary_search_is_exact_hamming_with_ids_and_exclusions() -> None:
    rng = np.random.default_rng(0)
    base, queries = rng.integers(0, 256, (200, 8), dtype=np.uint8), rng.integers(0, 256, (5, 8), dtype=np.uint8)
    index = VectorIndex(64, "hamming")
    ids = np.arange(1000, 1200, dtype=np.int64)
    index.add(ids, base)
    dist, found = index.search(queries, 10, exclude={1000, 1001})
    brute = hamming(queries[:, None], base[None]).astype(np.float64)  # (5, 200)
    brute[:, :2] = np.inf
    assert np.array_equal(dist, np.sort(brute, axis=1)[:, :10])  # distances are bit counts
    assert np.array_equal(brute[np.arange(5)[:, None], found - 1000], dist)
    with pytest.raises(InvalidArgumentError, match="uint8 bytes"):
        index.search(queries.astype(np.float32) + 0.5, 3)


# -- the library ------------------------------------------------------------------------------------


def test_index_query_remove_reload_round_trip(home: Path, shapes: Path) -> None:
    probe = sorted((shapes / "triangle").iterdir())[0]
    with Engine(home) as engine:
        report = engine.index(str(shapes), "phash", workers=0)  # made on first use, like pixels
        assert report.added == 48
        info = {m.name: m for m in engine.models()}["phash"]
        assert (info.kind, info.dim, info.metric, info.vectors) == ("phash", 64, "hamming", 48)
        assert info.config["code"] == {"dtype": "uint8", "bits": 64, "bytes": 8, "packing": "numpy.packbits"}
        (result,) = engine.query([str(probe)], "phash", k=5)
        assert result.results[0].path == str(probe) and result.results[0].distance == 0.0
        assert all(float(n.distance).is_integer() for n in result.results)
        image_id = result.results[0].id
        assert engine.search_image(image_id, "phash", k=1)[0].id == image_id  # from the stored bytes
        assert engine.remove([str(shapes / "triangle")]) == 6
        assert len(engine.vector_index("phash")) == 42
        before = engine.vector_index("phash").vectors()

    path = home / "indexes" / "phash.faiss"
    assert isinstance(faiss.deserialize_index_binary(np.fromfile(path, dtype=np.uint8)), faiss.IndexBinaryIDMap2)
    with Engine(home) as engine:
        row = engine.model("phash")
        loaded = VectorIndex.load(path, row.dim, row.metric)
        assert loaded.problem is None and len(loaded) == 42  # the file itself, not a rebuild
        assert {i: v.tobytes() for i, v in loaded.vectors().items()} == {i: v.tobytes() for i, v in before.items()}
        assert engine.vector_index("phash").vectors().keys() == before.keys()
        (again,) = engine.query([str(sorted((shapes / "circle").iterdir())[0])], "phash", k=42)
        assert len(again.results) == 42 and "triangle" not in {n.label for n in again.results}
        assert engine.check().ok

    path.unlink()  # the file is a cache: a rebuild from the database gives exactly the same codes
    with Engine(home) as engine:
        rebuilt = engine.vector_index("phash").vectors()
        assert {i: v.tobytes() for i, v in rebuilt.items()} == {i: v.tobytes() for i, v in before.items()}


def test_an_index_file_of_the_other_kind_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "m.faiss"
    floats = VectorIndex(64, "l2")
    floats.add(np.arange(3), np.ones((3, 64), np.float32))
    floats.save(path)
    loaded = VectorIndex.load(path, 64, "hamming")
    assert loaded.problem and "unreadable" in loaded.problem and len(loaded) == 0
    bits = VectorIndex(64, "hamming")
    bits.add(np.arange(3), np.ones((3, 8), np.uint8))
    bits.save(path)
    assert VectorIndex.load(path, 64, "l2").problem
    assert VectorIndex.load(path, 128, "hamming").problem == "does not match its model's dimension or kind"
    back = VectorIndex.load(path, 64, "hamming")
    assert back.problem is None and np.array_equal(back.reconstruct(2), np.ones(8, np.uint8))


def test_check_finds_a_damaged_binary_vector(home: Path, shapes: Path) -> None:
    with Engine(home) as engine:
        engine.index(str(shapes), "dhash", workers=0)
        row = engine.model("dhash")
        victim = engine.store.entry_image_ids(row.id)[0]
        original = dict(engine.store.entry_vectors(row.id, [victim]))[victim]
        assert len(original) == 8
        with engine.store.session() as s:  # float32-sized: 32 bytes are wrong for a code of 64 bits
            s.execute(
                update(IndexEntry)
                .where(IndexEntry.model_id == row.id, IndexEntry.image_id == victim)
                .values(vector=b"\0" * 32)
            )
        report = engine.check()
        assert not report.ok and report.models["dhash"].bad_vectors == 1
        repaired = engine.check(repair=True)
        assert repaired.ok and repaired.models["dhash"].entries == 48
        assert dict(engine.store.entry_vectors(row.id, [victim]))[victim] == original


# -- metrics ----------------------------------------------------------------------------------------


def test_metrics_are_refused_where_they_do_not_apply(engine: Engine, shapes: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="codes are bits, compared by hamming distance; leave --metric out"):
        engine.create_model("p", "phash", str(shapes), metric="l2")
    with pytest.raises(InvalidArgumentError, match=r"--metric hamming is for binary codes \(phash, dhash\)"):
        engine.create_model("q", "pca", str(shapes), metric="hamming")
    with pytest.raises(InvalidArgumentError, match="leave --metric out"):
        engine.index(str(shapes), "dhash", metric="cosine")
    assert engine.models() == []
    info = engine.create_model("ph", "phash", str(shapes), metric="hamming")
    assert info.metric == "hamming" and encoder_class("pixels").choose_metric(None) == "l2"
    with pytest.raises(InvalidArgumentError, match="choose one of l2, cosine"):
        CompareConfig(data="x", metric="hamming")


def test_cli_train_index_query_models_and_refusals(home: Path, shapes: Path) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    code, out, err = run("train", str(shapes), "--model", "dhash", "--hash-size", "16")
    assert code == 0, err
    assert "256-d, hamming" in out
    code, out, err = run("index", str(shapes), "--model", "dhash", "--json")
    assert code == 0 and json.loads(out)["added"] == 48
    probe = sorted((shapes / "ring").iterdir())[0]
    code, out, err = run("query", str(probe), "--model", "dhash", "-k", "3", "--json")
    hits = json.loads(out)["results"]
    assert code == 0 and hits[0]["distance"] == 0 and hits[0]["label"] == "ring"
    code, out, _ = run("models", "--json")
    assert [(m["kind"], m["dim"], m["metric"]) for m in json.loads(out)] == [("dhash", 256, "hamming")]
    assert run("check")[0] == 0
    code, _, err = run("train", str(shapes), "--model", "phash", "--metric", "cosine")
    assert code == 1 and "leave --metric out" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("train", str(shapes), "--model", "pca", "--hash-size", "8")
    assert code == 1 and "hash_size do not apply" in err


def test_without_imagehash_one_line_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, home: Path, shapes: Path
) -> None:
    monkeypatch.setitem(sys.modules, "imagehash", None)  # import fails as if it were not installed
    result = CliRunner().invoke(main, ["--home", str(home), "index", str(shapes), "--model", "phash"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()  # an info line may say what was being made
    assert (
        lines[-1] == "Error: the phash and dhash models need the imagehash library: pip install 'embedsearch[hashes]'"
    )
    assert sum("Error" in line for line in lines) == 1
    with pytest.raises(ModelError, match=r"embedsearch\[hashes\]"):
        make_encoder("dhash")


# -- compare ----------------------------------------------------------------------------------------


def test_compare_scores_hashes_with_the_same_code_paths(tmp_path: Path, shapes: Path) -> None:
    config = CompareConfig(data=str(shapes), models=["pixels", "phash", "dhash"], query_fraction=0.25, k=5)
    with Engine(tmp_path / "home", create=True) as engine:
        outcome, _ = run_compare(engine, config)
    summary = outcome.summary()["models"]
    for kind in ("phash", "dhash"):
        m = summary[kind]
        assert (m["kind"], m["metric"], m["dim"], m["bytes_per_image"]) == (kind, "hamming", 64, 8)
        assert 0.0 < m["precision@5"] <= 1.0 and 0.0 <= m["neardup_recall@1"] <= m["neardup_recall@10"] <= 1.0
        assert m["created"] and not m["trained"] and "recon_error" not in m
    assert summary["pixels"]["metric"] == "l2" and summary["pixels"]["bytes_per_image"] == 32 * 32 * 3 * 4
