"""The result types every layer shares: what the Engine returns and the faces render.

At the bottom of the package: it imports nothing from embedsearch, so any module may use it.
Each type is a plain dataclass; ``dataclasses.asdict`` gives its JSON form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The distances of float vectors: Euclidean, or 1 - cosine similarity.
FLOAT_METRICS: tuple[str, ...] = ("l2", "cosine")
#: The distance of binary codes (perceptual hashes): the number of bits that differ.
BINARY_METRICS: tuple[str, ...] = ("hamming",)
#: Every distance a model's index can use.
METRICS: tuple[str, ...] = FLOAT_METRICS + BINARY_METRICS


@dataclass
class Neighbour:
    rank: int
    id: int
    path: str | None
    label: str | None
    distance: float


#: A query whose novelty ranks above this percentile of its model's indexed images is out of distribution.
OOD_PERCENTILE = 99.0
OOD_WARNING = "this image is unlike what the model was trained on: results may be meaningless"


def ood_warning(percentile: float | None) -> str | None:
    """The out-of-distribution warning for a query at ``percentile``, or None (in distribution, or unknown)."""
    return OOD_WARNING if percentile is not None and percentile > OOD_PERCENTILE else None


@dataclass
class QueryResult:
    query: str
    model: str
    results: list[Neighbour]
    #: The query's novelty (AE reconstruction loss, VAE negative ELBO) as a percentile (0-100) of its
    #: model's indexed images'; None for kinds without one or a model with no stored values.
    ood_percentile: float | None = None

    @property
    def warning(self) -> str | None:
        return ood_warning(self.ood_percentile)


@dataclass
class ModelSummary:
    """What a model is, as listed (``models``, ``/api/models``): no files, no training settings."""

    name: str
    kind: str
    dim: int
    metric: str
    image_size: int
    channels: int
    vectors: int
    created_at: str
    fit: str = "pad"  # the resize policy (embedsearch.data.resize.FITS)
    #: The index: {"type": flat|hnsw|ivf|ivfpq, "params": {...}, "recall": measured 10-recall@10}.
    index: dict[str, Any] = field(default_factory=lambda: {"type": "flat", "params": {}, "recall": 1.0})


@dataclass
class ModelInfo(ModelSummary):
    """A model's summary with its weights file and config.json contents."""

    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LibraryInfo:
    home: str
    database: str
    images: int
    models: list[ModelInfo]
    disk_bytes: dict[str, int]


@dataclass
class ImageRecord:
    """An image's metadata. The HTTP API's ``ImageOut`` is made from these fields (``path`` becomes
    ``name`` and ``url`` there), so a field added here appears in ``/api/images/{id}`` too."""

    id: int
    path: str | None
    sha256: str
    width: int
    height: int
    format: str
    label: str | None
    bytes: int
    added_at: str
    generated: bool
    provenance: dict[str, Any] | None
    models: list[str]


@dataclass
class Added:
    id: int
    created: bool  # False: the same bytes were stored already
    sha256: str


@dataclass(frozen=True)
class Thumbnail:
    """A small picture of an image, and which content it shows (``sha256``: the stored bytes it was made from)."""

    data: bytes
    media_type: str
    sha256: str
    size: int  # the size asked for: the longer side is at most this

    @property
    def etag(self) -> str:
        return self.etag_of(self.sha256, self.size)

    @staticmethod
    def etag_of(sha256: str, size: int) -> str:
        """The HTTP entity tag of the thumbnail of ``sha256`` at ``size``: it names the content."""
        return f'"{sha256}-{size}"'


@dataclass
class IndexReport:
    """What a bulk run did. ``failed`` lists (path, reason) for every file that was skipped;
    ``skipped_endings`` counts, by ending, the image files of formats that cannot be read here;
    ``missing`` the indexed files under the folder that are no longer on disk (``pruned``: how many
    of their images the run forgot, with ``prune=True``)."""

    model: str
    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    skipped_endings: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    pruned: int = 0

    @property
    def images_per_second(self) -> float:
        return self.scanned / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "scanned": self.scanned,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "skipped_endings": dict(self.skipped_endings),
            "missing": list(self.missing),
            "pruned": self.pruned,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
        }


@dataclass
class ModelCheck:
    entries: int = 0
    vectors_in_file: int = 0
    missing_from_file: int = 0
    orphans_in_file: int = 0
    stale_in_file: int = 0
    bad_vectors: int = 0
    checkpoint: str = "ok"


@dataclass
class CheckReport:
    ok: bool = True
    models: dict[str, ModelCheck] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)  # check --repair --dry-run: what repair would do
    notes: list[str] = field(default_factory=list)  # not inconsistencies: e.g. user files moved away

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def to_dict(self) -> dict[str, Any]:

        return asdict(self)


@dataclass
class ReindexResult:
    """What ``reindex`` built: the type (and whether ``auto`` chose it), its parameters, the
    10-recall@10 measured on held-out stored vectors (None: too few to measure), and the sizes."""

    model: str
    type: str
    params: dict[str, Any]
    recall: float | None
    vectors: int
    chosen_by: str  # "auto" or "user"
    memory_budget: int | None = None
    estimated_bytes: int = 0
    queries: int = 0
    target_recall: float = 0.95
    seconds: float = 0.0
    shards: int = 1  # the jobs the bulk of an IVF index was added in (1: one process)
