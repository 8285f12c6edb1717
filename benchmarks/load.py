"""Closed-loop load from wrk, and CPU accounting by process tree (serve.py's comparison of workers).

The load generator runs on the machine it measures, so it must be cheap: wrk (Debian's ``wrk``
package; one epoll thread in C, each request built once in ``wrk_search.lua``) costs a few percent
of a core where Python client threads cost about as much CPU per request as the service. Every
load reports who used the cores meanwhile: the service's processes, wrk, and the rest of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LUA = Path(__file__).with_name("wrk_search.lua")
BOUNDARY = "embedsearch-benchmark-boundary"
TICK = os.sysconf("SC_CLK_TCK")


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def write_bodies(images: list[bytes], folder: Path, model: str, k: int = 10) -> int:
    """One multipart body (``file``, ``model``, ``k``) per image as ``folder/NNNN.body``; their count."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(images):
        parts = [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'.encode(),
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode(),
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'.encode()
            + b"Content-Type: image/png\r\n\r\n"
            + data
            + b"\r\n",
            f"--{BOUNDARY}--\r\n".encode(),
        ]
        (folder / f"{i:04d}.body").write_bytes(b"".join(parts))
    return len(images)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): a figure that other load on the machine barely moves."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds so far of ``root`` and each of its descendants (the service's worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    seconds = {}
    for pid in tree:
        try:
            seconds[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return seconds


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process; /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / TICK


@dataclass
class Load:
    """One closed-loop run: what was served, and who used the cores meanwhile (CPU seconds)."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    client_cpu: float
    machine_cpu: float
    service_cpu: dict[int, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def shares(self) -> str:
        """Each party's share of the machine's cores over the run."""
        cores = (os.cpu_count() or 1) * self.seconds
        service = sum(self.service_cpu.values())
        busy = [f"{s / cores:.0%}" for s in sorted(self.service_cpu.values(), reverse=True) if s / cores >= 0.01]
        other = max(0.0, self.machine_cpu - service - self.client_cpu)
        return (
            f"share of the {os.cpu_count()} cores: service {service / cores:.0%} ({' + '.join(busy)} by process), "
            f"wrk {self.client_cpu / cores:.0%}, everything else {other / cores:.0%}"
        )


def wrk_closed_loop(url: str, bodies: Path, count: int, connections: int, seconds: float, server: int) -> Load:
    """``connections`` keep-alive connections, each sending its next search as soon as the last returns."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(LUA), url]
    command += ["--", str(bodies), str(count), BOUNDARY]
    service, machine = tree_cpu(server), machine_busy()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # wrk's own CPU time, not that of other children
    proc.returncode = os.waitstatus_to_exitcode(status)
    machine = machine_busy() - machine
    after = tree_cpu(server)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {out.strip()}")
    result = json.loads(out.strip().splitlines()[-1])
    return Load(
        requests=result["requests"],
        seconds=result["duration_us"] / 1e6,
        errors=result["status_errors"] + result["socket_errors"],
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        client_cpu=usage.ru_utime + usage.ru_stime,
        machine_cpu=machine,
        service_cpu={pid: after[pid] - service.get(pid, 0.0) for pid in after},
    )
