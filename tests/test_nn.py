"""The AE and VAE: models, training, checkpoints, resume and the Encoder adapters.

Everything runs on the CPU on a handful of images drawn here with numpy, so the module takes
seconds. No real data set is used.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedsearch.data.images import InputSpec
from embedsearch.encoders.base import WEIGHTS_FILE, encoder_class
from embedsearch.encoders.nn import checkpoint
from embedsearch.encoders.nn.encoder import AEEncoder, VAEEncoder
from embedsearch.encoders.nn.models import ModelConfig, build_model, kl_divergence, reconstruction_loss, reparameterize
from embedsearch.encoders.nn.train import AEOptions, Trainer, VAEOptions, train
from embedsearch.errors import InvalidArgumentError, ModelError
from helpers import fit, shapes

pytestmark = pytest.mark.no_store  # never opens a library

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """These models are tiny: one thread is as fast, and far faster when other jobs share the cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# -- models ------------------------------------------------------------------------------------


def test_kl_is_exactly_zero_at_the_prior_and_positive_elsewhere() -> None:
    zeros = torch.zeros(4, 8)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(4))
    gen = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    assert (kl_divergence(mu, logvar) > 0).all()
    assert (kl_divergence(zeros, logvar) > 0).all()  # a variance other than 1 costs too


def test_vae_mean_is_deterministic_but_samples_are_not() -> None:
    model = build_model(ModelConfig("conv", 28, 1, 8, variational=True), seed=0).eval()
    x = torch.from_numpy(shapes(4, 28, 1)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        assert torch.equal(model.encode(x), model.encode(x))
        mu, logvar = model.encode_dist(x)
        assert torch.equal(mu, model.encode(x))
        gen = torch.Generator().manual_seed(1)
        z1, z2 = reparameterize(mu, logvar, gen), reparameterize(mu, logvar, gen)
        assert not torch.equal(z1, z2)
        # ... but a generator seeded alike draws alike: sampling is reproducible.
        assert torch.equal(z1, reparameterize(mu, logvar, torch.Generator().manual_seed(1)))


def test_same_seed_same_initial_weights_and_global_rng_untouched() -> None:
    config = ModelConfig("mlp", 28, 1, 8, variational=False)
    before = torch.get_rng_state()
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=False))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_reconstruction_loss_is_summed_per_image(likelihood: str) -> None:
    x = torch.rand(3, 1, 4, 4)
    loss = reconstruction_loss(torch.zeros(3, 1, 4, 4), x, likelihood)  # logits 0 = 0.5 everywhere
    assert loss.shape == (3,)
    expected = 16 * np.log(2) if likelihood == "bernoulli" else ((x - 0.5) ** 2).sum(dim=(1, 2, 3))
    assert torch.allclose(loss, torch.as_tensor(expected, dtype=torch.float32).expand(3))


def test_conv_refuses_a_size_that_is_not_a_multiple_of_4(tmp_path: Path) -> None:
    images = shapes(8, 30, 1)
    with pytest.raises(InvalidArgumentError, match="multiple of 4"):
        fit(AEEncoder, images, tmp_path)
    assert fit(AEEncoder, images, tmp_path, arch="mlp", epochs=1).encode(images).shape == (8, 8)


# -- training ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cls", [AEEncoder, VAEEncoder])
def test_tiny_model_overfits_a_handful_of_images(cls: type, tmp_path: Path) -> None:
    # Binary images, so that the Bernoulli loss can fall towards 0 (grey pixels have an entropy floor);
    # each image 16 times per epoch, so that few epochs (and checkpoints) give many steps.
    images = shapes(8, 28, 1, binary=True)
    options = {"latent_dim": 16, "epochs": 5, "lr": 3e-3, "val_fraction": 0.0}
    if cls is VAEEncoder:
        options["beta"] = 0.05  # a little KL still lets 8 images be told apart
    enc = fit(cls, np.repeat(images, 16, axis=0), tmp_path, **options)
    history = enc.report.history
    assert history[-1].train_recon < history[0].train_recon / 5
    err = np.abs(enc.reconstruct(images).astype(int) - images).mean()
    assert err < 10, err  # out of 255


def test_options_round_trip_and_validate() -> None:
    opts = VAEOptions(arch="mlp", latent_dim=4, beta=0.5, kl_warmup=3)
    assert VAEOptions.from_dict(opts.to_dict()) == opts
    assert AEOptions.from_dict(AEOptions().to_dict()) == AEOptions()
    with pytest.raises(InvalidArgumentError, match="beta"):
        AEOptions.from_dict({"beta": 2.0})  # the AE has no KL term to weigh
    for bad in (
        {"arch": "resnet"},
        {"latent_dim": 0},
        {"lr": -1.0},
        {"val_fraction": 1.0},
        {"likelihood": "poisson"},
        {"epochs": 0},
    ):
        with pytest.raises(InvalidArgumentError):
            AEOptions(**bad)  # type: ignore[arg-type]
    assert [VAEOptions(beta=2.0, kl_warmup=4).kl_weight(e) for e in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0]
    assert AEOptions().kl_weight(5) == 0.0


def test_the_cosine_schedule_warms_up_to_the_peak_then_falls_to_zero_and_constant_stays() -> None:
    cosine = AEOptions(epochs=10, lr=4e-3, lr_schedule="cosine")
    assert (AEOptions().lr_schedule, AEOptions().lr) == ("constant", 1e-3)
    rates = [cosine.rate(p / 100) for p in range(1, 1001)]  # 100 steps an epoch
    peak = rates.index(max(rates))
    assert 45 <= peak <= 55 and max(rates) == pytest.approx(4e-3, rel=0.01)  # 5 % of 1,000 steps
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak], strict=False))  # rises
    assert all(a > b for a, b in zip(rates[peak:-1], rates[peak + 1 :], strict=True))  # then falls
    assert rates[0] > 0 and rates[-1] == pytest.approx(0.0, abs=1e-12)
    constant = AEOptions(epochs=10, lr=1e-3, lr_schedule="constant")
    assert {constant.rate(p / 10) for p in range(1, 101)} == {1e-3}
    assert AEOptions.from_dict(constant.to_dict()) == constant
    with pytest.raises(InvalidArgumentError, match="lr_schedule"):
        AEOptions(lr_schedule="step")


def test_training_runs_at_the_scheduled_rate(tmp_path: Path) -> None:
    """The optimiser's rate follows the options' curve: at the last step, nearly 0 (cosine), or lr."""
    images = shapes(16, 28, 1)
    for schedule, last in (("cosine", 4e-3 * 0.5 * (1 + math.cos(math.pi))), ("constant", 4e-3)):
        options = AEOptions(latent_dim=4, epochs=2, batch_size=8, val_fraction=0.0, lr=4e-3, lr_schedule=schedule)
        options.augment, options.consistency = [], 0.0
        trainer = Trainer(images, InputSpec(28, 1), options, tmp_path / schedule)
        trainer.fit(resume=False)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(last, abs=1e-12)


def test_training_logs_one_line_per_epoch_and_keeps_the_best(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="embedsearch.encoders.nn.train"):
        enc = fit(VAEEncoder, shapes(12, 28, 1), tmp_path, epochs=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 3
    assert all(" val " in line and "kl" in line and line.split()[-1].endswith(("s", "*best")) for line in lines)
    assert all("[nats/image]" in line for line in lines)  # a VAE's loss: negative ELBO, nats per image
    assert [" eta " in line for line in lines] == [True, True, False]  # the time left, until the last epoch
    report = enc.report
    assert (report.train_images, report.val_images) == (9, 3)
    assert report.best_score == min(h.val_loss for h in report.history)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / checkpoint.RESUME_JSON).is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_same_seed_same_result(tmp_path: Path) -> None:
    images = shapes(8, 28, 1)
    a = fit(VAEEncoder, images, tmp_path / "a").encode(images)
    b = fit(VAEEncoder, images, tmp_path / "b").encode(images)
    assert np.array_equal(a, b)


# -- resume ------------------------------------------------------------------------------------


def test_resume_trains_only_the_missing_epochs_and_matches_a_straight_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A constant rate: a cosine schedule ends where --epochs says, so a run extended on resume follows
    # another curve than a straight one (an interrupted cosine run resumes on its own, checked below).
    images = shapes(8, 28, 1)
    straight = fit(VAEEncoder, images, tmp_path / "straight", epochs=4, lr_schedule="constant")
    fit(VAEEncoder, images, tmp_path / "split", epochs=2, lr_schedule="constant")
    spec = InputSpec(28, 1)
    options = VAEOptions(latent_dim=8, epochs=4, batch_size=8, val_fraction=0.25, lr_schedule="constant")
    with caplog.at_level(logging.INFO, logger="embedsearch.encoders.nn.train"):
        caplog.clear()  # only the resumed run's epochs (an earlier CLI test may have set INFO already)
        resumed = VAEEncoder.fit(images, spec, options, tmp_path / "split", resume=True)
    trained = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert trained == ["3/4", "4/4"]
    assert resumed.report.resumed_from == 2
    assert [h.epoch for h in resumed.report.history] == [1, 2, 3, 4]
    assert np.array_equal(resumed.encode(images), straight.encode(images))


def test_interrupted_run_keeps_its_last_epoch_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = shapes(8, 28, 1)
    real_epoch = Trainer._epoch

    def interrupted(self: Trainer, epoch: int):  # type: ignore[no-untyped-def]
        if epoch == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third epoch
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(AEEncoder, images, tmp_path, epochs=4)
    assert json.loads((tmp_path / checkpoint.RESUME_JSON).read_text())["epoch"] == 2
    assert AEEncoder.load(tmp_path, InputSpec(28, 1), 8, AEOptions(latent_dim=8)).encode(images).shape == (8, 8)
    monkeypatch.setattr(Trainer, "_epoch", real_epoch)
    options = AEOptions(latent_dim=8, epochs=4, batch_size=8, val_fraction=0.25)
    resumed = AEEncoder.fit(images, InputSpec(28, 1), options, tmp_path, resume=True)
    assert [h.epoch for h in resumed.report.history] == [1, 2, 3, 4]
    assert len(list(tmp_path.glob("resume-*.safetensors"))) == 1


def test_an_interrupted_cosine_run_resumes_on_its_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = shapes(8, 28, 1)
    straight = fit(AEEncoder, images, tmp_path / "straight", epochs=4, lr_schedule="cosine")
    real_epoch = Trainer._epoch

    def interrupted(self: Trainer, epoch: int):  # type: ignore[no-untyped-def]
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(AEEncoder, images, tmp_path / "split", epochs=4, lr_schedule="cosine")
    monkeypatch.setattr(Trainer, "_epoch", real_epoch)
    options = AEOptions(latent_dim=8, epochs=4, batch_size=8, val_fraction=0.25, lr_schedule="cosine")
    resumed = AEEncoder.fit(images, InputSpec(28, 1), options, tmp_path / "split", resume=True)
    assert resumed.report.resumed_from == 2
    assert np.array_equal(resumed.encode(images), straight.encode(images))  # the same curve, resumed


def test_resume_refuses_other_data_or_settings(tmp_path: Path) -> None:
    fit(AEEncoder, shapes(8, 28, 1), tmp_path, epochs=1)
    spec = InputSpec(28, 1)
    with pytest.raises(ModelError, match="training images"):
        train(
            shapes(8, 28, 1, seed=9),
            spec,
            AEOptions(latent_dim=8, epochs=2, batch_size=8, val_fraction=0.25),
            tmp_path,
            resume=True,
        )
    with pytest.raises(ModelError, match="lr"):
        train(
            shapes(8, 28, 1),
            spec,
            AEOptions(latent_dim=8, epochs=2, batch_size=8, val_fraction=0.25, lr=0.1),
            tmp_path,
            resume=True,
        )


# -- the Encoder adapters ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3)])
@pytest.mark.parametrize("cls", [AEEncoder, VAEEncoder])
def test_both_architectures_work_for_grey_and_colour(
    cls: type, arch: str, size: int, channels: int, tmp_path: Path
) -> None:
    images = shapes(8, size, channels)
    enc = fit(cls, images, tmp_path, arch=arch, epochs=1)
    vectors = enc.encode(images)
    assert vectors.shape == (8, 8) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    decoded = enc.decode(vectors[:3])
    assert decoded.shape == (3, size, size, channels) and decoded.dtype == np.uint8
    assert enc.reconstruct(images).shape == images.shape
    assert enc.encode(images[:0]).shape == (0, 8)
    if cls is VAEEncoder:
        mu, logvar = enc.encode_dist(images)
        assert np.array_equal(mu, vectors) and logvar.shape == (8, 8)


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_save_load_round_trip_gives_identical_vectors(kind: str, tmp_path: Path) -> None:
    cls = encoder_class(kind)
    images = shapes(8, 32, 3)
    enc = fit(cls, images, tmp_path / "train")
    path = enc.save(tmp_path / "model")
    assert path == tmp_path / "model" / WEIGHTS_FILE
    loaded = cls.load(tmp_path / "model", InputSpec(32, 3), 8, enc.options)
    assert np.array_equal(loaded.encode(images), enc.encode(images))
    summary = loaded.summary()
    assert summary == json.loads(json.dumps(summary))  # fit for config.json
    assert summary["kind"] == kind and summary["epochs_trained"] == 2 and summary["train_images"] == 6
    assert ("beta" in summary) == (kind == "vae")


def test_missing_corrupt_or_mismatched_weights_are_refused(tmp_path: Path) -> None:
    images = shapes(8, 28, 1)
    enc = fit(AEEncoder, images, tmp_path)
    spec, options = InputSpec(28, 1), enc.options
    path = tmp_path / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        AEEncoder.load(tmp_path, spec, 8, options)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="corrupt or truncated"):
        AEEncoder.load(tmp_path, spec, 8, options)
    path.unlink()
    with pytest.raises(ModelError, match="missing"):
        AEEncoder.load(tmp_path, spec, 8, options)
    path.write_bytes(data)
    with pytest.raises(ModelError, match="latent_dim"):
        AEEncoder.load(tmp_path, spec, 16, AEOptions(latent_dim=16))
    with pytest.raises(ModelError):
        VAEEncoder.load(tmp_path, spec, 8, VAEOptions(latent_dim=8))  # an AE file is no VAE


def test_encode_refuses_wrong_input(tmp_path: Path) -> None:
    enc = fit(AEEncoder, shapes(8, 28, 1), tmp_path, epochs=1)
    with pytest.raises(InvalidArgumentError):
        enc.encode(shapes(2, 32, 1))
    with pytest.raises(InvalidArgumentError):
        enc.encode(shapes(2, 28, 1).astype(np.float32))
    with pytest.raises(InvalidArgumentError):
        enc.decode(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(InvalidArgumentError):
        AEEncoder.fit(shapes(8, 28, 1), InputSpec(28, 1), VAEOptions(), tmp_path)


def test_importing_the_package_does_not_import_torch() -> None:
    code = (
        "import sys, embedsearch, embedsearch.encoders.nn, embedsearch.encoders.base; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_encoding_beside_busy_workers_uses_one_thread_and_gives_the_same_vectors() -> None:
    enc = AEEncoder(InputSpec(28, 1), 8, AEOptions(latent_dim=8), build_model(ModelConfig("conv", 28, 1, 8, False), 0))
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = enc.encode(images)
        with enc.sharing_cores():
            assert torch.get_num_threads() == 1
            got = enc.encode(images)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
