"""What a results page of photo tiles costs: bytes transferred and time to paint, in a real browser.

    .venv/bin/python benchmarks/thumbs.py [--photos 18] [--width 4000 --height 3000]

Writes ``--photos`` photo-like JPEGs (smooth colour field plus sensor-like noise, quality 90, a
fifth turned by EXIF; tests/helpers.py ``photo_jpeg``) into a new library indexed with pixels, then:

- the format: each photo at 256 px as WebP quality 80 (what embedsearch stores) against the
  smallest JPEG quality that reaches the same PSNR, as bytes and their ratio;
- the time to make one thumbnail (256 px WebP) from a stored photo, and its size;
- in Debian's Chromium (Playwright, headless) against the service on loopback: the page is opened,
  a photo is chosen as the query, and both result columns (16 tiles each, the same 16 photos: one
  model) are waited for until every
  tile image is ``complete`` with a ``naturalWidth``. Printed: the response bytes of the page load
  and the search, and the time from choosing the file to the last tile painted; first with the
  thumbnails made on those requests, then again (a fresh browser, the server's cache warm).

Target (issue 14): a results page of 16 photo tiles transfers <= 1 MB and paints within 1 s.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, machine

sys.path.insert(0, str(ROOT / "tests"))
from embedsearch.engine import Engine  # noqa: E402
from embedsearch.http.app import create_app  # noqa: E402
from helpers import live_server, photo_jpeg, results_page_costs  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TILES = 16


def _encoded(im: Image.Image, fmt: str, quality: int) -> tuple[int, float]:
    """Bytes and PSNR (dB) of ``im`` encoded as ``fmt`` at ``quality``."""
    out = io.BytesIO()
    im.save(out, fmt, quality=quality, **({"method": 4} if fmt == "WEBP" else {"optimize": True}))
    back = np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB"), np.float64)
    error = ((np.asarray(im, np.float64) - back) ** 2).mean()
    return len(out.getvalue()), 10 * np.log10(255**2 / max(error, 1e-12))


def compare_formats(files: list[Path]) -> None:
    """WebP q80 against JPEG at the lowest quality with at least the same PSNR, at 256 px."""
    ratios = []
    for file in files:
        im = Image.open(file)
        im.draft("RGB", (1024, 1024))
        im = im.convert("RGB")
        im.thumbnail((256, 256), Image.Resampling.LANCZOS)
        webp, quality = _encoded(im, "WEBP", 80)
        jpegs = [_encoded(im, "JPEG", q) for q in range(40, 99)]
        jpeg = min((j for j in jpegs if j[1] >= quality), default=jpegs[-1])
        ratios.append(webp / jpeg[0])
    print(f"256 px, same PSNR: WebP q80 is {statistics.median(ratios):.2f} x the bytes of JPEG "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}, {len(files)} photos)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=18)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "photos")
        data.mkdir()
        originals = 0
        for i in range(args.photos):
            jpeg = photo_jpeg(i, (args.width, args.height), orientation=6 if i % 5 == 4 else None)
            originals += len(jpeg)
            (data / f"photo-{i:02d}.jpg").write_bytes(jpeg)
        print(f"{args.photos} photos {args.width}x{args.height}, {originals / args.photos / 1e6:.2f} MB each")
        compare_formats(sorted(data.iterdir())[:6])
        with Engine(Path(tmp, "home")) as engine:
            engine.index(str(data), "pixels", workers=0)
            ids = [i for i, _, _ in engine.store.image_paths()]
            made, sizes = [], []
            for image_id in ids[:4]:  # made here; the page's own tiles are the others' cold thumbnails
                t0 = time.perf_counter()
                sizes.append(len(engine.thumbnail(image_id).data))
                made.append(time.perf_counter() - t0)
            median_ms, median_kb = statistics.median(made) * 1e3, statistics.median(sizes) / 1e3
            print(f"one thumbnail: {median_ms:.0f} ms to make, {median_kb:.1f} kB")
            with live_server(create_app(engine)) as url, sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
                for run in ("thumbnails made on request", "thumbnails cached"):
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    page = context.new_page()
                    page.set_default_timeout(60_000)
                    sent, seconds, tiles = results_page_costs(page, url, data / "photo-03.jpg", TILES)
                    print(f"results page, {len(set(tiles))} photos in {len(tiles)} tiles, {run}: {sent / 1e3:.0f} kB, "
                          f"painted in {seconds:.2f} s (target <= 1000 kB, <= 1 s)")  # fmt: skip
                    context.close()
                browser.close()


if __name__ == "__main__":
    main()
