"""Long fuzz of the decoder: mutated image files must decode to a well-formed array or raise ImageError.

    .venv/bin/python benchmarks/fuzz.py [--cases 50000] [--other 10000] [--random 5000] [--seed 0]

Uses the seeds and mutations of ``embedsearch.data.mutations``, as ``tests/test_fuzz.py`` does
(bit flips, byte writes, truncation, insertion, deletion, repeats, splices, header fields, PNG IHDR
fields with mended CRCs, TIFF tags,
JPEG frame fields), drawn from a seeded ``random.Random`` instead of hypothesis, and keeps going
after a failure. Three families: ``--cases`` mutations of PNG, JPEG, GIF, BMP, TIFF and WebP files;
``--other`` mutations of the other formats Pillow opens whatever a file is called (ICO, DDS, JPEG
2000, PCX, PPM, SGI, TGA, QOI, BLP, XBM, MSP, AVIF); ``--random`` random byte strings. Decodes
with the default pixel limit (as ``index`` does). Prints per family how many cases ran, decoded and
were refused, the commonest refusal reasons, the slowest cases, and for every distinct uncaught
exception its count, one reproducer (seed + mutations, also written to benchmarks/out/fuzz/) and
its traceback. Exit status 1 if any exception other than ImageError escaped.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field

from common import OUT, ROOT, machine
from embedsearch.data.images import DEFAULT_MAX_PIXELS, decode_bytes
from embedsearch.data.mutations import SPECS, family, mutate, random_case, seed_corpus
from embedsearch.errors import ImageError


@dataclass
class Bug:
    count: int = 0
    example: str = ""
    trace: str = ""
    saved: str = ""


@dataclass
class Tally:
    ran: int = 0
    decoded: int = 0
    refused: int = 0
    reasons: Counter = field(default_factory=Counter)
    bugs: dict[tuple[str, str], Bug] = field(default_factory=dict)
    slowest: list[tuple[float, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_case(tally: Tally, data: bytes, describe, case: int) -> None:
    spec = SPECS[case % len(SPECS)]
    started = time.perf_counter()
    try:
        meta, arr = decode_bytes(data, spec, "fuzz.img", DEFAULT_MAX_PIXELS)
        if arr.shape != spec.shape or arr.dtype.name != "uint8" or meta.bytes != len(data):
            raise AssertionError(f"malformed result: {arr.dtype} {arr.shape}, meta {meta}")
        tally.decoded += 1
    except ImageError as exc:
        tally.refused += 1
        tally.reasons[re.sub(r"\d+", "N", exc.reason.split(" (")[0])[:60]] += 1
    except Exception as exc:  # noqa: BLE001 (this is what the fuzz looks for)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        key = (type(exc).__name__, f"{os.path.basename(frame.filename)}:{frame.lineno}")
        bug = tally.bugs.setdefault(key, Bug())
        bug.count += 1
        if not bug.example:
            bug.example = f"{describe()}, spec {spec}: {type(exc).__name__}: {exc}"
            bug.trace = "".join(traceback.format_exception(exc)[-6:])
            folder = OUT / "fuzz"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{key[0]}-{key[1].replace(':', '-')}.bin"
            path.write_bytes(data)
            bug.saved = str(path.relative_to(ROOT))
    took = time.perf_counter() - started
    tally.ran += 1
    if len(tally.slowest) < 3 or took > tally.slowest[-1][0]:
        tally.slowest = sorted([*tally.slowest, (took, describe()[:100])], reverse=True)[:3]


def report(name: str, tally: Tally) -> None:
    print(
        f"\n{name}: {tally.ran} cases in {tally.seconds:.1f} s ({tally.ran / tally.seconds:,.0f}/s): "
        f"{tally.decoded} decoded, {tally.refused} refused with ImageError, "
        f"{sum(b.count for b in tally.bugs.values())} other exceptions"
    )
    print("  commonest refusals: " + "; ".join(f"{r} x{c}" for r, c in tally.reasons.most_common(6)))
    print("  slowest: " + "; ".join(f"{t:.2f} s {d}" for t, d in tally.slowest))
    for (kind, where), bug in sorted(tally.bugs.items(), key=lambda kv: -kv[1].count):
        print(f"  UNCAUGHT {kind} at {where} x{bug.count}\n    first: {bug.example}\n    bytes: {bug.saved}")
        print("    " + bug.trace.rstrip().replace("\n", "\n    "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50_000, help="Mutations of PNG/JPEG/GIF/BMP/TIFF/WebP.")
    parser.add_argument("--other", type=int, default=10_000, help="Mutations of the other Pillow formats.")
    parser.add_argument("--random", type=int, default=5_000, help="Random byte strings.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(machine())
    names = [n for n, _ in seed_corpus()]
    print(f"{len(names)} seed files: {', '.join(names)}")
    warnings.simplefilter("ignore")  # Pillow warns about every odd TIFF tag
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved_stderr = os.dup(2)
    os.dup2(devnull, 2)  # libtiff writes its complaints straight to fd 2
    rng = random.Random(args.seed)
    tallies = {}
    try:
        for fam, count in (("main", args.cases), ("other", args.other)):
            seeds = family(fam)
            labels = [n for n in names if n.startswith("other-") == (fam == "other")]
            tally = tallies[fam] = Tally()
            started = time.perf_counter()
            for case in range(count):
                index, ops = random_case(rng, len(seeds))
                data = mutate(seeds, index, ops)
                run_case(tally, data, lambda i=index, o=ops, n=labels: f"seed {n[i]} ops {o}", case)
            tally.seconds = time.perf_counter() - started
        tally = tallies["random"] = Tally()
        started = time.perf_counter()
        for case in range(args.random):
            data = rng.randbytes(rng.randrange(0, 512))
            run_case(tally, data, lambda d=data: f"random bytes {d[:24]!r}... ({len(d)} bytes)", case)
        tally.seconds = time.perf_counter() - started
    finally:
        os.dup2(saved_stderr, 2)
    titles = {
        "main": "PNG/JPEG/GIF/BMP/TIFF/WebP mutations",
        "other": "other-format mutations",
        "random": "random bytes",
    }
    for fam, tally in tallies.items():
        report(titles[fam], tally)
    total = sum(t.ran for t in tallies.values())
    bugs = sum(sum(b.count for b in t.bugs.values()) for t in tallies.values())
    print(
        f"\ntotal: {total} cases, {sum(t.decoded for t in tallies.values())} decoded, "
        f"{sum(t.refused for t in tallies.values())} refused, {bugs} uncaught exceptions "
        f"({sum(len(t.bugs) for t in tallies.values())} distinct)"
    )
    sys.exit(1 if bugs else 0)


if __name__ == "__main__":
    main()
