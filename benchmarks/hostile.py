"""Hostile requests against the HTTP service: peak memory and ordinary searches' latency under attack.

    .venv/bin/python benchmarks/hostile.py [--seconds 20] [--rate 40] [--max-decodes N] [--keep]

Builds a library in a temporary folder: 400 generated shapes (28x28 grey), indexed into ``pixels``, a
PCA model and a conv VAE trained for 1 epoch (``embedsearch train``), each indexed. Starts the service
as a separate process (``embedsearch -q serve`` on 127.0.0.1, default limits) and drives it with
client threads (httpx) on the same machine:

- 4 normal clients search with small PNG queries (28x28, ``POST /api/search``, VAE, k=10), paced:
  together ``--rate`` requests/s, each on its own even schedule; latency counts from when a request
  was due, so a client that falls behind is charged for the wait;
- baseline: the normal clients alone for ``--seconds``;
- attack: the normal clients again while 16 attackers send, in a closed loop and ignoring
  Retry-After, the worst images under the caps, all tiny on the wire: 4 x a 16-bit grey PNG of
  exactly the query cap (4000x4000, 16 MP), 4 x a 16-bit RGBA PNG of the query cap, 4 x a
  progressive JPEG of the query cap (searches), and 4 x a 16-bit RGBA PNG of the library's cap
  (7071x7071, 50 MP) uploaded to ``POST /api/images`` (no token on loopback: anyone local may).

The service's memory is read from /proc: VmHWM (peak resident set since it started) at the end, and
VmRSS polled every 20 ms during each phase. Targets (issue 12): peak RSS <= 1.5 GB; normal-client
p99 <= 250 ms during the attack.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from common import ROOT, machine, percentile_ms

MB = 1024 * 1024
QUERY_CAP_SIDE = 4000  # 16,000,000 pixels: the service's default query cap
LIBRARY_CAP_SIDE = 7071  # 49,999,041 pixels: just under the library's 50,000,000
TARGET_RSS_MB = 1536
TARGET_P99_MS = 250.0


def cli(home: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "embedsearch", "-q", "--home", str(home), *args], env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"embedsearch {' '.join(args)} failed:\n{run.stderr}")


def build_library(home: Path, data: Path) -> None:
    from embedsearch.data.synth import make_shapes

    start = time.perf_counter()
    make_shapes(data, per_class=50, size=28, mode="L")
    cli(home, "index", str(data), "--model", "pixels")
    cli(home, "train", str(data), "--model", "pca", "--dim", "16")
    cli(home, "index", str(data), "--model", "pca")
    cli(home, "train", str(data), "--model", "vae", "--epochs", "1")
    cli(home, "index", str(data), "--model", "vae")
    print(f"library: 400 shapes (28x28 grey) in pixels, pca and vae (1 epoch): {time.perf_counter() - start:.1f} s")


# -- the attack images ---------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16(side: int, colour_type: int) -> bytes:
    """A real side x side 16-bit PNG (0 grey, 6 RGBA) of a few stripes: every row is inflated and unfiltered."""
    channels = {0: 1, 6: 4}[colour_type]
    packer = zlib.compressobj(9)
    rows = [b"\0" + bytes([v, 0]) * channels * side for v in (0, 90, 180)]
    body = b"".join(packer.compress(rows[(y // 64) % 3]) for y in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def progressive_jpeg(side: int) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (side, side), (30, 120, 200))
    im.paste((250, 240, 10), (side // 4, side // 4, side // 2, side // 2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def small_queries(data: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(data.rglob("*.png"))[::8]]


# -- the service ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(home: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "embedsearch", "-q", "--home", str(home), "serve", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssPoller(threading.Thread):
    """The largest VmRSS of the service seen while it runs (every 20 ms)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))

    def stop(self) -> float:
        self.stopped.set()
        self.join()
        return self.peak_kb / 1024


# -- the clients ---------------------------------------------------------------------------------


def normal_clients(url: str, queries: list[bytes], seconds: float, rate: float, clients: int = 4) -> list[float]:
    """Paced small searches; latencies counted from when each request was due."""
    import httpx

    interval = clients / rate
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[int] = [0] * clients
    start = time.perf_counter() + 0.2
    stop_at = start + seconds

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for j in range(1_000_000):
                due = start + c * interval / clients + j * interval
                if due >= stop_at:
                    return
                time.sleep(max(0.0, due - time.perf_counter()))
                data = queries[(c * 31 + j) % len(queries)]
                r = http.post("/api/search", files={"file": ("q.png", data)}, data={"model": "vae", "k": "10"})
                latencies[c].append(time.perf_counter() - due)
                errors[c] += r.status_code != 200

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if sum(errors):
        print(f"  normal clients: {sum(errors)} requests failed")
    return [x for per in latencies for x in per]


class Attackers:
    """Closed-loop clients sending worst-case images; counts the answers by kind and status."""

    def __init__(self, url: str, attacks: list[tuple[str, str, bytes]], per_kind: int = 4) -> None:
        self.url, self.attacks, self.per_kind = url, attacks, per_kind
        self.stopped = threading.Event()
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(a,), daemon=True) for a in attacks for _ in range(per_kind)
        ]

    def _run(self, attack: tuple[str, str, bytes]) -> None:
        import httpx

        kind, path, data = attack
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stopped.is_set():
                if path == "/api/images":
                    r = http.post(path, files={"files": ("big.png", data)})
                else:
                    r = http.post(path, files={"file": ("big", data)}, data={"model": "vae", "k": "10"})
                with self.lock:
                    self.counts[(kind, r.status_code)] += 1

    def __enter__(self) -> Attackers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=120)


def phase(name: str, lat: list[float], rss_mb: float) -> float:
    p99 = percentile_ms(lat, 99)
    print(
        f"  {name}: {len(lat):,} normal searches, p50 {percentile_ms(lat, 50):.1f} ms, p99 {p99:.1f} ms, "
        f"max {max(lat) * 1000:.0f} ms; service peak RSS in the phase {rss_mb:,.0f} MB"
    )
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the baseline and of the attack")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s of the 4 normal clients together")
    parser.add_argument("--max-decodes", type=int, default=None, help="passed to serve (default: its own)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary library")
    args = parser.parse_args()
    print(machine())
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="embedsearch-hostile-"))
    home, data = work / "home", work / "data"
    try:
        build_library(home, data)
        attacks = [
            ("16-bit grey PNG 4000x4000", "/api/search", png16(QUERY_CAP_SIDE, 0)),
            ("16-bit RGBA PNG 4000x4000", "/api/search", png16(QUERY_CAP_SIDE, 6)),
            ("progressive JPEG 4000x4000", "/api/search", progressive_jpeg(QUERY_CAP_SIDE)),
            ("16-bit RGBA PNG 7071x7071 upload", "/api/images", png16(LIBRARY_CAP_SIDE, 6)),
        ]
        for kind, _, body in attacks:
            print(f"attack image: {kind}, {len(body) / 1024:,.0f} KB on the wire")
        queries = small_queries(data)
        port = free_port()
        extra = ["--max-decodes", str(args.max_decodes)] if args.max_decodes else []
        server = start_server(home, port, extra)
        url = f"http://127.0.0.1:{port}"
        try:
            normal_clients(url, queries, 3.0, args.rate)  # warm-up: model, index, connections
            print(f"service RSS after warm-up: {status_kb(server.pid, 'VmRSS') / 1024:,.0f} MB")
            limits = " ".join(extra) or "(default limits)"
            print(f"serve {limits}; 4 normal clients at {args.rate:g} requests/s together")
            poller = RssPoller(server.pid)
            poller.start()
            base = phase("baseline, no attack", normal_clients(url, queries, args.seconds, args.rate), poller.stop())
            poller = RssPoller(server.pid)
            poller.start()
            with Attackers(url, attacks) as attackers:
                time.sleep(1.0)  # let the attack reach its steady state
                lat = normal_clients(url, queries, args.seconds, args.rate)
            p99 = phase("during the attack (16 attackers)", lat, poller.stop())
            hwm = status_kb(server.pid, "VmHWM") / 1024
            for (kind, status), n in sorted(attackers.counts.items()):
                print(f"  attacker answers: {kind}: {n:,} x {status}")
            alive = server.poll() is None
            print(f"service still up: {alive}; its peak RSS since start (VmHWM): {hwm:,.0f} MB")
            print(
                f"targets: peak RSS <= {TARGET_RSS_MB:,} MB: {'met' if hwm <= TARGET_RSS_MB else 'MISSED'} "
                f"({hwm:,.0f} MB); normal p99 <= {TARGET_P99_MS:.0f} ms during the attack: "
                f"{'met' if p99 <= TARGET_P99_MS else 'MISSED'} ({p99:.1f} ms; baseline {base:.1f} ms)"
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
