"""Training loop of the AE and VAE, with checkpoints that survive Ctrl-C and SIGKILL.

One call of :func:`train` is one run: the images are converted to a float tensor once, split into
train and validation parts by the seed, and trained with Adam for ``epochs`` epochs. After every
epoch it logs one line, writes the weights to ``weights.safetensors`` if the validation loss is the
best so far, and then writes the resume state (see :mod:`.checkpoint`). ``resume=True`` continues
from that state; with the same seed on the same machine the result equals an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import WEIGHTS_FILE, Options
from embedsearch.encoders.nn import checkpoint as ckpt
from embedsearch.encoders.nn.augment import augment_batch, info_nce, jpeg_pool
from embedsearch.encoders.nn.models import (
    ARCHS,
    LIKELIHOODS,
    Autoencoder,
    ModelConfig,
    build_model,
    from_numpy,
    images_to_tensor,
    pick_device,
    unit_float,
    use_all_cores,
)
from embedsearch.encoders.nn.recipe import (
    DEFAULT_AUGMENT,
    DEFAULT_CONSISTENCY,
    DEFAULT_LR,
    DEFAULT_TEMPERATURE,
    LR_SCHEDULES,
    WARMUP,
    parse_augment,
)
from embedsearch.errors import InvalidArgumentError, ModelError
from embedsearch.malloc import keep_freed_memory
from embedsearch.progress import bar

log = logging.getLogger(__name__)

#: Up to this many bytes of float32 pixels the whole set is converted once; above, each batch is
#: converted on the fly instead (a 4x larger copy of a big RGB set would not fit in memory).
FLOAT_BUDGET = 4 * 2**30
EVAL_BATCH = 512


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be a whole number between {low} and {high}, not {value!r}")


def _check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or not value <= high:  # type: ignore[operator]
        bound = "(" if low_open else "["
        raise InvalidArgumentError(f"{name} must be a number in {bound}{low}, {high}], not {value!r}")


@dataclass
class AEOptions(Options):
    """Training options shared by the AE and the VAE (the AE uses exactly these)."""

    arch: str = "conv"
    latent_dim: int = 32
    epochs: int = 20
    batch_size: int = 256
    lr: float = DEFAULT_LR
    #: "cosine": the rate rises over the first WARMUP of the steps to ``lr``, then falls along a
    #: half cosine to 0 at the last step of ``epochs``; "constant": ``lr`` throughout.
    lr_schedule: str = LR_SCHEDULES[0]
    seed: int = 0
    val_fraction: float = 0.1
    likelihood: str = "bernoulli"
    # Denoising + contrastive training (chosen by benchmarks/ablation.py; README "Training defaults").
    augment: list[str] = field(default_factory=lambda: list(DEFAULT_AUGMENT))
    #: Weight of InfoNCE between two views' codes (0: off); unset, it follows ``augment``.
    consistency: float | None = None
    temperature: float = DEFAULT_TEMPERATURE

    def __post_init__(self) -> None:
        self.augment = parse_augment(self.augment)
        if self.consistency is None:
            self.consistency = DEFAULT_CONSISTENCY if self.augment else 0.0
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise InvalidArgumentError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.likelihood not in LIKELIHOODS:
            raise InvalidArgumentError(
                f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}"
            )
        _check_int("latent_dim", self.latent_dim, 1, 4096)
        _check_int("epochs", self.epochs, 1, 1_000_000)
        _check_int("batch_size", self.batch_size, 1, 1 << 20)
        _check_int("seed", self.seed, 0, 2**62)
        _check_float("lr", self.lr, 0.0, 10.0, low_open=True)
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidArgumentError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        _check_float("val_fraction", self.val_fraction, 0.0, 0.9)
        _check_float("consistency", self.consistency, 0.0, 1e6)
        _check_float("temperature", self.temperature, 0.0, 100.0, low_open=True)
        if self.consistency and not self.augment:
            raise InvalidArgumentError("--consistency compares two augmented views; turn on --augment too")

    def kl_weight(self, progress: float) -> float:
        """Weight of the KL term after ``progress`` epochs (the AE has no KL term)."""
        return 0.0

    def rate(self, progress: float) -> float:
        """The learning rate after ``progress`` of ``epochs`` epochs (a function of the step alone,
        so a resumed run continues on the same curve)."""
        if self.lr_schedule == "constant":
            return float(self.lr)
        share = min(1.0, progress / self.epochs)
        warm = min(1.0, share / WARMUP)
        return float(self.lr) * warm * 0.5 * (1.0 + math.cos(math.pi * share))


@dataclass
class VAEOptions(AEOptions):
    """The AE's options plus the weight of the KL term and its linear warm-up from 0."""

    beta: float = 1.0
    kl_warmup: int = 0

    def validate(self) -> None:
        super().validate()
        _check_float("beta", self.beta, 0.0, 1e6)
        _check_int("kl_warmup", self.kl_warmup, 0, 1_000_000)

    def kl_weight(self, progress: float) -> float:
        if self.kl_warmup <= 0:
            return float(self.beta)
        return float(self.beta) * min(1.0, progress / self.kl_warmup)


@dataclass
class EpochStats:
    """Per-image mean losses of one epoch (kl is 0 for the AE; val_* None without validation)."""

    epoch: int
    beta: float  # KL weight reached at the end of the epoch
    train_loss: float
    train_recon: float
    train_kl: float
    val_loss: float | None
    val_recon: float | None
    val_kl: float | None
    score: float  # what best-checkpoint selection minimises: val loss at full beta
    seconds: float
    train_nce: float = 0.0  # the consistency term (before its weight); 0 without it


@dataclass
class TrainReport:
    """What a run did, kept in the resume state and in the weights file's metadata."""

    train_images: int
    val_images: int
    device: str
    best_epoch: int = 0
    best_score: float | None = None
    resumed_from: int | None = None  # epoch the latest run continued from
    history: list[EpochStats] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainReport:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        kept["history"] = [EpochStats(**h) for h in values.get("history", [])]
        return cls(**kept)


def check_images(images: object, spec: InputSpec) -> np.ndarray:
    """Refuse anything but a ``(N, S, S, C)`` uint8 array matching ``spec``."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidArgumentError("images must be a uint8 numpy array of shape (N, S, S, C)")
    if images.ndim != 4 or images.shape[1:] != spec.shape:
        raise InvalidArgumentError(f"images have shape {images.shape}, expected (N, {', '.join(map(str, spec.shape))})")
    return images


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of range(n) into sorted (train, val) index tensors; val is empty if n < 2."""
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class _Data:
    """The training images on the host, handed out as (B, C, S, S) float batches on the device."""

    def __init__(self, images: np.ndarray, device: torch.device, jpeg_seed: int | None = None) -> None:
        self.device = device
        self.converted = images.size * 4 <= FLOAT_BUDGET
        self.store = self._keep(images)  # (N, S, S, C)
        # The JPEG copies of every image, made once per run (JPEG cannot be batched in torch).
        self.jpeg = None if jpeg_seed is None else self._keep(jpeg_pool(images, jpeg_seed))

    def _keep(self, images: np.ndarray) -> torch.Tensor:
        raw = from_numpy(images)  # (N, S, S, C) uint8, no copy
        return unit_float(raw) if self.converted else raw

    def batch(self, idx: torch.Tensor, jpeg: bool = False) -> torch.Tensor:
        store = self.jpeg if jpeg and self.jpeg is not None else self.store
        x = store[idx].to(self.device, non_blocking=True)  # (B, S, S, C)
        return x.permute(0, 3, 1, 2) if self.converted else images_to_tensor(x)  # (B, C, S, S)


def _fingerprint(images: np.ndarray) -> dict[str, Any]:
    """Identifies the training data, so a resume on other data is refused rather than mixed."""
    digest = hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()
    return {"images": len(images), "shape": list(images.shape[1:]), "sha256": digest}


def weights_meta(model: Autoencoder, options: AEOptions, report: TrainReport | None) -> dict[str, Any]:
    return {
        "config": model.config.to_dict(),
        "options": options.to_dict(),
        "report": report.to_dict() if report else None,
    }


def save_weights(path: Path, model: Autoencoder, options: AEOptions, report: TrainReport | None) -> None:
    """Write the model's weights (safetensors, atomically) with what is needed to rebuild it."""
    ckpt.write_tensors(path, model.state_dict(), weights_meta(model, options, report))


def load_weights(path: Path, config: ModelConfig, device: torch.device) -> tuple[Autoencoder, dict[str, Any]]:
    """Rebuild the network ``config`` describes from ``path``; ModelError if it does not fit."""
    tensors, meta = ckpt.read_tensors(path)
    saved = meta.get("config")
    if saved is not None and saved != config.to_dict():
        diff = ", ".join(
            f"{k} {saved.get(k)!r} (expected {v!r})" for k, v in config.to_dict().items() if saved.get(k) != v
        )
        raise ModelError(f"{path} was trained with other settings: {diff}")
    model = build_model(config, seed=0)
    ckpt.load_model_state(model, tensors, path)
    return model.to(device).eval(), meta


#: What a loss is measured in, by likelihood: each image's negative log-likelihood summed over its
#: pixels (the VAE's loss is its negative ELBO), averaged over the images.
LOSS_UNITS = {"bernoulli": "nats/image", "gaussian": "squared error/image"}


def _describe(stats: EpochStats, total: int, variational: bool, best: bool, unit: str, eta: float) -> str:
    def terms(loss: float, recon: float | None, kl: float | None) -> str:
        return f"{loss:.3f} (recon {recon:.3f} kl {kl:.3f})" if variational else f"{loss:.3f}"

    line = f"epoch {stats.epoch}/{total} train {terms(stats.train_loss, stats.train_recon, stats.train_kl)}"
    if stats.train_nce:
        line += f" nce {stats.train_nce:.3f}"
    if variational:
        line += f" beta {stats.beta:.3g}"
    if stats.val_loss is not None:
        line += f" val {terms(stats.val_loss, stats.val_recon, stats.val_kl)}"
    line += f" [{unit}] {stats.seconds:.1f}s"
    if stats.epoch < total:
        line += f" eta {_duration(eta)}"
    return line + (" *best" if best else "")


def _duration(seconds: float) -> str:
    """1m05s, 42s: the time left, as a person reads it."""
    whole = max(0, round(seconds))
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


class Trainer:
    """One training run: model, optimizer, random generators, data split and report."""

    def __init__(self, images: np.ndarray, spec: InputSpec, options: AEOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.variational = isinstance(options, VAEOptions)
        self.config = ModelConfig(options.arch, spec.image_size, spec.channels, options.latent_dim, self.variational)
        self.device = pick_device()
        self.fingerprint = _fingerprint(images)
        self.data = _Data(images, self.device, options.seed + 5 if "jpeg" in options.augment else None)
        self.train_idx, self.val_idx = split_indices(len(images), options.val_fraction, options.seed)
        self.model = build_model(self.config, options.seed).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=options.lr)
        # Separate streams for shuffling and for the VAE's noise, both saved in the resume state.
        self.shuffle_gen = torch.Generator().manual_seed(options.seed + 1)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(options.seed + 2)
        self.augment_gen = torch.Generator().manual_seed(options.seed + 4)
        self.report = TrainReport(len(self.train_idx), len(self.val_idx), str(self.device))
        self.best_state: dict[str, torch.Tensor] | None = None

    def fit(self, resume: bool) -> TrainReport:
        ckpt.remove_stale_temps(self.workdir)
        start = self._restore() if resume else 0
        if not resume:
            ckpt.clear_resume(self.workdir)
        total = self.options.epochs
        if start >= total:
            log.info("the resume state is already at epoch %d of %d; nothing to train", start, total)
        for epoch in range(start + 1, total + 1):
            stats = self._epoch(epoch)
            if not math.isfinite(stats.train_loss):
                raise ModelError(f"training diverged at epoch {epoch} (loss {stats.train_loss}); lower lr")
            self.report.history.append(stats)
            best = self.report.best_score is None or stats.score < self.report.best_score
            done = [h.seconds for h in self.report.history if h.epoch > start]  # this run's epochs only
            eta = sum(done) / len(done) * (total - epoch)
            unit = LOSS_UNITS[self.options.likelihood]
            log.info("%s", _describe(stats, total, self.variational, best, unit, eta))
            if best:
                self.report.best_epoch, self.report.best_score = epoch, stats.score
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                save_weights(self.workdir / WEIGHTS_FILE, self.model, self.options, self.report)
            self._save_resume(epoch)
        self._load_best()
        return self.report

    def _epoch(self, epoch: int) -> EpochStats:
        started = time.perf_counter()
        loss, recon, kl, nce = self._train_pass(epoch)
        full_beta = self.options.kl_weight(math.inf)
        val: tuple[float | None, float | None, float | None] = (None, None, None)  # loss, recon, kl
        if len(self.val_idx):
            val = self._val_pass(full_beta)
        # Select at the final beta: during KL warm-up the running loss falls just because beta is small.
        score = val[0] if val[0] is not None else recon + full_beta * kl
        return EpochStats(
            epoch,
            self.options.kl_weight(epoch),
            loss,
            recon,
            kl,
            *val,
            score=score,
            seconds=time.perf_counter() - started,
            train_nce=nce,
        )

    def _train_pass(self, epoch: int) -> tuple[float, float, float, float]:
        self.model.train()
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=self.shuffle_gen)]  # (n_train,)
        size = self.options.batch_size
        steps = math.ceil(len(order) / size)
        sums = torch.zeros(4, device=self.device)  # per-image sums of (total, recon, kl, nce)
        epoch_bar = bar(steps, f"epoch {epoch}/{self.options.epochs}", unit="batch")
        for step in range(steps):
            idx = order[step * size : (step + 1) * size]
            progress = epoch - 1 + step / steps  # in epochs
            beta = self.options.kl_weight(progress)  # ramps within epochs too
            for group in self.optimizer.param_groups:
                group["lr"] = self.options.rate(progress + 1 / steps)  # > 0 from the first step
            total, recon, kl, nce = self._step_loss(idx, beta, self.noise_gen, self.augment_gen)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            sums += torch.stack((total, recon, kl, nce)).detach() * len(idx)
            epoch_bar.update(1)
        epoch_bar.close()
        loss, recon, kl, nce = (sums / len(order)).tolist()
        return loss, recon, kl, nce

    def _step_loss(
        self, idx: torch.Tensor, beta: float, noise: torch.Generator, augment: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        """(total, recon, kl, nce) of one batch: batch means of per-image terms, nce unweighted."""
        x = self.data.batch(idx)  # (B, C, S, S), also the target
        opts = self.options
        if not opts.augment:
            terms = self.model.loss(x, opts.likelihood, beta, noise)
            return terms.total, terms.recon, terms.kl, torch.zeros((), device=x.device)
        copies = self.data.batch(idx, jpeg=True) if self.data.jpeg is not None else None
        views = 2 if opts.consistency else 1
        # Both views go through one forward pass (batch norm sees them together), each
        # reconstructing the clean image.
        inputs = torch.cat([augment_batch(x, opts.augment, augment, copies) for _ in range(views)])
        recon, kl, code = self.model.terms(inputs, x.repeat(views, 1, 1, 1), opts.likelihood, noise)
        recon, kl = recon.mean(), kl.mean()  # (vB,) -> ()
        nce = (
            info_nce(code[: len(x)], code[len(x) :], opts.temperature)
            if views == 2
            else torch.zeros((), device=x.device)
        )
        return recon + beta * kl + (opts.consistency or 0.0) * nce, recon, kl, nce

    @torch.inference_mode()
    def _val_pass(self, beta: float) -> tuple[float, float, float]:
        """The training objective on the validation images (with augmentation: on seeded views), so
        that the best checkpoint is the best at what training optimises, consistency term included."""
        self.model.eval()
        # The same noise and views every epoch, so that epochs are compared on equal terms.
        noise = torch.Generator(device=self.device).manual_seed(self.options.seed + 3)
        augment = torch.Generator().manual_seed(self.options.seed + 6)
        # InfoNCE's value depends on the number of negatives: validate in training-sized batches.
        size = self.options.batch_size if self.options.consistency else EVAL_BATCH
        sums = torch.zeros(3, device=self.device)
        for start in range(0, len(self.val_idx), size):
            idx = self.val_idx[start : start + size]
            total, recon, kl, _ = self._step_loss(idx, beta, noise, augment)
            sums += torch.stack((total, recon, kl)) * len(idx)
        loss, recon, kl = (sums / len(self.val_idx)).tolist()
        return loss, recon, kl

    def _save_resume(self, epoch: int) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim_tensors, optim_rest = ckpt.optimizer_to_tensors(self.optimizer)
        tensors.update(optim_tensors)
        tensors["rng.shuffle"] = self.shuffle_gen.get_state()
        tensors["rng.noise"] = self.noise_gen.get_state()
        tensors["rng.augment"] = self.augment_gen.get_state()
        state = {
            "options": self.options.to_dict(),
            "config": self.config.to_dict(),
            "data": self.fingerprint,
            "optimizer": optim_rest,
            "report": self.report.to_dict(),
        }
        ckpt.write_resume(self.workdir, epoch, tensors, state)

    def _restore(self) -> int:
        """Load the resume state if there is one; return the epoch it was saved after (0: none)."""
        saved = ckpt.read_resume(self.workdir)
        if saved is None:
            log.info("no resume state in %s; training from the start", self.workdir)
            return 0
        doc, tensors = saved
        self._check_same_run(doc)
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        ckpt.load_model_state(self.model, model_state, self.workdir / str(doc["tensors"]))
        try:
            ckpt.optimizer_from_tensors(self.optimizer, tensors, doc["optimizer"])
            self.shuffle_gen.set_state(tensors["rng.shuffle"])
            self.noise_gen.set_state(tensors["rng.noise"])
            self.augment_gen.set_state(tensors["rng.augment"])
            report = TrainReport.from_dict(doc["report"])
            epoch = int(doc["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"the resume state in {self.workdir} is incomplete ({exc!r}); train without resume"
            ) from None
        self.report = report
        self.report.resumed_from = epoch
        log.info(
            "resuming after epoch %d of %d (best so far: epoch %d)", epoch, self.options.epochs, self.report.best_epoch
        )
        return epoch

    def _check_same_run(self, doc: dict[str, Any]) -> None:
        """Only ``epochs`` may change on resume; anything else would make a different run."""
        old, new = dict(doc.get("options", {})), self.options.to_dict()
        old.pop("epochs", None)
        new.pop("epochs", None)
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if doc.get("config") != self.config.to_dict():
            diff.append("model shape")
        if doc.get("data") != self.fingerprint:
            diff.append("training images")
        if diff:
            raise ModelError(f"cannot resume: the saved run differs in {', '.join(diff)}; train without resume")

    def _load_best(self) -> None:
        if self.best_state is None:  # nothing improved in this run: the best is on disk
            path = self.workdir / WEIGHTS_FILE
            tensors, _ = ckpt.read_tensors(path)
            ckpt.load_model_state(self.model, tensors, path)
        else:
            self.model.load_state_dict(self.best_state)
        self.model.eval()


def train(
    images: np.ndarray, spec: InputSpec, options: AEOptions, workdir: Path, resume: bool = False
) -> tuple[Autoencoder, TrainReport]:
    """Train an AE (``AEOptions``) or a VAE (``VAEOptions``) on ``(N, S, S, C)`` uint8 images.

    Checkpoints go to ``workdir``; the returned model holds the best weights, in eval mode.
    """
    if not isinstance(options, AEOptions):
        raise InvalidArgumentError("train takes AEOptions or VAEOptions")
    check_images(images, spec)
    if len(images) == 0:
        raise InvalidArgumentError("there are no images to train on")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    use_all_cores()
    keep_freed_memory()
    trainer = Trainer(images, spec, options, workdir)
    report = trainer.fit(resume)
    return trainer.model, report
