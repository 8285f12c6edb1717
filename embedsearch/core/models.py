"""Making, loading and deleting the named models of a library (a mixin of :class:`Engine`)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch import __version__
from embedsearch.core.store import Model
from embedsearch.core.vectors import METRICS
from embedsearch.data.datasets import data_spec, load_dataset
from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import Encoder, encoder_class, write_config
from embedsearch.errors import DataError, InvalidArgumentError, ModelError, UnknownModelError
from embedsearch.results import ModelInfo

if TYPE_CHECKING:
    from embedsearch.engine import Engine

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelsMixin:
    """Model management. Relies on Engine's store, home, caches and writer lock."""

    def model(self: Engine, name: str) -> Model:
        if name not in self._models:
            model = self.store.model(name)
            if model is None:
                raise UnknownModelError(name, [m.name for m in self.store.models()])
            self._models[name] = model
        return self._models[name]

    def _forget(self, name: str) -> None:
        for cache in (self._models, self._encoders, self._indexes):
            cache.pop(name, None)

    def models(self) -> list[ModelInfo]:
        counts = self.store.entry_counts()
        return [self._model_info(m, counts.get(m.id, 0)) for m in self.store.models()]

    @staticmethod
    def _model_info(m: Model, vectors: int) -> ModelInfo:
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

    def encoder(self, name: str) -> Encoder:
        """The model's encoder, its checkpoint checked against the hash recorded when it was made."""
        if name in self._encoders:
            return self._encoders[name]
        model = self.model(name)
        cls = encoder_class(model.kind)
        if model.checkpoint_path:
            weights = self.home / model.checkpoint_path
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
        encoder = cls.load(self.model_dir(name), spec, model.dim, options)
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
        workdir = self.model_dir(name)
        workdir.mkdir(parents=True, exist_ok=True)
        trained_on = f" from {len(images)} images" if cls.needs_training else ""
        log.info("making %s model %r (%dx%dx%d input)%s", kind, name, *spec.shape, trained_on)
        encoder = cls.fit(images, spec, opts, workdir, resume=resume)
        return self._register(name, encoder, metric, source, len(images))

    def _register(self, name: str, encoder: Encoder, metric: str, data: str | None, n: int) -> ModelInfo:
        workdir = self.model_dir(name)
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
        with self.writing():
            model = self.store.replace_model(
                name,
                kind=encoder.kind,
                config=config,
                dim=encoder.dim,
                metric=metric,
                image_size=encoder.spec.image_size,
                channels=encoder.spec.channels,
                checkpoint_path=str(weights.relative_to(self.home)) if weights else None,
                checkpoint_sha256=file_sha256(weights) if weights else None,
            )
            for suffix in ("", ".json"):
                Path(str(self.index_path(name)) + suffix).unlink(missing_ok=True)
        self._forget(name)
        self._encoders[name] = encoder
        return self._model_info(model, 0)

    def delete_model(self, name: str) -> None:
        self.model(name)
        with self.writing():
            self.store.delete_model(name)
            for suffix in ("", ".json"):
                Path(str(self.index_path(name)) + suffix).unlink(missing_ok=True)
            shutil.rmtree(self.model_dir(name), ignore_errors=True)
        self._forget(name)
