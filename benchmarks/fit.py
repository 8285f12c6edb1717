"""Which resize policy for photos: pad (whole picture on white) or crop (centred square), measured.

    .venv/bin/python benchmarks/fit.py [--per-class 40] [--size 32]

Generates a labelled folder of photo-like pictures (6 object classes, each a coloured shape on a
textured background that varies by shot), half framed portrait (600x800) and half landscape
(800x600), the object near the centre. Indexes it with ``pixels`` made with ``--fit pad`` and with
``--fit crop``, queries every picture, and prints per policy: precision@10 by class label, and the
share of a portrait query's 10 neighbours that are portraits (orientation bias: 0.5 means the
framing does not matter, 1.0 that portraits only find portraits).
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw

from common import OUT, machine

CLASSES = ["disc", "square", "triangle", "ring", "bar", "cross"]


def _picture(label: int, seed: int, portrait: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = (600, 800) if portrait else (800, 600)
    base = rng.uniform(60, 200, 3)
    noise = rng.normal(0, 25, (h // 20, w // 20, 3))
    texture = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(texture)
    cx, cy = w / 2 + rng.uniform(-40, 40), h / 2 + rng.uniform(-40, 40)
    r = rng.uniform(150, 210)
    colour = tuple(int(c) for c in np.roll([230, 40, 40], label % 3))
    box = (cx - r, cy - r, cx + r, cy + r)
    shapes = {
        0: lambda: draw.ellipse(box, fill=colour),
        1: lambda: draw.rectangle(box, fill=colour),
        2: lambda: draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour),
        3: lambda: draw.ellipse(box, outline=colour, width=int(r / 3)),
        4: lambda: draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=colour),
        5: lambda: (
            draw.rectangle((cx - r, cy - r / 5, cx + r, cy + r / 5), fill=colour),
            draw.rectangle((cx - r / 5, cy - r, cx + r / 5, cy + r), fill=colour),
        ),
    }
    shapes[label]()
    return texture


def write_folder(per_class: int) -> str:
    root = OUT / f"fit-{per_class}"
    if (root / ".complete").exists():
        return str(root)
    shutil.rmtree(root, ignore_errors=True)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _picture(label, label * 10_000 + i, portrait=i % 2 == 0).save(root / name / f"{i:03d}.jpg", quality=90)
    (root / ".complete").write_text("")
    return str(root)


def measure(data: str, fit: str, size: int) -> tuple[float, float]:
    from embedsearch.engine import Engine
    from embedsearch.results import QueryResult

    home = OUT / f"fit-home-{fit}"
    shutil.rmtree(home, ignore_errors=True)
    with Engine(home) as engine:
        engine.create_model("pixels", "pixels", image_size=size, channels=3, fit=fit)
        engine.index(data, "pixels")
        files = sorted(str(p) for p in OUT.glob(f"{data.rsplit('/', 1)[-1]}/*/*.jpg"))
        hits, portrait_share, portraits = 0, 0.0, 0
        for result in engine.query(files, "pixels", k=11):
            assert isinstance(result, QueryResult)
            label = result.query.rsplit("/", 2)[-2]
            others = [n for n in result.results if n.path != result.query][:10]
            hits += sum(n.label == label for n in others)
            if int(result.query.rsplit("/", 1)[-1][:3]) % 2 == 0:  # even shots are portraits
                portraits += 1
                portrait_share += sum(int(n.path.rsplit("/", 1)[-1][:3]) % 2 == 0 for n in others) / len(others)
    return hits / (10 * len(files)), portrait_share / portraits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    print(machine())
    data = write_folder(args.per_class)
    for fit in ("pad", "crop"):
        t0 = time.perf_counter()
        precision, share = measure(data, fit, args.size)
        print(
            f"--fit {fit}: precision@10 by label {precision:.3f}; portrait queries' neighbours that are portraits "
            f"{share:.3f} ({len(CLASSES) * args.per_class} pictures, pixels at {args.size} px, "
            f"{time.perf_counter() - t0:.1f} s)"
        )


if __name__ == "__main__":
    main()
