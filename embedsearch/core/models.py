"""The model registry: making, loading and deleting the named models of a library.

A model is a row of the ``models`` table (kind, input spec, metric, checkpoint hash), a folder
``models/<name>/`` (config.json and weights) and an index (owned by the index cache).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from embedsearch.core.index_cache import IndexCache
from embedsearch.core.layout import Layout
from embedsearch.core.reencode import Encoded, encode_all
from embedsearch.core.schema import Model
from embedsearch.core.store import Entry, Store
from embedsearch.data.datasets import data_spec, load_dataset
from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import WEIGHTS_FILE, Encoder, encoder_class, write_config
from embedsearch.errors import DataError, InvalidArgumentError, LockedError, ModelError, UnknownModelError
from embedsearch.files import file_sha256
from embedsearch.results import ModelInfo
from embedsearch.version import __version__

log = logging.getLogger(__name__)


#: A model name names files (models/<name>/, indexes/<name>.faiss.json): letters, digits, . _ + -,
#: not starting with a dot, short enough for every file system's 255-byte names.
_NAME = re.compile(r"[^\W_][\w.+-]*")
MAX_NAME_CHARS = 64


def check_model_name(name: str) -> None:
    """Refuse, in one line, a name that cannot name the model's files."""
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8", "surrogateescape")) > 4 * MAX_NAME_CHARS:
        raise InvalidArgumentError(
            f"model name of {len(name)} characters is too long; choose one of at most {MAX_NAME_CHARS}"
        )
    if not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"{name!r} is not a usable model name; use letters, digits and . _ + - (not first), e.g. 'vae-64'"
        )


def model_info(m: Model, vectors: int) -> ModelInfo:
    return ModelInfo(
        m.name,
        m.kind,
        m.dim,
        m.metric,
        m.image_size,
        m.channels,
        vectors,
        m.created_at.isoformat(timespec="seconds"),
        fit=m.fit,
        index=index_summary(m.index_spec),
        checkpoint=m.checkpoint_path,
        config=m.config,
    )


def index_summary(spec: dict[str, Any] | None) -> dict[str, Any]:
    """``{"type", "params", "recall"}`` of a model's recorded index (null in the database: flat, exact)."""
    if not spec:
        return {"type": "flat", "params": {}, "recall": 1.0}
    return {"type": spec.get("type", "flat"), "params": dict(spec.get("params") or {}), "recall": spec.get("recall")}


def spec_of(m: Model) -> InputSpec:
    """A model's input, from its row (models made before the fit existed were migrated as pad)."""
    return InputSpec(m.image_size, m.channels, m.fit)


def _same(a: Model, b: Model) -> bool:
    """The same model, not one made anew under its name (SQLite may give the new row the old id)."""
    return (a.id, a.checkpoint_sha256, a.created_at) == (b.id, b.checkpoint_sha256, b.created_at)


class ModelRegistry:
    """Model rows and loaded encoders by name; made, replaced and deleted under the writer lock."""

    def __init__(self, store: Store, layout: Layout, cache: IndexCache, max_pixels: int) -> None:
        self.store = store
        self.layout = layout
        self.cache = cache
        self.max_pixels = max_pixels
        self._models: dict[str, Model] = {}
        self._encoders: dict[str, Encoder] = {}

    def model(self, name: str) -> Model:
        if name not in self._models:
            model = self.store.model(name)
            if model is None:
                raise UnknownModelError(name, [m.name for m in self.store.models()])
            self._models[name] = model
        return self._models[name]

    def models(self) -> list[ModelInfo]:
        counts = self.store.entry_counts()
        return [model_info(m, counts.get(m.id, 0)) for m in self.store.models()]

    def forget(self, name: str) -> None:
        """Drop the cached row and encoder of a model (it changed, or must be re-verified)."""
        self._models.pop(name, None)
        self._encoders.pop(name, None)

    def refresh(self) -> dict[str, Model]:
        """Re-read the model rows; models made anew or deleted elsewhere are forgotten."""
        fresh = {m.name: m for m in self.store.models()}
        for name, old in list(self._models.items()):
            new = fresh.get(name)
            if new is None or not _same(new, old):
                self._encoders.pop(name, None)
        self._models = fresh
        return fresh

    def changed(self) -> bool:
        """True if a model was made, replaced or deleted since the rows were last read."""
        fresh = {m.name: m for m in self.store.models()}
        return fresh.keys() != self._models.keys() or any(not _same(fresh[n], m) for n, m in self._models.items())

    def encoder(self, name: str) -> Encoder:
        """The model's encoder, its checkpoint checked against the hash recorded when it was made."""
        if name in self._encoders:
            return self._encoders[name]
        model = self.model(name)
        cls = encoder_class(model.kind)
        if model.checkpoint_path:
            weights = self.layout.home / model.checkpoint_path
            if not weights.is_file():
                raise ModelError(
                    f"model {name!r}: checkpoint {weights} is missing; retrain it with 'embedsearch train'"
                )
            if file_sha256(weights) != model.checkpoint_sha256:
                raise ModelError(
                    f"model {name!r}: checkpoint {weights} does not match its recorded sha256 "
                    "(modified or corrupt); retrain the model"
                )
        options = cls.Options.from_dict(model.config.get("options", {}))
        spec = spec_of(model)
        # The weights' own folder: models/<name>/v-<time>/ (older libraries: models/<name>/ itself).
        folder = self.layout.model_dir(name)
        if model.checkpoint_path:
            folder = (self.layout.home / model.checkpoint_path).parent
        encoder = cls.load(folder, spec, model.dim, options)
        self._encoders[name] = encoder
        return encoder

    def create_model(
        self,
        name: str,
        kind: str,
        data: str | None = None,
        *,
        image_size: int | None = None,
        channels: int | None = None,
        metric: str | None = None,
        options: dict[str, Any] | None = None,
        resume: bool = False,
        replace: bool = False,
        fit: str = "pad",
    ) -> ModelInfo:
        """Make (train) a named model from ``data`` (a folder or an IDX images file) and register it.

        ``metric`` None: the kind's default (l2; hamming for the binary hashes). ``fit``: the resize
        policy, pad or crop, fixed for the model's life (training, index and queries all use it).
        """
        cls = encoder_class(kind)
        cls.Options.from_dict(options or {})  # refuse bad options before reading any data
        cls.choose_metric(metric)
        check_model_name(name)
        if image_size is not None and channels is not None:
            spec = InputSpec(image_size, channels, fit)
        elif data is None:
            raise DataError(f"model kind {kind!r} needs DATA (or --image-size and --channels)")
        else:
            inferred = data_spec(data, image_size, channels)
            spec = InputSpec(inferred.image_size, inferred.channels, fit)
        images = np.zeros((0, *spec.shape), np.uint8)
        if cls.needs_training:
            if data is None:
                raise DataError(f"model kind {kind!r} needs DATA to learn from")
            dataset = load_dataset(data, spec, self.max_pixels)
            for path, reason in dataset.failed:
                log.warning("skipped %s: %s", path, reason)
            images = dataset.images
        return self.fit_model(
            name, kind, images, spec, metric=metric, options=options, resume=resume, replace=replace, source=data
        )

    def fit_model(
        self,
        name: str,
        kind: str,
        images: np.ndarray,
        spec: InputSpec,
        *,
        metric: str | None = None,
        options: dict[str, Any] | None = None,
        resume: bool = False,
        replace: bool = False,
        source: str | None = None,
    ) -> ModelInfo:
        """Train a model of ``kind`` on (N, S, S, C) uint8 ``images`` and register it as ``name``."""
        cls = encoder_class(kind)
        opts = cls.Options.from_dict(options or {})
        metric = cls.choose_metric(metric)  # None: the kind's default
        check_model_name(name)
        if self.store.model(name) is not None and not (replace or resume):
            raise InvalidArgumentError(
                f"model {name!r} exists already; pass --replace to retrain it "
                "(its index is emptied) or choose another --name"
            )
        if cls.needs_training and len(images) == 0:
            raise DataError(f"{source or 'the data'}: no usable images to train on")
        if images.shape[1:] != spec.shape:
            raise InvalidArgumentError(f"images of shape {images.shape[1:]} do not match the input {spec.shape}")
        workdir = self.layout.model_dir(name)
        workdir.mkdir(parents=True, exist_ok=True)
        with self._training(name, workdir):
            trained_on = f" from {len(images)} images" if cls.needs_training else ""
            log.info("making %s model %r (%dx%dx%d input)%s", kind, name, *spec.shape, trained_on)
            encoder = cls.fit(images, spec, opts, workdir, resume=resume)
            return self._register(name, encoder, metric, source, len(images), replace or resume)

    @contextmanager
    def _training(self, name: str, workdir: Path) -> Iterator[None]:
        """One training run per model name at a time: two would share (and spoil) its working folder."""
        lock = FileLock(str(workdir / ".train.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise LockedError(
                f"model {name!r} is being trained by another process; wait for it to finish or choose another --name"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _register(self, name: str, encoder: Encoder, metric: str, data: str | None, n: int, replace: bool) -> ModelInfo:
        """Swap the new model in, in one transaction, once its weights and its vectors are complete.

        The weights go to a folder of their own (``models/<name>/v-<time>/``), so until the commit the old
        model keeps working, and a kill at any moment leaves one whole model or the other. The new model
        indexes every image the old one held.
        """
        workdir = self.layout.model_dir(name)
        version = workdir / f"v-{time.time_ns():x}"
        version.mkdir()
        weights = encoder.save(version)
        config = self._config(name, encoder, metric, data, n)
        write_config(version, config)
        old = self.store.model(name)
        held = self.store.entry_image_ids(old.id) if old is not None else []
        encoded = encode_all(self.store, encoder, held, self.max_pixels)  # outside the lock: may take long
        with self.cache.writing():
            current = self.store.model(name)
            if current is not None and not replace:
                shutil.rmtree(version, ignore_errors=True)
                raise InvalidArgumentError(
                    f"model {name!r} was made by another process meanwhile; pass --replace to retrain it "
                    "or choose another --name"
                )
            entries, unreadable = self._held_now(current, encoder, encoded)
            model = self.store.replace_model(
                name,
                entries,
                kind=encoder.kind,
                config=config,
                dim=encoder.dim,
                metric=metric,
                image_size=encoder.spec.image_size,
                channels=encoder.spec.channels,
                fit=encoder.spec.fit,
                checkpoint_path=str(weights.relative_to(self.layout.home)) if weights else None,
                checkpoint_sha256=file_sha256(weights) if weights else None,
            )
            self.cache.drop(name)  # the old entries went with the old row
            self.cache.rebuild(model)
            self._clear_old_versions(workdir, version)
        write_config(workdir, config)  # for people: the current model's config, beside its versions
        if unreadable:
            log.warning(
                "%d images the old %r held could not be read again and are in no index now "
                "(e.g. image %d); 'embedsearch check' lists them",
                len(unreadable),
                name,
                unreadable[0],
            )
        elif entries:
            log.info("model %r now indexes the %d images its predecessor held", name, len(entries))
        self.forget(name)
        self._models[name] = model
        self._encoders[name] = encoder
        return model_info(model, len(entries))

    def _held_now(self, current: Model | None, encoder: Encoder, encoded: Encoded) -> tuple[list[Entry], list[int]]:
        """The entries of what the old model holds now: others may have added or removed images meanwhile."""
        now = set(self.store.entry_image_ids(current.id)) if current is not None else set()
        done = {i for i, _, _ in encoded.entries} | set(encoded.unreadable)
        late = encode_all(self.store, encoder, sorted(now - done), self.max_pixels)
        entries = [entry for entry in encoded.entries + late.entries if entry[0] in now]
        unreadable = [i for i in encoded.unreadable + late.unreadable if i in now]
        return entries, unreadable

    def _config(self, name: str, encoder: Encoder, metric: str, data: str | None, n: int) -> dict[str, Any]:
        return {
            "name": name,
            "kind": encoder.kind,
            "image_size": encoder.spec.image_size,
            "channels": encoder.spec.channels,
            "fit": encoder.spec.fit,
            "dim": encoder.dim,
            "metric": metric,
            "options": encoder.options.to_dict(),
            "version": __version__,
            "data": {"source": str(data) if data else None, "images": n},
            **encoder.summary(),
        }

    @staticmethod
    def _clear_old_versions(workdir: Path, keep: Path) -> None:
        """Weights of earlier models of this name (and of runs killed before their swap)."""
        for old in workdir.glob("v-*"):
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        (workdir / WEIGHTS_FILE).unlink(missing_ok=True)  # the layout before versioned folders

    def delete_model(self, name: str) -> ModelInfo:
        """Delete a model, its index entries, index file and checkpoints (the images stay); what it was."""
        row = self.model(name)
        info = model_info(row, self.store.entry_counts().get(row.id, 0))
        with self.cache.writing():
            self.store.delete_model(name)
            self.cache.drop(name)
            shutil.rmtree(self.layout.model_dir(name), ignore_errors=True)
        self.forget(name)
        return info
