"""Indexing real-sized photos against the decode limit, and 28x28 PNGs against theirs, side by side.

    .venv/bin/python benchmarks/photos.py [--photos 200] [--pngs 20000] [--runs 1]

Generates ``--photos`` photo-like 12-megapixel JPEGs (3000x4000 and 4000x3000, quality 90, a quarter
with an EXIF orientation; smooth gradients and blobs plus sensor-like noise, so entropy decoding
costs what a real photo costs) once under benchmarks/out/photos/, then measures in the same run:

(a) the decode limit: read + sha256 + DCT-scaled decode (Pillow ``draft``) + resize to 64 px, in a
    pool of all cores, nothing else;
(b) ``embedsearch index`` into a new library with pixels at 64 px, with a conv VAE at 64 px, and
    with both in one run (``--model pixels,vae``), each printed as a rate and as the ratio (b)/(a).

Then the same for ``--pngs`` 28x28 Fashion-MNIST PNGs (benchmarks/out/fmnist-png): the limit is
read + sha256 + PNG decode, (b) is index with pixels and with a conv VAE at 28 px.
Targets (issue 14): photos, pixels and VAE >= 0.7 x the limit; PNGs, pixels >= 0.5 x, VAE >= 0.45 x;
``--model pixels,vae`` <= 1.2 x the time of one model.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import OUT, PNGS, machine, write_pngs

PHOTOS = OUT / "photos"
SIZE = 64


def _photo(seed: int) -> bytes:
    """One photo-like JPEG: low-frequency colour field + a few blobs + per-pixel noise, quality 90."""
    rng = np.random.default_rng(seed)
    portrait = seed % 2 == 0
    w, h = (3000, 4000) if portrait else (4000, 3000)
    small = rng.uniform(0, 255, (6, 8, 3)) if not portrait else rng.uniform(0, 255, (8, 6, 3))
    field = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h:8, 0:w:8]
    for _ in range(4):  # a few soft objects, at 1/8 resolution then scaled up (cheap)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(200, 900)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)).astype(np.float32)
        up = np.asarray(Image.fromarray((blob * 255).astype(np.uint8)).resize((w, h)), np.float32) / 255
        field += up[..., None] * rng.uniform(-120, 120, 3).astype(np.float32)
    field += rng.normal(0, 6, (h, w, 3)).astype(np.float32)  # sensor noise: what makes photos cost to decode
    im = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if seed % 4 == 1:
        exif[0x0112] = 6  # "rotate 90 CW to view": a phone held upright
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _write_one(args: tuple[int, str]) -> int:
    seed, folder = args
    data = _photo(seed)
    Path(folder, f"photo-{seed:04d}.jpg").write_bytes(data)
    return len(data)


def write_photos(n: int) -> Path:
    """``n`` photos under PHOTOS/<n>/ (written once, reused)."""
    folder = PHOTOS / str(n)
    marker = folder / ".complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_write_one, [(i, str(folder)) for i in range(n)])
    marker.write_text(str(n))
    print(f"wrote {n} photos ({sum(sizes) / n / 1e6:.1f} MB each on average) in {time.perf_counter() - t0:.0f} s")
    return folder


def _limit_one(job: tuple[str, int]) -> int:
    """What any indexer must do per file: read, hash, decode at the smallest useful scale, resize."""
    path, size = job
    data = Path(path).read_bytes()
    hashlib.sha256(data).digest()
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("RGB", (size, size))
    im = im.convert("RGB")
    im.thumbnail((size, size))
    return im.width


def decode_limit(files: list[str], size: int) -> float:
    """Files per second for read + sha256 + scaled decode + resize in a pool of all cores."""
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for _ in pool.imap_unordered(_limit_one, [(f, size) for f in files], chunksize=16):
            pass
    return len(files) / (time.perf_counter() - t0)


def index_rate(data: str, models: str, home: Path, vae: Path | None) -> tuple[float, float, str]:
    """Files per second and seconds of ``embedsearch index`` into a new library (in process)."""
    from embedsearch.engine import Engine

    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    if vae is not None:  # the trained model, copied in: the timing is of indexing only
        shutil.copytree(vae, home, dirs_exist_ok=True)
    with Engine(home) as engine:
        t0 = time.perf_counter()
        reports = engine.index_models(data, models.split(","))
        seconds = time.perf_counter() - t0
    n = reports[0].added + reports[0].unchanged
    summary = ", ".join(f"{r.model}: {r.added} added" for r in reports)
    return n / seconds, seconds, summary


def train_vae(data: str, size: int, channels: int, home: Path) -> Path:
    """A small conv VAE at ``size`` px (1 epoch on a sample): its weights do not change the timing."""
    from embedsearch.data.images import InputSpec
    from embedsearch.data.ingest import load_folder
    from embedsearch.engine import Engine

    shutil.rmtree(home, ignore_errors=True)
    spec = InputSpec(size, channels)
    sample = home.parent / f"{home.name}-sample"
    shutil.rmtree(sample, ignore_errors=True)
    sample.mkdir(parents=True)
    for path in sorted(Path(data).rglob("*.*"))[:64]:
        if path.suffix.lower() in (".jpg", ".png"):
            shutil.copy(path, sample / path.name)
    images, _, _ = load_folder(str(sample), spec)
    with Engine(home, create=True) as engine:
        engine.fit_model("vae", "vae", images, spec, options={"epochs": 1, "augment": []})
    shutil.rmtree(sample)
    return home


def measure(label: str, data: str, files: list[str], size: int, channels: int, runs: int, both: bool) -> None:
    vae = train_vae(data, size, channels, OUT / f"vae-{label}")
    home = OUT / f"bench-{label}"
    limits, rows = [], {}
    plans = ["pixels", "vae"] + (["pixels,vae"] if both else [])
    for run in range(1, runs + 1):
        limit = decode_limit(files, size)
        limits.append(limit)
        print(f"{label} run {run}: decode limit {limit:,.1f} files/s (read + sha256 + scaled decode, all cores)")
        for models in plans:
            rate, seconds, summary = index_rate(data, models, home, vae if "vae" in models else None)
            rows.setdefault(models, []).append((rate, seconds, rate / limit))
            print(f"  index --model {models}: {rate:,.1f} files/s ({seconds:.1f} s; {summary}) -> {rate / limit:.2f} x")
    print(f"{label}: decode limit median {statistics.median(limits):,.1f} files/s")
    for models, values in rows.items():
        ratio = statistics.median(v[2] for v in values)
        seconds = statistics.median(v[1] for v in values)
        print(f"{label}: index --model {models}: median {ratio:.2f} x the limit, {seconds:.1f} s")
    if both:
        one = max(statistics.median(v[1] for v in rows[m]) for m in ("pixels", "vae"))
        two = statistics.median(v[1] for v in rows["pixels,vae"])
        print(f"{label}: --model pixels,vae takes {two / one:.2f} x the time of the slower single model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--pngs", type=int, default=20_000, help="28x28 PNGs (0: skip)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    print(machine())
    if args.photos:
        folder = write_photos(args.photos)
        files = sorted(str(p) for p in folder.glob("*.jpg"))
        measure("photos", str(folder), files, SIZE, 3, args.runs, both=True)
    if args.pngs:
        write_pngs()
        subset = OUT / f"fmnist-png-{args.pngs}"
        if not (subset / ".complete").exists():
            shutil.rmtree(subset, ignore_errors=True)
            every = sorted(PNGS.rglob("*.png"))[: args.pngs]
            for path in every:
                target = subset / path.relative_to(PNGS)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
            (subset / ".complete").write_text("")
        files = sorted(str(p) for p in subset.rglob("*.png"))
        measure("pngs", str(subset), files, 28, 1, args.runs, both=False)


if __name__ == "__main__":
    main()
