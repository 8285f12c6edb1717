"""The AE and VAE as encoder kinds "ae" and "vae".

The AE is a :class:`embedsearch.encoders.base.DecodingEncoder`, the VAE a
:class:`embedsearch.encoders.base.PosteriorEncoder`.

Encoding runs in batches under ``model.eval()`` and ``torch.inference_mode()`` on the best
device, and always returns float32 numpy arrays on the CPU. The VAE's embedding is its mean mu:
sampling would make the same image land somewhere else on every query.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import WEIGHTS_FILE, DecodingEncoder, PosteriorEncoder
from embedsearch.encoders.base import Options as EncoderOptions
from embedsearch.encoders.nn.fuse import for_inference
from embedsearch.encoders.nn.models import (
    Autoencoder,
    ModelConfig,
    VariationalAutoencoder,
    count_parameters,
    from_numpy,
    images_to_tensor,
    pick_device,
    tensor_to_images,
    use_all_cores,
)
from embedsearch.encoders.nn.train import (
    AEOptions,
    TrainReport,
    VAEOptions,
    check_images,
    load_weights,
    save_weights,
    train,
)
from embedsearch.errors import InvalidArgumentError, ModelError
from embedsearch.malloc import keep_freed_memory
from embedsearch.version import __version__

ENCODE_BATCH = 256
#: Held while an inference copy is made: the service's first requests may arrive together. One lock
#: for every model (a copy is made once per model and process), so that an encoder still pickles (Ray).
_FUSING = threading.Lock()


class NeuralEncoder(DecodingEncoder):
    """What the AE and VAE share (encoder and decoder); subclasses name their kind, options and network."""

    variational: ClassVar[bool] = False
    # Imported as EncoderOptions: in the class body, ``Options`` is this attribute (the kind's options class).
    Options: ClassVar[type[EncoderOptions]] = AEOptions
    # Trained with a contrastive term on L2-normalised codes, so directions are what they order by
    # (benchmarks/ablation.py measured cosine against L2; README "Training defaults").
    metrics: ClassVar[tuple[str, ...]] = ("cosine", "l2")

    def __init__(
        self,
        spec: InputSpec,
        dim: int,
        options: EncoderOptions,
        model: Autoencoder | None = None,
        report: TrainReport | None = None,
    ) -> None:
        super().__init__(spec, dim, options)
        self._model = model.eval() if model is not None else None
        self._fast: Autoencoder | None = None
        self.report = report

    @property
    def model(self) -> Autoencoder:
        if self._model is None:
            raise ModelError(f"this {self.kind} model has no weights; train or load it first")
        return self._model

    @property
    def runtime(self) -> Autoencoder:
        """The network every inference call runs: :func:`fuse.for_inference` of :attr:`model`, made once."""
        if self._fast is None:
            with _FUSING:
                if self._fast is None:  # made once, however many threads asked at the same time
                    self._fast = for_inference(self.model)
        return self._fast

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- training and files -------------------------------------------------------------------

    @classmethod
    def _options(cls, options: EncoderOptions) -> AEOptions:
        if type(options) is not cls.Options or not isinstance(options, AEOptions):
            raise InvalidArgumentError(
                f"model kind {cls.kind!r} takes {cls.Options.__name__}, not {type(options).__name__}"
            )
        return options

    @classmethod
    def fit(
        cls, images: np.ndarray, spec: InputSpec, options: EncoderOptions, workdir: Path, resume: bool = False
    ) -> NeuralEncoder:
        opts = cls._options(options)
        model, report = train(images, spec, opts, Path(workdir), resume=resume)
        return cls(spec, opts.latent_dim, opts, model, report)

    def save(self, directory: Path) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / WEIGHTS_FILE
        save_weights(path, self.model, self._options(self.options), self.report)
        return path

    @classmethod
    def load(cls, directory: Path, spec: InputSpec, dim: int, options: EncoderOptions) -> NeuralEncoder:
        opts = cls._options(options)
        if dim != opts.latent_dim:
            raise ModelError(f"the model's dimension {dim} disagrees with its latent_dim {opts.latent_dim}")
        config = ModelConfig(opts.arch, spec.image_size, spec.channels, opts.latent_dim, cls.variational)
        use_all_cores()
        model, meta = load_weights(Path(directory) / WEIGHTS_FILE, config, pick_device())
        return cls(spec, dim, opts, model, _saved_report(meta))

    # -- inference ------------------------------------------------------------------------------

    @contextmanager
    def sharing_cores(self) -> Iterator[None]:
        # Measured in a bulk run of 70k PNGs beside two decoding workers on 2 cores: with two torch
        # threads the encoder took most of the parent's time, waiting at OpenMP barriers; with one
        # the whole run went from about 4,800 to 5,700 images/s.
        # A bulk run encodes batch after batch: keep the freed activations' memory (embedsearch.malloc).
        # Only here and in training, never on load: the service returns large buffers on purpose.
        keep_freed_memory()
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _batches(self, images: np.ndarray) -> Iterator[torch.Tensor]:
        """(N, S, S, C) uint8 -> (B, C, S, S) float batches on the model's device."""
        check_images(images, self.spec)
        for start in range(0, len(images), ENCODE_BATCH):
            chunk = from_numpy(images[start : start + ENCODE_BATCH])  # (B, S, S, C) uint8
            yield images_to_tensor(chunk.to(self.device))

    @staticmethod
    def _numpy(parts: list[torch.Tensor], width: int) -> np.ndarray:
        if not parts:
            return np.zeros((0, width), dtype=np.float32)
        out = torch.cat(parts).to("cpu", torch.float32).numpy()
        return np.ascontiguousarray(out)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, C) uint8 -> (N, latent_dim) float32: z for the AE, mu for the VAE."""
        with torch.inference_mode():
            return self._numpy([self.runtime.encode(x) for x in self._batches(images)], self.dim)

    def encode_scored(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, C) uint8 -> codes (N, latent_dim) float32 and novelty (N,) float64, in one forward pass.

        Indexing calls this instead of ``encode``: the decoder pass is the only extra cost.
        """
        likelihood = self._options(self.options).likelihood
        codes: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        with torch.inference_mode():
            for x in self._batches(images):
                code, loss = self.runtime.novelty(x, likelihood)  # (B, L), (B,)
                codes.append(code)
                losses.append(loss)
        scores = torch.cat(losses).to("cpu", torch.float64).numpy() if losses else np.zeros(0)
        return self._numpy(codes, self.dim), scores

    def novelty(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, C) uint8 -> (N,) float64: reconstruction loss (AE) or negative ELBO at z = mu (VAE)."""
        return self.encode_scored(images)[1]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(N, latent_dim) latent vectors -> (N, S, S, C) uint8 images."""
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise InvalidArgumentError(f"latent vectors must have shape (N, {self.dim}), not {z.shape}")
        parts: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(z), ENCODE_BATCH):
                batch = from_numpy(z[start : start + ENCODE_BATCH]).to(self.device)  # (B, L)
                parts.append(tensor_to_images(self.runtime.decode(batch)).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, *self.spec.shape), dtype=np.uint8)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, C) uint8 -> their reconstructions through the code (VAE: through mu)."""
        parts: list[np.ndarray] = []
        with torch.inference_mode():
            for x in self._batches(images):
                parts.append(tensor_to_images(self.runtime.decode(self.runtime.encode(x))).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, *self.spec.shape), dtype=np.uint8)

    def summary(self) -> dict[str, Any]:
        opts = self._options(self.options)
        facts: dict[str, Any] = {
            "kind": self.kind,
            "arch": opts.arch,
            "image_size": self.spec.image_size,
            "channels": self.spec.channels,
            "latent_dim": opts.latent_dim,
            "likelihood": opts.likelihood,
            "parameters": count_parameters(self.model),
            "version": __version__,
        }
        if isinstance(opts, VAEOptions):
            facts.update(beta=opts.beta, kl_warmup=opts.kl_warmup)
        if self.report is not None:
            facts.update(_report_facts(self.report, self.variational))
        return facts


def _saved_report(meta: dict[str, Any]) -> TrainReport | None:
    """The training report stored with the weights; it is informative only, so damage is tolerated."""
    try:
        return TrainReport.from_dict(meta["report"])
    except (KeyError, TypeError, ValueError):
        return None


def _report_facts(report: TrainReport, variational: bool) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "epochs_trained": report.epochs,
        "best_epoch": report.best_epoch,
        "device": report.device,
        "train_images": report.train_images,
        "val_images": report.val_images,
        "train_seconds": round(sum(h.seconds for h in report.history), 3),
    }
    if report.history:
        best = report.history[report.best_epoch - 1] if report.best_epoch else report.history[-1]
        last = report.history[-1]
        keys = ["train_loss", "val_loss"] + (["train_recon", "train_kl", "val_recon", "val_kl"] if variational else [])
        facts["best"] = {k: getattr(best, k) for k in keys}
        facts["last"] = {k: getattr(last, k) for k in keys}
        facts["history"] = [{k: getattr(h, k) for k in ["epoch", "seconds", *keys]} for h in report.history]
    return facts


class AEEncoder(NeuralEncoder):
    """Plain autoencoder: the embedding is the code z."""

    kind = "ae"
    Options = AEOptions
    variational = False


class VAEEncoder(NeuralEncoder, PosteriorEncoder):
    """Variational autoencoder: the embedding is the posterior mean mu."""

    kind = "vae"
    Options = VAEOptions
    variational = True

    def encode_dist(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, C) uint8 -> posterior mean and log-variance, each (N, latent_dim) float32."""
        model = self.runtime
        if not isinstance(model, VariationalAutoencoder):
            raise ModelError("this model has no posterior variance")
        mus: list[torch.Tensor] = []
        logvars: list[torch.Tensor] = []
        with torch.inference_mode():
            for x in self._batches(images):
                mu, logvar = model.encode_dist(x)
                mus.append(mu)
                logvars.append(logvar)
        return self._numpy(mus, self.dim), self._numpy(logvars, self.dim)
