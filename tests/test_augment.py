"""Augmentation-consistent training: seeded batch augmentation, the InfoNCE term, and training with both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedsearch.data.images import InputSpec
from embedsearch.encoders.nn.augment import augment_batch, info_nce, jpeg_pool
from embedsearch.encoders.nn.encoder import AEEncoder, VAEEncoder
from embedsearch.encoders.nn.models import ModelConfig, build_model
from embedsearch.encoders.nn.recipe import DEFAULT_AUGMENT, OPERATIONS, parse_augment
from embedsearch.encoders.nn.train import AEOptions, VAEOptions
from embedsearch.errors import InvalidArgumentError
from helpers import fit, shapes

pytestmark = pytest.mark.no_store  # never opens a library


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def batch(channels: int = 1, n: int = 6, size: int = 28) -> torch.Tensor:
    images = shapes(n, size, channels)  # (N, S, S, C) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, C, S, S)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", OPERATIONS)
def test_each_operation_is_seeded_changes_the_image_and_keeps_shape_and_range(name: str, channels: int) -> None:
    x = batch(channels, n=16)
    copies = torch.from_numpy(jpeg_pool(shapes(16, 28, channels), seed=0)).permute(0, 3, 1, 2).float() / 255.0

    def view(seed: int) -> torch.Tensor:
        return augment_batch(x, [name], torch.Generator().manual_seed(seed), copies)

    a, b, other = view(1), view(1), view(2)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert float((a - x).abs().mean()) > 1e-3  # the images changed ...
    assert float((a - x).abs().mean()) < 0.25  # ... but are still near copies


def test_no_operation_leaves_the_batch_alone_and_flip_is_only_used_when_asked() -> None:
    x = batch()
    assert torch.equal(augment_batch(x, [], torch.Generator().manual_seed(0)), x)
    assert "flip" not in DEFAULT_AUGMENT
    assert "flip" not in AEOptions().augment


def test_parse_augment_names_default_none_and_refuses_unknown() -> None:
    assert parse_augment("default") == list(DEFAULT_AUGMENT)
    assert parse_augment("noise,crop") == ["crop", "noise"]  # canonical order
    assert parse_augment(["none"]) == [] and parse_augment("") == []
    assert parse_augment("default,jpeg") == [*[n for n in OPERATIONS if n in (*DEFAULT_AUGMENT, "jpeg")]]
    with pytest.raises(InvalidArgumentError, match="unknown augmentation 'sepia'"):
        parse_augment("crop,sepia")


def test_options_resolve_consistency_from_augment_and_refuse_contradictions() -> None:
    assert AEOptions().consistency > 0 and AEOptions().augment == list(DEFAULT_AUGMENT)
    plain = AEOptions(augment="none")
    assert plain.augment == [] and plain.consistency == 0.0
    assert AEOptions.from_dict(AEOptions(augment="crop,jpeg").to_dict()) == AEOptions(augment=["crop", "jpeg"])
    with pytest.raises(InvalidArgumentError, match="turn on --augment"):
        AEOptions(augment="none", consistency=5.0)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        AEOptions(temperature=0.0)


def test_jpeg_pool_is_seeded_and_lossy() -> None:
    images = shapes(8, 28, 3)
    a, b = jpeg_pool(images, 3), jpeg_pool(images, 3)
    assert np.array_equal(a, b) and a.shape == images.shape and a.dtype == np.uint8
    assert 0 < np.abs(a.astype(int) - images).mean() < 20


def test_info_nce_is_lower_for_matching_views_than_for_shuffled_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 8, generator=gen)
    b = a + 0.1 * torch.randn(32, 8, generator=gen)  # the second view's codes: close to the first's
    matched, shuffled = info_nce(a, b, 0.2), info_nce(a, b[torch.randperm(32, generator=gen)], 0.2)
    assert float(matched) < 1.0 < 3.0 < float(shuffled)  # log(32) = 3.47 is chance level
    assert float(info_nce(a, 3.0 * b, 0.2)) == pytest.approx(float(matched), rel=1e-5)  # scale-free


def test_a_training_step_with_the_consistency_term_brings_two_views_closer() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig("conv", 28, 1, 8, False), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, names = batch(n=32), ["crop", "brightness", "noise"]

    def views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return augment_batch(x, names, gen), augment_batch(x, names, gen)

    def agreement() -> float:
        """Cosine of two views of one image minus that of two images, on views the steps never saw.

        Relative, because an untrained network maps every image to nearly the same direction.
        """
        model.eval()
        with torch.inference_mode():
            a, b = views(999)
            cos = (
                torch.nn.functional.normalize(model.encode(a), dim=1)
                @ torch.nn.functional.normalize(model.encode(b), dim=1).T
            )  # (B, B)
            same = cos.diagonal().mean()
            other = (cos.sum() - cos.diagonal().sum()) / (len(cos) ** 2 - len(cos))
            return float(same - other)

    before = agreement()
    model.train()
    for step in range(20):
        a, b = views(step)
        loss = info_nce(model.encode(a), model.encode(b), 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert agreement() > before + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("cls", [AEEncoder, VAEEncoder])
def test_augmented_consistent_training_still_overfits_a_handful_of_images(cls: type, tmp_path: Path) -> None:
    images = shapes(8, 28, 1, binary=True)
    options: dict[str, object] = {
        "latent_dim": 16,
        "epochs": 6,
        "lr": 3e-3,
        "val_fraction": 0.0,
        "augment": "crop,shift,rotate,brightness,blur,noise,jpeg",
        "consistency": 1.0,
    }
    if cls is VAEEncoder:
        options["beta"] = 0.05
    enc = fit(cls, np.repeat(images, 16, axis=0), tmp_path, **options)
    history = enc.report.history
    assert all(h.train_nce > 0 for h in history)
    assert history[-1].train_recon < history[0].train_recon / 3
    err = np.abs(enc.reconstruct(images).astype(int) - images).mean()
    assert err < 20, err  # out of 255: the clean images come back, not their augmented views


@pytest.mark.slow
def test_vae_mu_stays_deterministic_after_augmented_training(tmp_path: Path) -> None:
    images = shapes(24, 28, 1)
    enc = fit(VAEEncoder, images, tmp_path, augment="default", consistency=10.0)
    assert isinstance(enc.options, VAEOptions) and enc.options.augment == list(DEFAULT_AUGMENT)
    first, second = enc.encode(images), enc.encode(images)
    assert np.array_equal(first, second)
    spec = InputSpec(28, 1)
    again = VAEEncoder.load(tmp_path, spec, enc.dim, enc.options)
    assert np.allclose(again.encode(images), first, atol=1e-6)
