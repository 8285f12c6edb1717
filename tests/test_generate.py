"""VAE generation: prior, near an image, between two images; search, --add, exclusion and removal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch.cli.main import main
from embedsearch.core.generate import interpolate
from embedsearch.engine import Engine
from embedsearch.errors import ModelError


@pytest.fixture(autouse=True)
def no_generated_images_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tests share the module's ``trained`` library: what one generates into it goes afterwards."""
    yield
    if "trained" in request.fixturenames:
        request.getfixturevalue("trained").remove_generated()


def first_image(data: Path, shape: str = "circle") -> str:
    return str(sorted((data / shape).iterdir())[0])


def test_a_fixed_seed_gives_identical_candidates(trained: Engine) -> None:
    a = trained.generate("vae", n=6, seed=3)
    b = trained.generate("vae", n=6, seed=3)
    c = trained.generate("vae", n=6, seed=4)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.candidates, b.candidates, strict=False))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a.candidates, c.candidates, strict=False))
    assert a.candidates[0].image.shape == (28, 28, 1)


def test_temperature_zero_decodes_the_prior_mean(trained: Engine) -> None:
    gen = trained.generate("vae", n=3, seed=1, temperature=0.0)
    assert all(v == 0.0 for c in gen.candidates for v in c.latent)
    assert np.array_equal(gen.candidates[0].image, trained.encoder("vae").decode(np.zeros((1, 8)))[0])


def test_near_with_spread_zero_decodes_exactly_mu(trained: Engine, trained_data: Path) -> None:
    source = first_image(trained_data)
    gen = trained.generate("vae", n=4, seed=0, near=source, spread=0.0)
    encoder = trained.encoder("vae")
    mu = encoder.encode(encoder_input(trained, source))
    assert np.allclose(np.array([c.latent for c in gen.candidates]), mu)
    assert all(np.array_equal(c.image, encoder.decode(mu)[0]) for c in gen.candidates)
    spread = trained.generate("vae", n=4, seed=0, near=source, spread=1.0)
    assert not np.allclose(np.array([c.latent for c in spread.candidates]), mu)


def encoder_input(engine: Engine, path: str) -> np.ndarray:
    from embedsearch.data.images import decode_file

    return decode_file(path, engine.encoder("vae").spec)[1][None]


@pytest.mark.parametrize("model, slerp", [("vae", False), ("vae", True), ("ae", False), ("ae", True)])
def test_interpolation_endpoints_decode_the_two_codes(
    trained: Engine, trained_data: Path, model: str, slerp: bool
) -> None:
    a, b = first_image(trained_data, "circle"), first_image(trained_data, "star")
    gen = trained.generate(model, between=(a, b), steps=5, slerp=slerp)
    encoder = trained.encoder(model)
    za, zb = encoder.encode(np.concatenate([encoder_input(trained, a), encoder_input(trained, b)]))
    assert len(gen.candidates) == 5 and gen.mode == "between"
    assert np.allclose(gen.candidates[0].latent, za, atol=1e-5) and np.allclose(
        gen.candidates[-1].latent, zb, atol=1e-5
    )
    assert np.array_equal(gen.candidates[0].image, encoder.decode(za[None])[0])


def test_slerp_keeps_the_norm_between_equal_norm_codes() -> None:
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    path = interpolate(a, b, 5, slerp=True)
    assert np.allclose(np.linalg.norm(path, axis=1), 1.0, atol=1e-6)
    assert np.allclose(interpolate(a, b, 3)[1], [0.5, 0.5])


@pytest.mark.parametrize("kwargs", [{}, {"near": "x.png"}])
def test_ae_refuses_prior_and_near_with_a_reason(trained: Engine, kwargs: dict) -> None:
    with pytest.raises(ModelError, match="plain autoencoder.*no prior"):
        trained.generate("ae", n=2, **kwargs)


def test_models_without_decoder_are_refused(trained: Engine) -> None:
    with pytest.raises(ModelError, match="no decoder"):
        trained.generate("pixels", n=2)


def test_search_add_exclusion_and_removal(trained: Engine) -> None:
    gen = trained.generate("vae", n=4, seed=7, search_k=3, add=True)
    assert all(len(c.neighbours) == 3 and c.id is not None for c in gen.candidates)
    ids = {c.id for c in gen.candidates}
    record = trained.image(gen.candidates[0].id)
    assert record.generated and record.provenance["mode"] == "prior" and record.provenance["seed"] == 7
    assert Path(record.path).is_relative_to(trained.home / "generated")
    probe = trained.search_image(gen.candidates[0].id, "vae", k=60)
    assert not ids & {n.id for n in probe}  # left out by default ...
    assert gen.candidates[0].id in {
        n.id for n in trained.search_image(gen.candidates[0].id, "vae", k=60, include_generated=True)
    }  # ... unless asked
    assert trained.remove_generated() == len(ids)
    assert not Path(record.path).exists() and trained.stats()["generated"] == 0


def test_cli_generate_grid_out_json_and_remove(trained: Engine, tmp_path: Path) -> None:
    home = trained.home
    args = [
        "--home",
        str(home),
        "generate",
        "--model",
        "vae",
        "-n",
        "3",
        "--seed",
        "5",
        "--search",
        "-k",
        "2",
        "--grid",
        str(tmp_path / "g.png"),
        "--out",
        str(tmp_path / "out"),
        "--json",
        "--add",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mode"] == "prior" and len(payload["candidates"]) == 3
    assert len(payload["candidates"][0]["latent"]) == 8 and len(payload["candidates"][0]["neighbours"]) == 2
    sidecars = sorted((tmp_path / "out").glob("*.json"))
    assert len(sidecars) == 3 and json.loads(sidecars[0].read_text())["model"] == "vae"
    assert (tmp_path / "g.png").stat().st_size > 0
    bad = CliRunner().invoke(main, ["--home", str(home), "generate", "--model", "ae", "-n", "2"])
    assert bad.exit_code == 1 and "plain autoencoder" in bad.stderr
    removed = CliRunner().invoke(main, ["--home", str(home), "remove", "--generated"])
    assert "removed 3 images" in removed.stdout


def test_reconstruct_writes_originals_above_reconstructions(
    trained: Engine, trained_data: Path, tmp_path: Path
) -> None:
    home, data = trained.home, trained_data
    images = [first_image(data, "circle"), first_image(data, "star")]
    out = tmp_path / "recon.png"
    result = CliRunner().invoke(
        main, ["--home", str(home), "reconstruct", *images, "--model", "vae", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(out) as im:
        assert im.width > 2 * 28 and im.height > 2 * 28
    with Engine(home) as engine:
        originals, recons, used = engine.reconstruct(images, "vae")
        assert originals.shape == recons.shape == (2, 28, 28, 1) and used == images
    bad = CliRunner().invoke(
        main, ["--home", str(home), "reconstruct", images[0], "--model", "pixels", "--out", str(out)]
    )
    assert bad.exit_code == 1 and "no decoder" in bad.stderr
