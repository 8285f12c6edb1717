"""Sharded building of the IVF types (issue 15.5): train once, add shards in parallel, merge the
inverted lists; the result is the index one process builds from the same vectors, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch.cli.main import main
from embedsearch.core import ann, shards
from embedsearch.core.ann import IndexSpec
from embedsearch.engine import Engine
from helpers import vector_library

N, DIM = 6000, 16


def vectors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, DIM) seeded vectors and shuffled image ids that are not positions."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, DIM)).astype(np.float32), rng.permutation(np.arange(10, 10 + 7 * N, 7))


def trained(kind: str, x: np.ndarray) -> object:
    spec = IndexSpec(kind, ann.fitted(IndexSpec(kind, ann.default_params(kind, N, DIM)), N))
    return ann.train(spec, DIM, "l2", x, seed=3)


@pytest.mark.no_store
@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_a_sharded_add_builds_the_same_index_as_one_add(kind: str) -> None:
    x, ids = vectors()
    empty = trained(kind, x)
    for count in (2, 3, 7):
        one, sharded = faiss.clone_index(empty), faiss.clone_index(empty)
        for index in (one, sharded):  # an index that holds vectors already: shards go after them
            index.add_with_ids(x[:500], ids[:500])
        one.add_with_ids(x[500:], ids[500:])
        shards.add_sharded(sharded, ids[500:], x[500:], count)
        assert sharded.ntotal == one.ntotal == N
        assert bytes(faiss.serialize_index(sharded)) == bytes(faiss.serialize_index(one)), count
        _, found = sharded.search(x[:20], 5)
        assert found[:, 0].tolist() == ids[:20].tolist()  # each vector finds itself, by its image id


@pytest.mark.no_store
def test_a_custom_runner_gets_every_shard_once_and_its_results_are_merged_in_order() -> None:
    x, ids = vectors(1)
    empty = trained("ivf", x)
    one, sharded = faiss.clone_index(empty), faiss.clone_index(empty)
    seen: list[int] = []

    def backwards(jobs: list[shards.Job]) -> list[bytes]:  # runs the jobs out of order, as a cluster may
        seen.extend(len(job[1]) for job in jobs)
        return [shards.add_shard(job) for job in reversed(jobs)][::-1]

    one.add_with_ids(x, ids)
    shards.add_sharded(sharded, ids, x, 4, backwards)
    assert sum(seen) == N and len(seen) == 4
    assert bytes(faiss.serialize_index(sharded)) == bytes(faiss.serialize_index(one))


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_reindex_in_shards_equals_reindex_in_one_process(tmp_path: Path, kind: str, new_database) -> None:  # type: ignore[no-untyped-def]
    found, stored = {}, {}
    for count in (1, 3):
        with Engine(tmp_path / f"home-{count}", db=new_database()) as engine:
            x = vector_library(engine, 3000, dim=DIM, seed=5)
            result = engine.reindex("vecs", index=kind, shards=count, seed=2)
            assert result.shards == count and result.type == kind
            found[count] = [[n.id for n in row] for row in engine.search_vectors(x[:30], "vecs", k=5)]
            stored[count] = engine.vector_index("vecs").vectors()
            params = result.params
    assert found[3] == found[1] and params
    assert stored[3].keys() == stored[1].keys()
    assert all(np.array_equal(stored[3][i], stored[1][i]) for i in stored[1])


def test_reindex_shards_on_the_command_line_and_hnsw_builds_in_one_process(engine: Engine) -> None:
    vector_library(engine, 1500, dim=DIM)
    home = str(engine.home)
    engine.close()
    out = CliRunner().invoke(main, ["--home", home, "reindex", "--model", "vecs", "--index", "ivf", "--shards", "2"])
    assert out.exit_code == 0 and "added in 2 shards" in out.output, out.output
    out = CliRunner().invoke(
        main, ["--home", home, "reindex", "--model", "vecs", "--index", "hnsw", "--shards", "2", "--json"]
    )
    assert out.exit_code == 0 and json.loads(out.stdout)["shards"] == 1, out.output
    out = CliRunner().invoke(main, ["--home", home, "reindex", "--model", "vecs", "--shards", "0"])
    assert out.exit_code == 2 and "--shards" in out.output
