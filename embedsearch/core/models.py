"""The model registry: making, loading and deleting the named models of a library.

A model is a row of the ``models`` table (kind, input spec, metric, checkpoint hash), a folder
``models/<name>/`` (config.json and weights) and an index (owned by the index cache).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np

from embedsearch.core.index_cache import IndexCache
from embedsearch.core.layout import Layout
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.data.datasets import data_spec, load_dataset
from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import Encoder, encoder_class, write_config
from embedsearch.errors import DataError, InvalidArgumentError, ModelError, UnknownModelError
from embedsearch.files import file_sha256
from embedsearch.results import METRICS, ModelInfo
from embedsearch.version import __version__

log = logging.getLogger(__name__)


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
        m.checkpoint_path,
        m.config,
    )


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
            if new is None or new.id != old.id:
                self._encoders.pop(name, None)
        self._models = fresh
        return fresh

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
        spec = InputSpec(model.image_size, model.channels)
        encoder = cls.load(self.layout.model_dir(name), spec, model.dim, options)
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
        metric: str = "l2",
        options: dict[str, Any] | None = None,
        resume: bool = False,
        replace: bool = False,
    ) -> ModelInfo:
        """Make (train) a named model from ``data`` (a folder or an IDX images file) and register it."""
        cls = encoder_class(kind)
        cls.Options.from_dict(options or {})  # refuse bad options before reading any data
        if image_size is not None and channels is not None:
            spec = InputSpec(image_size, channels)
        elif data is None:
            raise DataError(f"model kind {kind!r} needs DATA (or --image-size and --channels)")
        else:
            spec = data_spec(data, image_size, channels)
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
        metric: str = "l2",
        options: dict[str, Any] | None = None,
        resume: bool = False,
        replace: bool = False,
        source: str | None = None,
    ) -> ModelInfo:
        """Train a model of ``kind`` on (N, S, S, C) uint8 ``images`` and register it as ``name``."""
        cls = encoder_class(kind)
        opts = cls.Options.from_dict(options or {})
        if metric not in METRICS:
            raise InvalidArgumentError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgumentError(f"{name!r} is not a usable model name")
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
        trained_on = f" from {len(images)} images" if cls.needs_training else ""
        log.info("making %s model %r (%dx%dx%d input)%s", kind, name, *spec.shape, trained_on)
        encoder = cls.fit(images, spec, opts, workdir, resume=resume)
        return self._register(name, encoder, metric, source, len(images))

    def _register(self, name: str, encoder: Encoder, metric: str, data: str | None, n: int) -> ModelInfo:
        workdir = self.layout.model_dir(name)
        weights = encoder.save(workdir)
        config = {
            "name": name,
            "kind": encoder.kind,
            "image_size": encoder.spec.image_size,
            "channels": encoder.spec.channels,
            "dim": encoder.dim,
            "metric": metric,
            "options": encoder.options.to_dict(),
            "version": __version__,
            "data": {"source": str(data) if data else None, "images": n},
            **encoder.summary(),
        }
        write_config(workdir, config)
        with self.cache.writing():
            model = self.store.replace_model(
                name,
                kind=encoder.kind,
                config=config,
                dim=encoder.dim,
                metric=metric,
                image_size=encoder.spec.image_size,
                channels=encoder.spec.channels,
                checkpoint_path=str(weights.relative_to(self.layout.home)) if weights else None,
                checkpoint_sha256=file_sha256(weights) if weights else None,
            )
            self.cache.drop(name)  # the old entries went with the old row
        self.forget(name)
        self._models[name] = model
        self._encoders[name] = encoder
        return model_info(model, 0)

    def delete_model(self, name: str) -> None:
        self.model(name)
        with self.cache.writing():
            self.store.delete_model(name)
            self.cache.drop(name)
            shutil.rmtree(self.layout.model_dir(name), ignore_errors=True)
        self.forget(name)
