"""Bulk indexing on Ray in local mode against the local path: 20k 28x28 PNGs, pixels encoder.

    .venv/bin/python benchmarks/ray_bulk.py [--files 20000] [--runs 3]

Each run indexes the same files into three new libraries: the local path (process pool), Ray as
``index --ray`` runs it (Ray started for the run and shut down after it: its start-up counts), and
Ray already running in the process (what a long-lived caller or a cluster pays per run). The
libraries of the first run are compared: same paths, same ids, identical vectors.
Target (issue 15): ``--ray`` in local mode at >= 0.5x the local path's throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from common import OUT, PNGS, machine, spread, write_pngs


def subset(n: int) -> Path:
    """The first ``n`` of the Fashion-MNIST PNGs (in path order), hard-linked into their own folder."""
    write_pngs()
    dest = OUT / f"fmnist-{n // 1000}k"
    files = sorted(PNGS.rglob("*.png"))[:n]
    for src in files:
        target = dest / src.relative_to(PNGS)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, target)
    return dest


def index_once(home: Path, data: Path, ray: object) -> tuple[float, float, int]:
    """Seconds to index ``data`` into a new library at ``home`` (until the report, and until a Ray
    the run started has shut down in the background), and the images added."""
    from embedsearch.core.ray_bulk import settle
    from embedsearch.engine import Engine

    shutil.rmtree(home, ignore_errors=True)
    with Engine(home) as engine:
        start = time.perf_counter()
        report = engine.index(str(data), "pixels", ray=ray)
        seconds = time.perf_counter() - start
        settle()  # not counted in the rate, but shown: the next run must not share the CPUs with it
        return seconds, time.perf_counter() - start, report.added


def stored(home: Path) -> tuple[dict[str, int], dict[int, bytes]]:
    from embedsearch.engine import Engine

    with Engine(home) as engine:
        paths = {path: image_id for image_id, _, path in engine.store.image_paths()}
        return paths, dict(engine.store.entry_blobs(engine.model("pixels").id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import ray

    from embedsearch.core.ray_bulk import RayOptions

    print(machine(), f"| ray {ray.__version__}")
    data = subset(args.files)
    n = sum(1 for _ in data.rglob("*.png"))
    homes = {way: OUT / f"ray-bench-{way}" for way in ("local", "ray", "ray-running")}
    rates: dict[str, list[float]] = {way: [] for way in homes}
    ways = list(homes)
    for run in range(1, args.runs + 1):
        # The order turns each run: on a shared machine the noise then falls on each way in turn.
        turn = (run - 1) % len(ways)
        for way in ways[turn:] + ways[:turn]:
            home = homes[way]
            if way == "ray-running":
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
            try:
                seconds, gone, added = index_once(home, data, None if way == "local" else RayOptions())
            finally:
                if way == "ray-running":
                    ray.shutdown()
            rates[way].append(n / seconds)
            load = os.getloadavg()[0]
            rate = f"{added} added in {seconds:.2f} s -> {n / seconds:,.0f} images/s"
            if way == "ray":
                rate += f"; Ray gone after {gone:.2f} s"
            print(f"run {run}, {way:11}: {rate} (load {load:.1f})", flush=True)
        if run == 1:  # every way has run once
            local_paths, local_vectors = stored(homes["local"])
            for way in ("ray", "ray-running"):
                paths, vectors = stored(homes[way])
                same = paths == local_paths and vectors == local_vectors  # vectors as their stored bytes
                print(f"{way}: same paths, ids and vectors as the local path: {same}")
                assert same, way
    local = statistics.median(rates["local"])
    for way in homes:
        ratio = statistics.median(rates[way]) / local
        print(f"{way:11}: {spread(rates[way])}; {ratio:.2f}x the local path")


if __name__ == "__main__":
    main()
