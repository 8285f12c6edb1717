"""The comparison run end to end (tiny AE/VAE, 1 epoch), its JSON and report, IDX reading and export."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedsearch.cli.compare import compare, export_images
from embedsearch.data.idx import read_idx, read_idx_pair
from embedsearch.data.synth import make_image_array, make_shapes
from embedsearch.engine import Engine
from embedsearch.errors import DataError, InvalidArgumentError
from embedsearch.evaluation.report import format_table, render_markdown
from embedsearch.evaluation.scores import CompareConfig, CompareResult, ModelResult
from embedsearch.evaluation.transforms import TRANSFORMS

CONTRACT = [
    "precision@10",
    "map@10",
    "recall@1",
    "recall@5",
    "recall@10",
    "knn_accuracy",
    "neardup_recall@1",
    "neardup_recall@10",
    "dim",
    "encode_images_per_s",
    "query_ms_p50",
]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models: one torch thread is as fast, and much faster on a shared machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cli() -> click.Group:
    group = click.Group()
    group.add_command(compare)
    group.add_command(export_images, "export-images")
    return group


def run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli(), list(args), env={"EMBEDSEARCH_HOME": str(home)})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def grey_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes x 10 grey 28x28 images in class folders."""
    root = tmp_path_factory.mktemp("grey") / "data"
    make_shapes(root, per_class=10, size=28, seed=2, mode="L")
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    end = ".gz" if gz else ""
    pack = gzip.compress if gz else (lambda b: b)
    (folder / f"{prefix}-labels-idx1-ubyte{end}").write_bytes(pack(idx_bytes(labels)))
    path = folder / f"{prefix}-images-idx3-ubyte{end}"
    path.write_bytes(pack(idx_bytes(images)))
    return path


def assert_robustness(entry: dict) -> None:
    """A model's --json entry has recall@1 and @10 in [0, 1] for every transform; mixed is neardup_recall."""
    robustness = entry["robustness"]
    assert list(robustness) == list(TRANSFORMS)
    for scores in robustness.values():
        assert list(scores) == ["recall@1", "recall@10"]
        assert 0.0 <= scores["recall@1"] <= scores["recall@10"] <= 1.0
    assert robustness["mixed"] == {"recall@1": entry["neardup_recall@1"], "recall@10": entry["neardup_recall@10"]}


# -- the command ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_end_to_end_json_and_report(tmp_path: Path, grey_shapes: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "report"
    code, stdout, stderr = run(
        home,
        "compare",
        str(grey_shapes),
        "--models",
        "ae,vae,pixels,pca",
        "--query-fraction",
        "0.2",
        "--train-epochs",
        "1",
        "--json",
        "--report",
        str(out),
        "--keep-models",
    )
    assert code == 0, stderr
    data = json.loads(stdout)
    assert list(data) == ["data", "queries", "database", "k", "models"]
    assert (data["queries"], data["database"], data["k"]) == (16, 64, 10)
    assert list(data["models"]) == ["ae", "vae", "pixels", "pca"]
    for name, m in data["models"].items():
        assert list(m)[: len(CONTRACT)] == CONTRACT
        assert all(0.0 <= m[key] <= 1.0 for key in CONTRACT[:8]), name
        assert m["encode_images_per_s"] > 0 and m["query_ms_p50"] > 0
    assert data["models"]["pixels"]["dim"] == 784 and data["models"]["pca"]["dim"] == 32
    assert data["models"]["ae"]["dim"] == data["models"]["vae"]["dim"] == 32
    assert 0 < data["models"]["ae"]["recon_error"] < 1 and "kl" not in data["models"]["ae"]
    assert data["models"]["vae"]["kl"] >= 0 and 0 <= data["models"]["vae"]["active_dims"] <= 32
    assert data["models"]["ae"]["trained"] and not data["models"]["pixels"]["trained"]
    for m in data["models"].values():
        assert_robustness(m)

    text = (out / "report.md").read_text()
    assert "compare" in text and "--train-epochs 1" in text and "| model |" in text and "precision@10" in text
    assert "## Robustness" in text and "| model | crop | shift |" in text
    for png in ("precision_at_k.png", "latents_2d.png", "top_results.png", "samples.png", "robustness.png"):
        assert f"]({png})" in text
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 200
    full = json.loads((out / "results.json").read_text())
    restored = CompareResult.from_dict(full)
    assert restored.summary() == data and json.loads(json.dumps(restored.to_dict())) == full
    assert len(restored.models["ae"].precision_curve) == 100

    # A second run uses the library's models as they are: nothing is trained, the numbers repeat.
    code, stdout, _ = run(home, "compare", str(grey_shapes), "--query-fraction", "0.2", "--train-epochs", "1")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "dim", "P@10"] and len(lines) == 13 and "*" in stdout
    assert lines[1].split()[0] == "ae" and lines[3].split()[:2] == ["pixels", "784"]
    assert lines[6] == "" and lines[7].split() == ["model", *TRANSFORMS] and lines[8].split()[0] == "ae"


def test_compare_on_idx_with_queries_excludes_self_matches(tmp_path: Path) -> None:
    images, labels = make_image_array(48, 28, 1, seed=3)
    data = write_idx_pair(tmp_path / "idx", "train", images[..., 0], labels)
    queries = write_idx_pair(tmp_path / "idx", "t10k", images[:12, ..., 0], labels[:12], gz=False)
    code, stdout, stderr = run(
        tmp_path / "home", "compare", str(data), "--queries", str(queries), "--models", "pixels", "-k", "5", "--json"
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert (result["queries"], result["database"], result["k"]) == (12, 48, 5)
    pixels = result["models"]["pixels"]
    assert "precision@5" in pixels and "map@5" in pixels
    # Every query is also in the database; counted, it would be its own nearest neighbour (recall@1 = 1).
    assert pixels["recall@1"] < 1.0
    # An altered query whose original is also a database item finds "the same picture" either way.
    assert pixels["neardup_recall@10"] >= 0.9


def test_models_made_by_compare_use_the_metric_asked_for(tmp_path: Path, grey_shapes: Path) -> None:
    code, stdout, stderr = run(
        tmp_path / "home",
        "compare",
        str(grey_shapes),
        "--models",
        "pixels,pca",
        "--query-fraction",
        "0.2",
        "--metric",
        "cosine",
        "--json",
        "--keep-models",
    )
    assert code == 0, stderr
    models = json.loads(stdout)["models"]
    assert {m["metric"] for m in models.values()} == {"cosine"}
    for m in models.values():
        assert_robustness(m)
    with Engine(tmp_path / "home") as engine:
        assert {m.metric for m in engine.models()} == {"cosine"}


def test_existing_model_with_another_spec_gets_adapted_images(tmp_path: Path, grey_shapes: Path) -> None:
    from embedsearch.engine import Engine

    home = tmp_path / "home"
    small, _ = make_image_array(40, 16, 1, seed=4)
    with Engine(home) as engine:
        from embedsearch.data.images import InputSpec

        engine.fit_model("pca16", "pca", small, InputSpec(16, 1), options={"dim": 8})
    code, stdout, stderr = run(home, "compare", str(grey_shapes), "--models", "pixels,pca16", "--json")
    assert code == 0, stderr
    models = json.loads(stdout)["models"]
    assert models["pca16"]["dim"] == 8 and not models["pca16"]["created"] and models["pixels"]["dim"] == 784

    images, labels = make_image_array(40, 28, 1, seed=5)  # IDX data: resized with idx_to_spec
    data = write_idx_pair(tmp_path / "idx", "train", images[..., 0], labels)
    code, stdout, stderr = run(home, "compare", str(data), "--models", "pca16", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["models"]["pca16"]["dim"] == 8


def test_compare_deletes_the_models_it_made_unless_kept_and_warns_of_one_that_saw_the_queries(
    tmp_path: Path, grey_shapes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from embedsearch.data.datasets import load_dataset
    from embedsearch.data.images import InputSpec
    from embedsearch.engine import Engine

    home = tmp_path / "home"
    spec = InputSpec(28, 1)
    everything = load_dataset(str(grey_shapes), spec)
    with Engine(home) as engine:  # a library model trained on all of DATA: the queries included
        engine.fit_model("seen", "pca", everything.images, spec, options={"dim": 8}, source=str(grey_shapes))
    code, _, stderr = run(home, "compare", str(grey_shapes), "--models", "pixels,pca,seen")
    assert code == 0, stderr
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "model 'seen' was trained on" in warned[0] and "scores are optimistic" in warned[0]
    caplog.clear()
    with Engine(home) as engine:
        assert [m.name for m in engine.models()] == ["seen"]  # pixels and pca were made here: deleted
    code, _, stderr = run(home, "compare", str(grey_shapes), "--models", "pca", "--keep-models")
    assert code == 0, stderr
    code, _, stderr = run(home, "compare", str(grey_shapes), "--models", "pca")  # reused, trained on the database part
    assert code == 0 and not [r for r in caplog.records if r.levelname == "WARNING"], stderr
    with Engine(home) as engine:
        assert sorted(m.name for m in engine.models()) == ["pca", "seen"]  # a reused model is never deleted


def test_compare_errors_are_one_line(tmp_path: Path, grey_shapes: Path) -> None:
    code, _, stderr = run(tmp_path / "home", "compare", str(grey_shapes), "--models", "pixels,nosuch")
    assert code == 1 and "unknown model 'nosuch'" in stderr and "Traceback" not in stderr
    code, _, stderr = run(tmp_path / "home", "compare", str(grey_shapes), "--models", "pixels,pixels")
    assert code == 1 and "named twice" in stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("L", (28, 28), i * 40).save(flat / f"{i}.png")
    code, _, stderr = run(tmp_path / "home", "compare", str(flat), "--models", "pixels")
    assert code == 1 and "no label" in stderr


def test_config_validation() -> None:
    with pytest.raises(InvalidArgumentError):
        CompareConfig(data="x", query_fraction=1.0)
    with pytest.raises(InvalidArgumentError):
        CompareConfig(data="x", models=[])
    config = CompareConfig(data="x", models=["ae", "pixels"], k=5)
    assert CompareConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # The training recipe is resolved here, so that the report states what the models were trained with.
    assert (config.augment, config.consistency, config.temperature) == (
        ["jpeg", "crop", "brightness", "blur", "noise"],
        30.0,
        0.1,
    )
    plain = CompareConfig(data="x", augment=["none"])
    assert plain.augment == [] and plain.consistency == 0.0
    with pytest.raises(InvalidArgumentError, match="unknown augmentation"):
        CompareConfig(data="x", augment=["sepia"])
    with pytest.raises(InvalidArgumentError, match="hamming"):
        CompareConfig(data="x", metric="hamming")


@pytest.mark.slow
def test_compare_trains_ae_and_vae_with_the_recipe_asked_for_and_states_it(tmp_path: Path, grey_shapes: Path) -> None:
    from embedsearch.engine import Engine

    out = tmp_path / "report"
    args = ["compare", str(grey_shapes), "--models", "ae,vae,pixels", "--query-fraction", "0.2", "--train-epochs", "1"]
    args += [
        "--augment",
        "crop,noise",
        "--consistency",
        "5",
        "--temperature",
        "0.3",
        "--lr",
        "0.002",
        "--lr-schedule",
        "cosine",
        "--report",
        str(out),
        "--keep-models",
    ]
    code, stdout, stderr = run(tmp_path / "home", *args)
    assert code == 0, stderr
    recipe = "augment crop,noise, consistency 5.0, temperature 0.3, lr 0.002 (cosine)"
    assert stdout.splitlines()[-1].endswith(recipe)
    text = (out / "report.md").read_text()
    assert "augment crop,noise, consistency 5.0, temperature 0.3" in text and "lr 0.002 (cosine)" in text
    assert "--augment crop,noise" in text and "--lr 0.002 --lr-schedule cosine" in text
    with Engine(tmp_path / "home") as engine:
        for kind in ("ae", "vae"):
            options = engine.model(kind).config["options"]
            assert (options["augment"], options["consistency"], options["temperature"]) == (["crop", "noise"], 5.0, 0.3)
            assert (options["lr"], options["lr_schedule"]) == (0.002, "cosine")
        assert {m.name: m.metric for m in engine.models()} == {"ae": "cosine", "vae": "cosine", "pixels": "l2"}


def test_altered_queries_are_made_once_per_transform_and_the_report_plots_robustness(
    tmp_path: Path, grey_shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, int] = {}

    def counted(name: str):  # noqa: ANN202 - a wrapper of the transform's own signature
        original = TRANSFORMS[name]

        def transform(images: np.ndarray, seed: int) -> np.ndarray:
            calls[name] = calls.get(name, 0) + 1
            return original(images, seed)

        return transform

    for name in list(TRANSFORMS):
        monkeypatch.setitem(TRANSFORMS, name, counted(name))
    out = tmp_path / "report"
    args = ["compare", str(grey_shapes), "--models", "pixels,pca", "--query-fraction", "0.2", "--report", str(out)]
    code, stdout, stderr = run(tmp_path / "home", *args)
    assert code == 0, stderr
    assert calls == dict.fromkeys(TRANSFORMS, 1)  # two models, one altered query set per transform
    lines = stdout.splitlines()  # scores (header, 2 models, legend), a blank line, then robustness
    assert lines[3].startswith("* best") and lines[5].split() == ["model", *TRANSFORMS] and len(lines) == 9
    text = (out / "report.md").read_text()
    assert "## Robustness" in text and "](robustness.png)" in text
    with Image.open(out / "robustness.png") as im:
        assert im.format == "PNG" and im.width > 200
    restored = CompareResult.from_dict(json.loads((out / "results.json").read_text()))
    assert set(restored.models["pca"].robustness) == set(TRANSFORMS)


def test_robustness_round_trips_and_results_without_it_still_load() -> None:
    robust = {
        t: {"recall@1": round(0.25 + i / 100, 2), "recall@10": round(0.5 + i / 100, 2)}
        for i, t in enumerate(TRANSFORMS)
    }
    model = ModelResult(
        "a", "pca", "l2", 32, 128, 0.8, 0.5, {1: 0.5, 5: 0.6, 10: 0.7}, 0.5, {1: 0.9, 10: 1.0}, 1000.0, 0.3
    )
    model.robustness = robust
    assert ModelResult.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert model.metrics(10)["robustness"] == robust
    old = model.to_dict()
    del old["robustness"]  # results.json written before the robustness table
    assert ModelResult.from_dict(old).robustness == {}

    other = ModelResult.from_dict({**model.to_dict(), "name": "b"})
    other.robustness = {t: {"recall@1": 0.1, "recall@10": 0.2} for t in TRANSFORMS}
    result = CompareResult(
        CompareConfig(data="d", models=["a", "b"]), "d", "fraction", 10, 90, ["0"], {"a": model, "b": other}, 1.0
    )
    lines = format_table(result).splitlines()
    header, a, b = (lines[i].split() for i in (5, 6, 7))  # after the scores, their legend and a blank line
    assert header == ["model", *TRANSFORMS]
    assert a[1] == "0.500*/0.250" and b[1] == "0.200/0.100"  # recall@10/recall@1, the better recall@10 marked
    text = render_markdown(result, {"robustness": Path("robustness.png")})
    assert "| a | 0.500\\*/0.250 |" in text and "![robustness](robustness.png)" in text


def test_table_marks_the_best_value_of_each_column() -> None:
    def model(name: str, precision: float, ms: float) -> ModelResult:
        return ModelResult(
            name, "pca", "l2", 32, 128, precision, 0.5, {1: 0.5, 5: 0.6, 10: 0.7}, 0.5, {1: 0.9, 10: 1.0}, 1000.0, ms
        )

    result = CompareResult(
        CompareConfig(data="d", models=["a", "b"]),
        "d",
        "fraction",
        10,
        90,
        ["0", "1"],
        {"a": model("a", 0.8, 0.5), "b": model("b", 0.7, 0.2)},
        1.0,
    )
    header, a, b = (line.split() for line in format_table(result).splitlines()[:3])
    col = {name: i for i, name in enumerate(header)}
    assert a[col["P@10"]] == "0.8000*" and b[col["P@10"]] == "0.7000"  # higher precision is better
    assert b[col["ms/query"]] == "0.200*" and a[col["ms/query"]] == "0.500"  # lower query time is better
    assert a[col["mAP@10"]] == b[col["mAP@10"]] == "0.5000*"  # a tie: both marked
    assert a[col["recon"]] == b[col["recon"]] == "-"  # not measured for these models
    restored = CompareResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result and restored.models["a"].recall[5] == 0.6


# -- IDX files and export -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_good_truncated_and_wrong_magic(tmp_path: Path, gz: bool) -> None:
    pack = gzip.compress if gz else (lambda b: b)
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    good, lab = tmp_path / "good-images-idx3-ubyte", tmp_path / "good-labels-idx1-ubyte"
    good.write_bytes(pack(idx_bytes(images)))
    lab.write_bytes(pack(idx_bytes(labels)))
    assert np.array_equal(read_idx(good), images) and np.array_equal(read_idx(lab), labels)
    x, y = read_idx_pair(good, lab)
    assert x.shape == (2, 3, 4) and y.tolist() == [7, 1]

    truncated = tmp_path / "truncated"
    truncated.write_bytes(pack(idx_bytes(images)[:-5]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(truncated)
    header_only = tmp_path / "header"
    header_only.write_bytes(pack(idx_bytes(images)[:10]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(header_only)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(pack(struct.pack(">IIII", 2050, 2, 3, 4) + images.tobytes()))
    with pytest.raises(DataError, match="magic"):
        read_idx(wrong)
    few = tmp_path / "few-labels"
    few.write_bytes(pack(idx_bytes(labels[:1])))
    with pytest.raises(DataError, match="labels"):
        read_idx_pair(good, few)
    if gz:
        broken = tmp_path / "broken.gz"
        broken.write_bytes(gzip.compress(idx_bytes(images))[:-12])  # cut inside the gzip stream
        with pytest.raises(DataError):
            read_idx(broken)


def test_export_images_writes_label_folders(tmp_path: Path) -> None:
    images, labels = make_image_array(12, 28, 1, seed=6)
    path = write_idx_pair(tmp_path / "idx", "train", images[..., 0], labels)
    out = tmp_path / "png"
    code, stdout, stderr = run(
        tmp_path / "home", "export-images", str(path), str(tmp_path / "idx" / "train-labels-idx1-ubyte.gz"), str(out)
    )
    assert code == 0, stderr and "wrote 12 PNG files" in stdout
    files = sorted(out.rglob("*.png"))
    assert len(files) == 12 and {f.parent.name for f in files} == {str(v) for v in np.unique(labels)}
    assert all(f.name.startswith("train-") for f in files)
    first = out / str(labels[0]) / "train-00.png"
    with Image.open(first) as im:
        assert np.array_equal(np.asarray(im), images[0, ..., 0])
    code, _, stderr = run(tmp_path / "home", "export-images", str(path), str(path), str(out))
    assert code == 1 and "Error" in stderr and "Traceback" not in stderr


def test_every_command_has_help_with_an_example() -> None:
    for name in ("compare", "export-images"):
        result = CliRunner().invoke(cli(), [name, "-h"])
        assert result.exit_code == 0 and "Example" in result.output


def test_importing_the_modules_loads_neither_torch_nor_matplotlib() -> None:
    import subprocess
    import sys

    code = (
        "import sys, embedsearch.evaluation.metrics, embedsearch.evaluation.compare, "
        "embedsearch.evaluation.report, embedsearch.cli.compare; "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
