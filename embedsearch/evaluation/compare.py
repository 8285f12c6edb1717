"""The comparison run: AE, VAE and baselines trained and scored on the same labelled data.

One run loads DATA once, splits it (or takes ``queries``) into queries and a database, makes every
named model that does not exist yet from the database part with identical settings, and scores each
model with :mod:`embedsearch.evaluation.metrics` on exact in-memory FAISS search. Results are typed
dataclasses that round-trip to JSON; the pictures the report draws travel separately in
:class:`Artifacts` so that the JSON stays small.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsearch.data.datasets import Dataset, data_spec, idx_labels_path, idx_to_spec, is_idx, load_dataset
from embedsearch.data.idx import read_idx_pair
from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import REGISTRY, DecodingEncoder, Encoder, PosteriorEncoder, encoder_class
from embedsearch.errors import DataError, UnknownModelError
from embedsearch.evaluation import metrics as ev
from embedsearch.evaluation.scores import NEARDUP_KS, RECALL_KS, CompareConfig, CompareResult, ModelResult
from embedsearch.evaluation.transforms import TRANSFORMS

log = logging.getLogger(__name__)

TOP_SHOWN = 8  # results per model in the report's query grid


@dataclass
class Artifacts:
    """What the report draws besides numbers; in memory only. Images are at the data's spec."""

    label_names: list[str]
    db_images: np.ndarray
    query_images: np.ndarray
    db_labels: np.ndarray
    query_labels: np.ndarray
    shown: np.ndarray  # query rows whose top results the report shows
    kinds: dict[str, str] = field(default_factory=dict)
    top: dict[str, np.ndarray] = field(default_factory=dict)  # model -> (len(shown), TOP_SHOWN) rows
    latents: dict[str, np.ndarray] = field(default_factory=dict)  # AE/VAE model -> query vectors
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # AE/VAE model -> generated images
    prior_samples: set[str] = field(default_factory=set)  # models whose samples are from their prior (VAE)


# -- data -------------------------------------------------------------------------------------------


@dataclass
class View:
    """The comparison's images decoded at one input spec (models with other specs get their own)."""

    db: np.ndarray
    queries: np.ndarray
    altered: dict[str, np.ndarray] = field(default_factory=dict)  # transform -> altered queries, made on first use


class Data:
    """Queries and database with integer labels; ``exclude`` holds identical (query, db) pairs."""

    def __init__(self, config: CompareConfig, max_pixels: int) -> None:
        self.config, self.max_pixels = config, max_pixels
        self.spec, main = self._load_main(config.data)
        # Rows of DATA taken as queries and as database; None: all of it (queries come from elsewhere).
        self.q_rows: np.ndarray | None
        self.db_rows: np.ndarray | None
        if config.queries is None:
            n_q = round(len(main) * config.query_fraction)
            if not 1 <= n_q < len(main):
                raise DataError(
                    f"{config.data}: {len(main)} images cannot be split by --query-fraction {config.query_fraction}"
                )
            perm = np.random.default_rng(config.seed).permutation(len(main))
            self.q_rows, self.db_rows = np.sort(perm[:n_q]), np.sort(perm[n_q:])
            queries, self.query_source = main, f"fraction {config.query_fraction} of DATA (seed {config.seed})"
        else:
            queries = self._load(config.queries, self.spec)
            self.q_rows, self.db_rows, self.query_source = None, None, config.queries
        self.main_size, self.query_size = len(main), len(queries)
        db_names, q_names = _take(main.labels, self.db_rows), _take(queries.labels, self.q_rows)
        self.label_names = sorted(set(db_names) | set(q_names), key=_label_order)
        code = {name: i for i, name in enumerate(self.label_names)}
        self.db_labels = np.array([code[s] for s in db_names], dtype=np.int64)
        self.query_labels = np.array([code[s] for s in q_names], dtype=np.int64)
        self.views = {self.spec: View(_rows(main.images, self.db_rows), _rows(queries.images, self.q_rows))}
        base = self.views[self.spec]
        self.exclude = ev.identical_pairs(base.queries, base.db)
        if len(self.exclude):
            log.info(
                "%d queries have an identical image in the database; those are left out of their ranks",
                len(np.unique(self.exclude[:, 0])),
            )

    def _load_main(self, source: str) -> tuple[InputSpec, Dataset]:
        """DATA at its own spec. An IDX file is read once (data_spec would read it just for the size)."""
        if not is_idx(source):
            spec = data_spec(source)
            return spec, self._load(source, spec)
        x, y = read_idx_pair(source, idx_labels_path(source))
        spec = InputSpec(x.shape[1], 1)
        return spec, self._check(Dataset(idx_to_spec(x, spec), [str(int(v)) for v in y], source), source)

    def _load(self, source: str, spec: InputSpec) -> Dataset:
        return self._check(load_dataset(source, spec, self.max_pixels), source)

    @staticmethod
    def _check(dataset: Dataset, source: str) -> Dataset:
        for path, reason in dataset.failed:
            log.warning("skipped %s: %s", path, reason)
        if len(dataset) == 0:
            raise DataError(f"{source}: no usable images")
        unlabelled = sum(label is None for label in dataset.labels)
        if unlabelled:
            raise DataError(f"{source}: {unlabelled} images have no label; put them in class subfolders")
        return dataset

    def view(self, spec: InputSpec) -> View:
        """The images at ``spec``, decoded again from the sources for a model with another spec."""
        if spec not in self.views:
            log.info("decoding the data again at %dx%dx%d for a model with that input", *spec.shape)
            db = self._reload(self.config.data, spec, self.main_size, self.db_rows)
            source = self.config.queries or self.config.data
            size = self.query_size if self.config.queries else self.main_size
            self.views[spec] = View(db, self._reload(source, spec, size, self.q_rows))
        return self.views[spec]

    def _reload(self, source: str, spec: InputSpec, size: int, rows: np.ndarray | None) -> np.ndarray:
        dataset = load_dataset(source, spec, self.max_pixels)  # IDX data: resized with idx_to_spec
        if len(dataset) != size:
            raise DataError(f"{source}: {len(dataset)} usable images at {spec.shape}, {size} at {self.spec.shape}")
        return _rows(dataset.images, rows)

    def altered(self, spec: InputSpec, transform: str = "mixed") -> np.ndarray:
        """The queries at ``spec`` altered by ``transform``, made once and shared by every model."""
        view = self.view(spec)
        if transform not in view.altered:
            started = time.perf_counter()
            view.altered[transform] = TRANSFORMS[transform](view.queries, self.config.seed)
            log.info("altered %d queries by %s in %.1f s", len(view.queries), transform, time.perf_counter() - started)
        return view.altered[transform]

    def shown_queries(self) -> np.ndarray:
        """A few fixed query rows, of different labels where there are enough, chosen by the seed."""
        rng = np.random.default_rng(self.config.seed)
        labels = np.unique(self.query_labels)[: self.config.shown_queries]
        return np.array([rng.choice(np.flatnonzero(self.query_labels == lab)) for lab in labels], dtype=np.int64)


def _label_order(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)  # IDX labels "0".."9" numerically


def _rows(images: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    return images if rows is None else images[rows]


def _take(labels: list[str | None], rows: np.ndarray | None) -> list[str]:
    return [str(labels[i]) for i in (range(len(labels)) if rows is None else rows.tolist())]


# -- models -----------------------------------------------------------------------------------------


def plan_models(engine: Any, names: list[str]) -> dict[str, str | None]:
    """name -> kind to create, or None for a model the library has already. Refuses unknown names."""
    plan: dict[str, str | None] = {}
    for name in names:
        if engine.store.model(name) is not None:
            plan[name] = None
        elif name in REGISTRY:
            plan[name] = name
        else:
            raise UnknownModelError(name, [m.name for m in engine.store.models()])
    return plan


def _options(kind: str, config: CompareConfig) -> dict[str, Any]:
    if kind == "pca":
        return {"dim": config.latent_dim, "seed": config.seed}
    if kind in ("ae", "vae"):
        return {
            "arch": config.arch,
            "latent_dim": config.latent_dim,
            "epochs": config.train_epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "lr_schedule": config.lr_schedule,
            "seed": config.seed,
            "augment": config.augment,
            "consistency": config.consistency,
            "temperature": config.temperature,
        }
    return {}


def prepare_model(engine: Any, name: str, kind: str | None, data: Data) -> tuple[Encoder, str, float | None]:
    """The model's encoder and metric, training it on the database first when ``kind`` is given."""
    if kind is None:
        model = engine.model(name)
        if _saw_queries(model.config, data):
            log.warning(
                "model %r was trained on %s, which holds this comparison's query images: its scores are optimistic "
                "(let compare train its own: another --name, or delete it with 'embedsearch models rm %s')",
                name,
                model.config["data"]["source"],
                name,
            )
        log.info(
            "using the library's model %r (%s, %dx%dx%d %s, %s) as it is",
            name,
            model.kind,
            model.image_size,
            model.image_size,
            model.channels,
            model.fit,
            model.metric,
        )
        return engine.encoder(name), model.metric, None
    cls = encoder_class(kind)
    images = data.view(data.spec).db if cls.needs_training else np.zeros((0, *data.spec.shape), np.uint8)
    started = time.perf_counter()
    info = engine.fit_model(
        name,
        kind,
        images,
        data.spec,
        # The run's metric for the float models; a kind that cannot use it (the hashes) gets its own.
        metric=data.config.metric if data.config.metric in cls.metrics else None,
        options=_options(kind, data.config),
        source=data.config.data,
    )
    seconds = time.perf_counter() - started
    if cls.needs_training:
        log.info("trained %s model %r in %.1f s", kind, name, seconds)
    return engine.encoder(name), info.metric, seconds


def _saw_queries(config: dict[str, Any], data: Data) -> bool:
    """True if a library model was trained on images that include this run's queries: on the
    --queries source itself, or on DATA with more images than its database part."""
    trained = (config or {}).get("data") or {}
    source = trained.get("source")
    if not source or not encoder_class(config.get("kind", "pixels")).needs_training:
        return False

    def same(other: str) -> bool:
        return os.path.realpath(source) == os.path.realpath(other)

    if data.config.queries is not None:
        return same(data.config.queries)
    return same(data.config.data) and int(trained.get("images") or 0) > len(data.view(data.spec).db)


def evaluate_model(name: str, kind: str, encoder: Encoder, metric: str, data: Data, art: Artifacts) -> ModelResult:
    """Score one model on the comparison's data; fills ``art`` with what the report draws of it."""
    config, view = data.config, data.view(encoder.spec)
    log.info("%s: encoding %d database and %d query images", name, len(view.db), len(view.queries))
    started = time.perf_counter()
    db_vecs = encoder.encode(view.db)
    per_s = len(view.db) / max(time.perf_counter() - started, 1e-9)
    q_vecs = encoder.encode(view.queries)
    index = ev.build_index(db_vecs, metric)
    depth = max(config.k, config.curve_k, max(RECALL_KS), TOP_SHOWN)
    ids = ev.neighbours(index, q_vecs, depth, metric, data.exclude)  # (Q, depth), one batched search
    hits = ev.hit_matrix(ids, data.db_labels, data.query_labels)
    relevant = ev.relevant_counts(data.db_labels, data.query_labels, data.exclude)
    query_ms = ev.time_single_queries(encoder.encode, index, view.queries, config.k, metric, config.timing_queries)
    ev.add_vectors(index, q_vecs, metric)  # near duplicates are searched among database + originals
    robust = _robustness(encoder, index, metric, len(db_vecs), data)
    result = ModelResult(
        name,
        kind,
        metric,
        encoder.dim,
        encoder.code_bytes,
        ev.precision_at(hits, config.k),
        ev.map_at(hits, config.k, relevant),
        {n: ev.recall_at(hits, n) for n in RECALL_KS},
        ev.knn_accuracy(ids, data.db_labels, data.query_labels, config.k),
        robust["mixed"],  # neardup_recall@k: the mixed transform, its definition since the start
        per_s,
        query_ms,
        precision_curve=ev.precision_curve(hits, config.curve_k),
        robustness={t: {f"recall@{n}": v for n, v in r.items()} for t, r in robust.items()},
    )
    art.kinds[name], art.top[name] = kind, ids[art.shown, :TOP_SHOWN]
    if isinstance(encoder, DecodingEncoder):
        _generative(name, encoder, view.queries, q_vecs, result, art, config)
    return result


def _robustness(encoder: Encoder, index: Any, metric: str, n_db: int, data: Data) -> dict[str, dict[int, float]]:
    """transform -> near-duplicate recall at NEARDUP_KS, over an index of database + original queries."""
    out = {}
    for name in TRANSFORMS:
        ids = ev.search(index, encoder.encode(data.altered(encoder.spec, name)), max(NEARDUP_KS), metric)
        out[name] = ev.neardup_recall(ids, n_db, NEARDUP_KS, data.exclude)
    return out


def _generative(
    name: str,
    encoder: DecodingEncoder,
    queries: np.ndarray,
    q_vecs: np.ndarray,
    result: ModelResult,
    art: Artifacts,
    config: CompareConfig,
) -> None:
    """Reconstruction error, with a posterior (VAE) also KL and active dimensions, and decoded samples."""
    result.recon_error = ev.mse_per_pixel(queries, encoder.reconstruct(queries))
    rng = np.random.default_rng(config.seed)
    noise = rng.standard_normal((config.samples, encoder.dim)).astype(np.float32)
    if isinstance(encoder, PosteriorEncoder):
        mu, logvar = encoder.encode_dist(queries)
        result.kl, result.active_dims = ev.gaussian_kl(mu, logvar), ev.active_dims(mu)
        art.samples[name] = encoder.decode(noise)  # the VAE's prior is N(0, I)
        art.prior_samples.add(name)
    else:
        # An AE has no prior: sample a Gaussian matched per dimension to its query codes.
        art.samples[name] = encoder.decode(q_vecs.mean(axis=0) + noise * q_vecs.std(axis=0))
    art.latents[name] = q_vecs


def run_compare(
    engine: Any, config: CompareConfig, command: str = "", keep_models: bool = False
) -> tuple[CompareResult, Artifacts]:
    """The whole comparison; ``command`` is recorded in the result for the report. The models it
    creates are deleted at the end unless ``keep_models`` (a later run then reuses them as they are)."""
    started = time.perf_counter()
    plan = plan_models(engine, config.models)  # unknown names fail before any data is read
    data = Data(config, engine.max_pixels)
    base = data.view(data.spec)
    log.info(
        "%d queries (%s), %d database images, %d labels, input %dx%dx%d",
        len(base.queries),
        data.query_source,
        len(base.db),
        len(data.label_names),
        *data.spec.shape,
    )
    art = Artifacts(data.label_names, base.db, base.queries, data.db_labels, data.query_labels, data.shown_queries())
    results: dict[str, ModelResult] = {}
    for name, kind in plan.items():
        encoder, metric, seconds = prepare_model(engine, name, kind, data)
        result = evaluate_model(name, encoder.kind, encoder, metric, data, art)
        result.created = seconds is not None
        result.trained = result.created and encoder_class(encoder.kind).needs_training
        result.train_seconds = seconds if result.trained else None
        results[name] = result
        log.info(
            "%s: precision@%d %.4f, neardup_recall@10 %.4f", name, config.k, result.precision, result.neardup_recall[10]
        )
    created = [name for name, result in results.items() if result.created]
    if created and not keep_models:
        for name in created:
            engine.delete_model(name)
        log.info("deleted the models made for this comparison (%s); --keep-models keeps them", ", ".join(created))
    outcome = CompareResult(
        config,
        config.data,
        data.query_source,
        len(base.queries),
        len(base.db),
        data.label_names,
        results,
        time.perf_counter() - started,
        command,
    )
    return outcome, art
