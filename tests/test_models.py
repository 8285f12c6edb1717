"""The model registry: writers that collide, and a replace that is killed half-way."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from filelock import FileLock
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.core import models as models_module
from embedsearch.data.images import InputSpec
from embedsearch.encoders.classic import PCAEncoder
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError, LockedError
from helpers import noise_image, png_bytes


def _nearest(engine: Engine, shapes: Path, model: str) -> list[int]:
    probe = engine.store.image_by_path(str(sorted(shapes.rglob("*.png"))[0]))
    assert probe is not None
    return [n.id for n in engine.search_image(probe.id, model, k=5)]


def test_a_second_training_run_of_one_name_refuses_with_one_line(home: Path, shapes: Path) -> None:
    folder = home / "models" / "twin"
    folder.mkdir(parents=True)
    with FileLock(str(folder / ".train.lock")):  # another process training 'twin'
        with Engine(home) as engine, pytest.raises(LockedError, match="being trained by another process"):
            engine.create_model("twin", "pca", str(shapes), options={"dim": 4})
        result = CliRunner().invoke(
            main, ["--home", str(home), "train", str(shapes), "--model", "pca", "--name", "twin"]
        )
    assert result.exit_code == 1 and "being trained by another process" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_model_made_meanwhile_by_another_process_is_not_replaced(
    home: Path, shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit = PCAEncoder.fit.__func__  # type: ignore[attr-defined]

    def fit_while_another_makes_twin(cls: type[PCAEncoder], *args: object, **kwargs: object) -> PCAEncoder:
        with Engine(home) as other:  # the other process, making 'twin' while this one trains
            other.create_model("twin", "pixels", str(shapes))
        return fit(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(PCAEncoder, "fit", classmethod(fit_while_another_makes_twin))
    # A writer that does not take the training lock (an older version, say): the swap itself must refuse.
    monkeypatch.setattr(models_module.ModelRegistry, "_training", lambda *_: contextlib.nullcontext())
    with Engine(home) as engine:
        with pytest.raises(InvalidArgumentError, match="made by another process meanwhile"):
            engine.create_model("twin", "pca", str(shapes), options={"dim": 4})
        assert engine.model("twin").kind == "pixels"  # the other one's model stands
    assert len(list((home / "models" / "twin").glob("v-*"))) == 1  # the other's: ours left nothing behind


def test_replace_interrupted_before_the_swap_leaves_the_old_model_working(
    library_home: Path, shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Engine(library_home) as engine:
        want = _nearest(engine, shapes, "pca")

    def killed(*_args: object) -> None:
        raise KeyboardInterrupt  # the new weights are saved; re-encoding the old images is under way

    monkeypatch.setattr(models_module, "encode_all", killed)
    with Engine(library_home) as engine, pytest.raises(KeyboardInterrupt):
        engine.create_model("pca", "pca", str(shapes), options={"dim": 6}, replace=True)
    monkeypatch.undo()
    with Engine(library_home) as engine:
        assert engine.model("pca").dim == 8 and _nearest(engine, shapes, "pca") == want
        assert engine.check().ok
        engine.create_model("pca", "pca", str(shapes), options={"dim": 6}, replace=True)
        assert engine.model("pca").dim == 6 and engine.check().ok
    assert len(list((library_home / "models" / "pca").glob("v-*"))) == 1  # the killed run's weights are gone


@pytest.mark.slow
def test_train_replace_killed_at_any_moment_leaves_one_working_model(library_home: Path, shapes: Path) -> None:
    command = [sys.executable, "-m", "embedsearch.cli.main", "--home", str(library_home), "-q", "train", str(shapes)]
    command += ["--model", "pca", "--dim", "6", "--replace"]
    with Engine(library_home) as engine:
        images = engine.info().images
    for delay in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Engine(library_home) as engine:
            report = engine.check()
            assert report.ok, (delay, report.problems)
            assert engine.model("pca").dim in (6, 8) and engine.info().images == images
            assert engine.encoder("pca").dim == engine.model("pca").dim


def _framed(centre: int, sides: int) -> bytes:
    """A 48x16 picture: a 16x16 noise square (seed ``centre``) between two others (seeds from ``sides``)."""
    im = Image.new("RGB", (48, 16))
    for x, seed in ((0, sides), (16, centre), (32, sides + 1000)):
        im.paste(noise_image(seed), (x, 0))
    return png_bytes(im)


def test_a_crop_model_keeps_its_fit_through_the_store_and_every_input_is_cropped(home: Path, tmp_path: Path) -> None:
    """Made by the Python API, reopened: its folder images, uploads, byte queries and the re-encoding of
    a replace all see only the centre; a pad model of the same size beside it sees the whole picture."""
    data = tmp_path / "framed"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(_framed(i, 100 + i))
    with Engine(home) as engine:
        info = engine.create_model("crop", "pixels", image_size=16, channels=3, fit="crop")
        assert (info.fit, engine.create_model("pad", "pixels", image_size=16, channels=3).fit) == ("crop", "pad")
        engine.index_models(str(data), ["crop", "pad"])
    with Engine(home) as engine:  # the spec comes back from the model's row
        assert engine.store.model("crop").fit == "crop"  # type: ignore[union-attr]
        assert engine.encoder("crop").spec == InputSpec(16, 3, "crop") != engine.encoder("pad").spec
        assert [m.fit for m in engine.info().models] == ["crop", "pad"]
        same_centre = _framed(2, 999)
        assert engine.search_bytes(same_centre, "crop", k=1)[0].distance == 0.0
        assert engine.search_bytes(same_centre, "pad", k=1)[0].distance > 0.0
        added = engine.add_image(_framed(7, 300))  # an upload: decoded once, cropped for one model only
        hit = engine.search_bytes(_framed(7, 301), "crop", k=1)[0]
        assert (hit.id, hit.distance) == (added.id, 0.0)
        engine.create_model("crop", "pixels", image_size=16, channels=3, fit="crop", replace=True)
        hit = engine.search_bytes(_framed(7, 302), "crop", k=1)[0]  # the held images, encoded again
        assert (hit.id, hit.distance) == (added.id, 0.0)
