"""What a comparison is asked (:class:`CompareConfig`) and what it found (:class:`CompareResult`).

Typed dataclasses that round-trip to JSON: ``--json`` prints :meth:`CompareResult.summary`, a
report folder's results.json holds :meth:`CompareResult.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from embedsearch.encoders.nn import recipe
from embedsearch.errors import InvalidArgumentError
from embedsearch.results import FLOAT_METRICS

DEFAULT_MODELS = ("ae", "vae", "pixels", "pca")
RECALL_KS = (1, 5, 10)
NEARDUP_KS = (1, 10)


@dataclass
class CompareConfig:
    """Everything that decides a comparison's numbers (the report prints it)."""

    data: str
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    queries: str | None = None
    query_fraction: float = 0.1
    k: int = 10
    seed: int = 0
    train_epochs: int = 10
    # Settings of models the run creates; AE and VAE share all of them, so the contrast is fair.
    arch: str = "conv"
    latent_dim: int = 32
    batch_size: int = 256
    lr: float | None = None  # None: the training default (recipe.DEFAULT_LR), resolved here as below
    lr_schedule: str | None = None  # None: the training default (constant)
    metric: str | None = None  # None: each kind's own default (cosine for AE and VAE, L2 otherwise)
    # Augmentation-consistent training (None: the training defaults, resolved here so the report
    # states what was used).
    augment: list[str] | None = None
    consistency: float | None = None
    temperature: float | None = None
    curve_k: int = 100  # precision@k is drawn for k = 1 .. curve_k
    timing_queries: int = 200
    shown_queries: int = 6
    samples: int = 16

    def __post_init__(self) -> None:
        if not self.models or any(not m for m in self.models):
            raise InvalidArgumentError("name at least one model, e.g. --models ae,vae,pixels,pca")
        if len(set(self.models)) != len(self.models):
            raise InvalidArgumentError(f"a model is named twice in {','.join(self.models)}")
        if not 0 < self.query_fraction < 1:
            raise InvalidArgumentError(f"--query-fraction must be between 0 and 1, not {self.query_fraction}")
        if self.k < 1 or self.train_epochs < 1 or self.latent_dim < 1 or self.curve_k < 1:
            raise InvalidArgumentError("k, train epochs, latent dim and curve k must be at least 1")
        if self.metric is not None and self.metric not in FLOAT_METRICS:  # the hashes' hamming is theirs alone
            raise InvalidArgumentError(f"unknown metric {self.metric!r}; choose one of {', '.join(FLOAT_METRICS)}")
        self.augment = list(recipe.DEFAULT_AUGMENT) if self.augment is None else recipe.parse_augment(self.augment)
        self.lr = recipe.DEFAULT_LR if self.lr is None else self.lr
        self.lr_schedule = recipe.LR_SCHEDULES[0] if self.lr_schedule is None else self.lr_schedule
        if self.consistency is None:
            self.consistency = recipe.DEFAULT_CONSISTENCY if self.augment else 0.0
        if self.temperature is None:
            self.temperature = recipe.DEFAULT_TEMPERATURE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareConfig:
        known = {f.name for f in fields(cls)}
        # A result written before the learning-rate schedule existed was trained at a constant rate.
        values = {"lr_schedule": "constant", **values}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class ModelResult:
    """One model's scores; ``recall`` and ``neardup_recall`` map k to the value.

    ``robustness`` maps each transform of :data:`TRANSFORMS` to ``{"recall@1": x, "recall@10": y}``:
    near-duplicate recall of the queries altered by that transform alone (``mixed``: ``neardup_recall``).
    """

    name: str
    kind: str
    metric: str
    dim: int
    bytes_per_image: int
    precision: float
    map: float
    recall: dict[int, float]
    knn_accuracy: float
    neardup_recall: dict[int, float]
    encode_images_per_s: float
    query_ms_p50: float
    created: bool = False  # made by this run (else an existing library model)
    trained: bool = False  # created and trained on the database part
    train_seconds: float | None = None
    recon_error: float | None = None
    kl: float | None = None
    active_dims: int | None = None
    precision_curve: list[float] = field(default_factory=list)
    robustness: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self, k: int) -> dict[str, Any]:
        """The ``--json`` entry: contract keys first (``@k`` following k), then extras that apply."""
        out: dict[str, Any] = {f"precision@{k}": _r(self.precision), f"map@{k}": _r(self.map)}
        out.update({f"recall@{n}": _r(v) for n, v in sorted(self.recall.items())})
        out["knn_accuracy"] = _r(self.knn_accuracy)
        out.update({f"neardup_recall@{n}": _r(v) for n, v in sorted(self.neardup_recall.items())})
        out.update(
            dim=self.dim,
            encode_images_per_s=round(self.encode_images_per_s, 1),
            query_ms_p50=round(self.query_ms_p50, 4),
            kind=self.kind,
            metric=self.metric,
            bytes_per_image=self.bytes_per_image,
            created=self.created,
            trained=self.trained,
        )
        extras = {
            "train_seconds": self.train_seconds,
            "recon_error": self.recon_error,
            "kl": self.kl,
            "active_dims": self.active_dims,
        }
        out.update({key: _r(v) if isinstance(v, float) else v for key, v in extras.items() if v is not None})
        out["robustness"] = {t: {key: _r(v) for key, v in r.items()} for t, r in self.robustness.items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelResult:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        for key in ("recall", "neardup_recall"):  # JSON object keys are strings
            kept[key] = {int(n): float(v) for n, v in kept.get(key, {}).items()}
        robustness = kept.get("robustness", {})  # results written before the table have none
        kept["robustness"] = {t: {key: float(v) for key, v in r.items()} for t, r in robustness.items()}
        return cls(**kept)


def _r(value: float) -> float:
    return round(float(value), 6)


@dataclass
class CompareResult:
    config: CompareConfig
    data: str
    query_source: str  # "fraction 0.1 of DATA" or the --queries path
    queries: int
    database: int
    labels: list[str]
    models: dict[str, ModelResult]
    seconds: float
    command: str = ""

    @property
    def k(self) -> int:
        return self.config.k

    def summary(self) -> dict[str, Any]:
        """What ``compare --json`` prints, key for key."""
        return {
            "data": self.data,
            "queries": self.queries,
            "database": self.database,
            "k": self.k,
            "models": {name: m.metrics(self.k) for name, m in self.models.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["models"] = {name: m.to_dict() for name, m in self.models.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareResult:
        kept = dict(values)
        kept["config"] = CompareConfig.from_dict(values["config"])
        kept["models"] = {name: ModelResult.from_dict(m) for name, m in values["models"].items()}
        return cls(**kept)
