"""HTTP service throughput and latency over a 70k-image library (conv VAE, 28x28 grey).

    .venv/bin/python benchmarks/serve.py [--seconds 10] [--rate 150] [--uploads 200]
        [--workers 1,2] [--rounds 3] [--connections 16] [--only-workers]

Builds (once; reused while it holds 70k vectors) ``benchmarks/out/serve-home``: Fashion-MNIST
train + test written as PNG files (``benchmarks/out/fmnist-png``, shared with index_query.py;
generated shapes when ../shared/datasets is absent), a conv VAE trained for 1 epoch on the 60k
training images, and every PNG indexed through ``engine.index``. Then it starts the service as a
separate process (``embedsearch -q serve`` on 127.0.0.1) and drives it with client threads (httpx)
on the same machine, each sending ``POST /api/search`` (an image upload, k=10):

- closed loop, 1 and 8 clients: each sends its next request as soon as the last one returns, so
  the service runs flat out; this gives its capacity (requests/s) and the CPU per request;
- paced, 8 clients: together they send ``--rate`` requests/s, each on its own even schedule
  (an open-loop load, as from many independent users); latency counts from the moment a request
  was due, so a client that falls behind is charged for the wait (no coordinated omission).

Then one client uploads new images one at a time (store + index into every model), then deletes
them. Targets (issue: serve; 2 cores): search by upload p50 <= 15 ms and p99 <= 50 ms with 8
concurrent clients at >= 150 requests/s; upload + index of one image p50 <= 30 ms.

Last, the comparison of worker processes: ``serve --workers N`` for each N of ``--workers``, the
counts taking turns for ``--rounds`` rounds, each driven flat out by wrk (Debian's ``wrk``; one C
thread, ``--connections`` keep-alive connections, the multipart bodies built once in
``wrk_search.lua``) after a 3 s warm-up: closed-loop capacity side by side with the ratio to the
first count, and each run's share of the cores taken by the service (per process), by wrk and by
everything else on the machine. Python client threads would cost about as much CPU per request as
the service and so cap the ratio themselves. Target (issue 15, 2 cores): ``--workers 2`` >= 1.5x
``--workers 1``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import OUT, PNGS, ROOT, fashion_mnist, machine, percentile_ms, write_pngs
from load import cpu_seconds, have_wrk, write_bodies, wrk_closed_loop

HOME = OUT / "serve-home"
MAX_REQUESTS_PER_CLIENT = 20_000


def build_library(n: int) -> None:
    """A conv VAE (1 epoch on the training split) with every PNG indexed; skipped when already built."""
    from embedsearch.data.images import InputSpec
    from embedsearch.engine import Engine

    marker = HOME / ".complete"
    if marker.exists():
        print(f"reusing {HOME} ({marker.read_text().strip()})")
        return
    shutil.rmtree(HOME, ignore_errors=True)
    with Engine(HOME) as engine:
        x, _, what = fashion_mnist("train")
        start = time.perf_counter()
        engine.fit_model(
            "vae", "vae", x[..., None], InputSpec(28, 1), options={"epochs": 1, "arch": "conv"}, source=what
        )
        print(f"trained a conv VAE for 1 epoch on {what}: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        report = engine.index(str(PNGS), "vae")
        print(
            f"indexed {report.added:,} PNG files with the VAE in {time.perf_counter() - start:.1f} s "
            f"({report.duplicates} duplicates stored once)"
        )
        marker.write_text(f"{n:,} PNG files, {report.added:,} images in model 'vae'")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    """``embedsearch serve --workers N`` on 127.0.0.1:port, once each of its N processes has answered."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "embedsearch", "-q", "--home", str(HOME), "serve", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", str(workers)], env=env)
    deadline, answered = time.monotonic() + 120, set()
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # a new connection each time: the processes take turns accepting them
            answered.add(httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).json()["pid"])
            if len(answered) == workers:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up within 120 s ({len(answered)} of {workers} processes answered)")


def query_images(count: int) -> list[bytes]:
    files = sorted((PNGS).rglob("test-*.png"))
    rng = np.random.default_rng(0)
    return [files[i].read_bytes() for i in rng.choice(len(files), count, replace=False)]


def drive(
    url: str, clients: int, seconds: float, images: list[bytes], rate: float | None = None
) -> tuple[list[float], int, float]:
    """``clients`` threads post searches for ``seconds``; returns latencies, errors and wall time.

    Closed loop (``rate`` None): each sends its next request when the last one returns. Paced: together
    they send ``rate`` requests/s, each every clients/rate s (offset from the others), and latency
    counts from when a request was due, so a client that falls behind is charged for the wait.
    """
    import httpx

    interval = clients / rate if rate else 0.0
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = time.perf_counter() + 0.2
    stop_at = start + seconds

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            first = start + c * interval / clients
            time.sleep(max(0.0, start - time.perf_counter()))  # all threads start together
            for j in range(MAX_REQUESTS_PER_CLIENT):
                due = first + j * interval if rate else time.perf_counter()
                if due >= stop_at:
                    return
                if due > time.perf_counter():
                    time.sleep(due - time.perf_counter())
                data = images[(c * 7919 + j) % len(images)]
                r = http.post("/api/search", files={"file": ("q.png", data)}, data={"model": "vae", "k": "10"})
                latencies[c].append(time.perf_counter() - due)
                errors[c] += r.status_code != 200

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for per in latencies for x in per], sum(errors), time.perf_counter() - start


def uploads(url: str, count: int) -> tuple[list[float], list[float]]:
    """Upload ``count`` new images one at a time, then delete them; (upload, delete) latencies."""
    import httpx
    from PIL import Image

    rng = np.random.default_rng(time.time_ns() % 2**32)
    added, up, down = [], [], []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, format="PNG")
            t0 = time.perf_counter()
            r = http.post("/api/images", files={"files": ("new.png", buf.getvalue())})
            up.append(time.perf_counter() - t0)
            r.raise_for_status()
            added.append(r.json()["images"][0]["id"])
        for image_id in added:
            t0 = time.perf_counter()
            http.delete(f"/api/images/{image_id}").raise_for_status()
            down.append(time.perf_counter() - t0)
    return up, down


def visibility(url: str, count: int) -> list[float]:
    """Upload ``count`` images through one process and time until another process's search finds
    each (seconds); then delete them. Needs two processes: each client keeps one connection."""
    import httpx
    from PIL import Image

    clients: dict[int, httpx.Client] = {}
    for _ in range(100):
        client = httpx.Client(base_url=url, timeout=30)
        pid = client.get("/api/health").json()["pid"]
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if len(clients) == 2:
            break
    writer, reader = list(clients.values())[:2]
    rng, lags, added = np.random.default_rng(time.time_ns() % 2**32), [], []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, format="PNG")
        new = writer.post("/api/images", files={"files": ("new.png", buf.getvalue())}).json()["images"][0]["id"]
        added.append(new)
        start = time.perf_counter()
        while time.perf_counter() - start < 30:
            top = reader.get("/api/search", params={"image_id": new, "model": "vae", "k": 1})
            if top.status_code == 200 and top.json()["results"][0]["id"] == new:
                break
            time.sleep(0.01)
        lags.append(time.perf_counter() - start)
    for image_id in added:
        writer.delete(f"/api/images/{image_id}")
    for client in clients.values():
        client.close()
    return lags


def compare_workers(counts: list[int], rounds: int, connections: int, seconds: float, images: list[bytes]) -> None:
    """Closed-loop capacity of ``serve --workers N`` for each N, the counts taking turns for ``rounds``
    rounds (so that a burst of other load on the machine does not land on one count only)."""
    import statistics
    import tempfile

    if not have_wrk():
        print(
            "skipped the --workers comparison: it needs wrk (apt-get install wrk), a client that leaves the cores free"
        )
        return
    rates: dict[int, list[float]] = {n: [] for n in counts}
    lags: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        count = write_bodies(images, Path(tmp), "vae")
        for _ in range(rounds):
            for workers in counts:
                port = free_port()
                server = start_server(port, workers)
                url = f"http://127.0.0.1:{port}"
                try:
                    wrk_closed_loop(url, Path(tmp), count, connections, 3.0, server.pid)  # warm-up: every process
                    load = wrk_closed_loop(url, Path(tmp), count, connections, seconds, server.pid)
                    if workers > 1:  # then the same load again, with uploads through one process
                        background = threading.Thread(
                            target=wrk_closed_loop, args=(url, Path(tmp), count, connections, seconds, server.pid)
                        )
                        background.start()
                        lags.extend(visibility(url, 8))
                        background.join()
                finally:
                    server.terminate()
                    server.wait(timeout=30)
                rates[workers].append(load.rate)
                print(
                    f"POST /api/search (vae, k=10), serve --workers {workers}, "
                    f"wrk closed loop, {connections} connections: "
                    f"{load.requests:,} requests in {load.seconds:.1f} s -> {load.rate:,.0f} requests/s, "
                    f"p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, {load.errors} errors; {load.shares()}"
                )
    medians = {n: statistics.median(r) for n, r in rates.items()}
    base = medians[counts[0]]
    print(f"closed-loop capacity, median of {rounds} round{'s' if rounds > 1 else ''}:")
    for n in counts:
        each = ", ".join(f"{r:,.0f}" for r in rates[n])
        print(
            f"  --workers {n}: {medians[n]:,.0f} requests/s ({each}); {medians[n] / base:.2f} x --workers {counts[0]}"
        )
    if lags:
        print(
            f"an upload through one process found by another's search, under the same closed-loop load: "
            f"p50 {percentile_ms(lags, 50):.0f} ms, max {max(lags) * 1000:.0f} ms ({len(lags)} uploads)"
        )


def service_figures(args: argparse.Namespace, images: list[bytes]) -> None:
    """One service process: closed loop with 1 and 8 Python clients, paced 8 clients, uploads."""
    import httpx

    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        vectors = next(m["vectors"] for m in httpx.get(f"{url}/api/models").json()["models"] if m["name"] == "vae")
        drive(url, 2, 3.0, images)  # warm-up: model, index, caches, connections
        for clients in (1, 8):
            server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
            lat, errors, wall = drive(url, clients, args.seconds, images)
            server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
            print(
                f"POST /api/search (vae, k=10, {vectors:,} vectors), "
                f"{clients} client{'s' if clients > 1 else ''}, closed loop: "
                f"{len(lat):,} requests in {wall:.1f} s -> {len(lat) / wall:,.0f} requests/s, "
                f"p50 {percentile_ms(lat, 50):.1f} ms, p99 {percentile_ms(lat, 99):.1f} ms, {errors} errors; "
                f"CPU per request: server {server_cpu / len(lat) * 1000:.2f} ms, "
                f"clients {client_cpu / len(lat) * 1000:.2f} ms"
            )
        lat, errors, wall = drive(url, 8, args.seconds, images, rate=args.rate)
        print(
            f"POST /api/search (vae, k=10, {vectors:,} vectors), 8 clients paced at {args.rate:,.0f} requests/s "
            f"together: {len(lat):,} requests in {wall:.1f} s -> {len(lat) / wall:,.0f} requests/s, "
            f"p50 {percentile_ms(lat, 50):.1f} ms, p99 {percentile_ms(lat, 99):.1f} ms, {errors} errors"
        )
        up, down = uploads(url, args.uploads)
        print(
            f"POST /api/images (store + index one 28x28 PNG), 1 client, {len(up)} uploads: "
            f"p50 {percentile_ms(up, 50):.1f} ms, p99 {percentile_ms(up, 99):.1f} ms; "
            f"DELETE p50 {percentile_ms(down, 50):.1f} ms"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per client count")
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s of the paced 8-client load")
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument(
        "--workers", default="1,2", help="worker counts whose closed-loop capacity to compare ('' none)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the worker comparison (the counts take turns)")
    parser.add_argument("--connections", type=int, default=16, help="wrk's connections in the worker comparison")
    parser.add_argument("--only-workers", action="store_true", help="just the worker comparison")
    args = parser.parse_args()
    print(machine())
    print(
        f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(other work competes for the cores)"
    )
    n = write_pngs()
    build_library(n)
    images = query_images(500)
    if not args.only_workers:
        service_figures(args, images)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    if counts:
        compare_workers(counts, args.rounds, args.connections, args.seconds, images[:200])


if __name__ == "__main__":
    main()
