"""Index types of a model: exact ``flat`` and FAISS's approximate ``hnsw``, ``ivf`` and ``ivfpq``.

Every type is built with ``faiss.index_factory`` and wrapped in an ``IndexIDMap2``, so the ids
FAISS returns are image ids whatever the type. This module holds what is specific to the types:
the spec recorded for a model (type, parameters, measured recall), the ``auto`` choice, the
factory strings, training on a seeded sample and tuning the search parameter to a target recall.

The rules follow autofaiss's: exact search is cheap below ~100k vectors; HNSW is the fastest
approximate index but costs ``4 d + 8 M`` bytes per vector, so it is chosen while that fits the
memory budget; beyond, IVF-PQ with an exact re-ranking of its candidates (``IndexRefineFlat``).
IVF's number of lists is a power of two near ``4 sqrt(n)``, with at least 39 training points per list.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from embedsearch.core import knn
from embedsearch.errors import InvalidArgumentError

TYPES: tuple[str, ...] = ("flat", "hnsw", "ivf", "ivfpq")
#: Below this many vectors ``auto`` keeps the exact index: a flat scan is about as fast.
FLAT_BELOW = 100_000
DEFAULT_M = 32
#: HNSW cannot remove vectors: removed ones are masked, and past this share the index is rebuilt.
MASK_REBUILD_FRACTION = 0.2
#: Parameters that only change how the index is searched (tuned; a file built otherwise still serves).
SEARCH_KEYS = frozenset({"efSearch", "nprobe", "k_factor"})
_EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_K_FACTORS = (4, 16)
_MAX_TRAIN = 262_144
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass
class IndexSpec:
    """What a model's index is: its type, the parameters it was built and is searched with, and the
    10-recall@10 measured when it was tuned (None: not measured; flat is exact)."""

    type: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)
    recall: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IndexSpec:
        if not data:
            return cls()
        return cls(str(data.get("type", "flat")), dict(data.get("params") or {}), data.get("recall"))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "params": dict(self.params), "recall": self.recall}

    @property
    def approximate(self) -> bool:
        return self.type != "flat"

    def build_key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """What a file must match to serve this spec (search parameters are applied after loading)."""
        return self.type, tuple(sorted((k, v) for k, v in self.params.items() if k not in SEARCH_KEYS))


def check_type(kind: str, metric: str) -> str:
    if kind != "auto" and kind not in TYPES:
        raise InvalidArgumentError(f"unknown index type {kind!r}; choose one of auto, {', '.join(TYPES)}")
    if knn.is_binary(metric) and kind not in ("flat", "auto"):
        raise InvalidArgumentError(
            f"a {metric} model (binary codes, e.g. phash/dhash) keeps a flat index; {kind} is for float vectors"
        )
    return kind


def parse_memory(text: str | int | None) -> int | None:
    """``4G``, ``512M``, ``1.5GB``, ``2GiB`` or a number of bytes -> bytes."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise InvalidArgumentError(f"memory {text!r} is not a size; write it like 4G, 512M or 1.5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def default_memory() -> int:
    """Half of the machine's memory: the budget of ``auto`` when none is given."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: a power of two near 4 sqrt(n), with >= 39 vectors per list."""
    target = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(target, n // 39, 65_536)))


def pq_m_for(dim: int) -> int:
    """Sub-quantizers of PQ: the largest divisor of ``dim`` up to dim/2 and 64 (2+ dims each)."""
    return max([m for m in range(1, min(64, max(dim // 2, 1)) + 1) if dim % m == 0])


#: Bytes per vector of the id map (IndexIDMap2: the id, and its entry in the reverse hash map).
_ID_BYTES = 56


def estimate_bytes(kind: str, n: int, dim: int, params: dict[str, Any] | None = None) -> int:
    """Memory an index of ``n`` vectors needs (vectors, links, codes, ids), roughly."""
    params = params or {}
    per = 4 * dim + _ID_BYTES
    if kind == "hnsw":
        m = int(params.get("M", DEFAULT_M))
        # 2M int32 links on level 0, ~M/(M-1) more above, an offset and a level per vector.
        return (per + 4 * (2 * m + m // max(m - 1, 1)) + 12) * n
    if kind in ("ivf", "ivfpq"):
        centroids = 4 * dim * int(params.get("nlist", nlist_for(n)))
        if kind == "ivfpq":
            per += int(params.get("m", pq_m_for(dim)))  # the PQ code; the refine stage keeps the vector too
        return (per + 8) * n + centroids  # + the position in its inverted list
    return per * n


def choose(n: int, dim: int, memory: int) -> str:
    """The ``auto`` index type for ``n`` vectors of ``dim`` within ``memory`` bytes (a pure rule)."""
    if n < FLAT_BELOW:
        return "flat"
    if estimate_bytes("hnsw", n, dim) <= memory:
        return "hnsw"
    return "ivfpq"


def default_params(kind: str, n: int, dim: int) -> dict[str, Any]:
    if kind == "hnsw":
        return {"M": DEFAULT_M, "efSearch": 64}
    if kind == "ivf":
        return {"nlist": nlist_for(n), "nprobe": 8}
    if kind == "ivfpq":
        return {"nlist": nlist_for(n), "m": pq_m_for(dim), "nbits": 8, "nprobe": 8, "k_factor": _K_FACTORS[0]}
    return {}


def fitted(spec: IndexSpec, n_train: int) -> dict[str, Any]:
    """The spec's parameters, shrunk where ``n_train`` vectors cannot train them (a small library)."""
    params = dict(spec.params)
    if "nlist" in params:
        params["nlist"] = int(max(1, min(int(params["nlist"]), n_train // 39 or 1, max(n_train, 1))))
    if "nbits" in params:
        # k-means of each sub-quantizer wants 39 points per centroid (FAISS warns below that).
        params["nbits"] = int(max(1, min(int(params["nbits"]), int(math.log2(max(n_train // 39, 2))))))
    return params


def factory_string(kind: str, params: dict[str, Any]) -> str:
    if kind == "hnsw":
        return f"HNSW{int(params.get('M', DEFAULT_M))}"
    if kind == "ivf":
        return f"IVF{int(params['nlist'])},Flat"
    if kind == "ivfpq":
        return f"IVF{int(params['nlist'])},PQ{int(params['m'])}x{int(params['nbits'])},RFlat"
    raise InvalidArgumentError(f"no factory string for index type {kind!r}")


def new_index(spec: IndexSpec, dim: int, metric: str, n_train: int = 0) -> Any:
    """An empty IndexIDMap2 of the spec's type (parameters fitted to ``n_train`` training vectors)."""
    if not spec.approximate:
        return knn.id_index(dim, metric)
    params = fitted(spec, n_train)
    inner = faiss.index_factory(dim, factory_string(spec.type, params), knn.faiss_metric(metric))
    return faiss.IndexIDMap2(inner)


def train(spec: IndexSpec, dim: int, metric: str, vectors: np.ndarray, seed: int = 0) -> Any:
    """A new, trained index for prepared ``vectors`` (trained on a seeded sample of them)."""
    index = new_index(spec, dim, metric, len(vectors))
    if not index.is_trained:
        size = min(len(vectors), _MAX_TRAIN)
        pick = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
        index.train(np.ascontiguousarray(vectors[pick]))
    after_training(index, spec)
    return index


def after_training(index: Any, spec: IndexSpec) -> None:
    """Make a trained or loaded index ready: IVF-Flat keeps a direct map (reconstruct by position)."""
    if spec.type == "ivf":
        faiss.extract_index_ivf(index.index).make_direct_map(True)


def search_params(index: Any, spec: IndexSpec, sel: Any) -> Any:
    """The SearchParameters of the spec's type (each FAISS type wants its own class), with ``sel``.

    SWIG does not own what a parameter object points to: each keeps its parts alive in ``keep``.
    """
    f: Any = faiss  # the stubs lack SWIG's keyword constructors and some classes
    p = spec.params
    if spec.type == "hnsw":
        out = f.SearchParametersHNSW(efSearch=int(p.get("efSearch", 64)))
    elif spec.type == "ivf":
        out = f.SearchParametersIVF(nprobe=int(p.get("nprobe", 8)))
    elif spec.type == "ivfpq":
        base = f.SearchParametersIVF(nprobe=int(p.get("nprobe", 8)))
        out = f.IndexRefineSearchParameters(k_factor=float(p.get("k_factor", 4)), base_index_params=base)
        out.keep = [base, sel]
        if sel is not None:
            # The id map translates a selector for the refine stage only; the IVF stage needs it too.
            base.sel = f.IDSelectorTranslated(index.id_map, sel)
            out.keep.append(base.sel)
        return out
    elif sel is None:
        return None
    else:
        out = f.SearchParameters()
    if sel is not None:
        out.sel = sel
        out.keep = sel
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """k-recall@k: the share of the exact k nearest that were found, over all queries."""
    if not truth.size:
        return 1.0
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)


def candidates(spec: IndexSpec) -> list[dict[str, Any]]:
    """Search settings to try, cheapest first."""
    if spec.type == "hnsw":
        return [{"efSearch": ef} for ef in _EF_GRID]
    nlist = int(spec.params.get("nlist", 1))
    probes = [2**i for i in range(int(math.log2(nlist)) + 1)] + ([nlist] if nlist & (nlist - 1) else [])
    if spec.type == "ivf":
        return [{"nprobe": p} for p in probes]
    return [{"nprobe": p, "k_factor": kf} for kf in _K_FACTORS for p in probes]


def tune(spec: IndexSpec, measure: Callable[[IndexSpec], float], target: float) -> IndexSpec:
    """The spec with the cheapest search setting whose measured recall reaches ``target``
    (or the best one measured), and that recall."""
    best: IndexSpec | None = None
    for setting in candidates(spec):
        trial = IndexSpec(spec.type, {**spec.params, **setting})
        trial.recall = round(measure(trial), 4)
        if best is None or trial.recall > (best.recall or 0.0):
            best = trial
        if trial.recall >= target:
            return trial
    return best or spec
