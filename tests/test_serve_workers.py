"""``embedsearch serve --workers N``: N service processes over one library.

The quick tests check the command's side (the count, the settings handed to uvicorn and read by
each worker); the slow ones start the real command and show that two processes answer, that a
write through one shows through every one, and that stopping the parent leaves no process behind.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from embedsearch.cli.main import main
from embedsearch.errors import EmbedSearchError, NoLibraryError
from embedsearch.http import workers
from embedsearch.http.state import default_decodes
from helpers import noise_image, png_bytes

TOKEN = "w0rker-s3cret"


def test_zero_workers_is_refused_in_one_line(library_home: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(library_home), "serve", "--workers", "0"])
    assert result.exit_code == 1
    cores = os.cpu_count() or 1
    assert result.stderr == f"Error: --workers must be at least 1, not 0 (one per core: {cores} on this machine)\n"


def test_more_workers_than_cores_is_allowed_with_a_warning(
    library_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from embedsearch.cli.serve import serve

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(workers, "run_workers", lambda *args: calls.append(args))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    obj = {"home": str(library_home), "db": None, "quiet": True}
    with caplog.at_level(logging.WARNING, logger="embedsearch"):
        result = CliRunner().invoke(serve, ["--workers", "3"], obj=obj)
    assert result.exit_code == 0, result.output
    assert calls[-1][4] == 3
    assert "3 workers on 2 cores" in caplog.text


def test_each_worker_gets_the_settings_and_builds_its_own_app(
    library_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve hands the workers one ServeConfig (the token too, never on a command line or in the
    environment); each builds its app from it over an Engine of its own."""
    from embedsearch.cli import serve as serve_module

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(workers, "run_workers", lambda *args: seen.append(dict(zip(RUN_ARGS, args, strict=True))))
    obj = {"home": str(library_home), "db": None, "quiet": True}
    args = ["--workers", "2", "--port", "0", "--token-for-reads", "--max-upload-mb", "1", "--allow-host", "photos.lan"]
    result = CliRunner().invoke(serve_module.serve, args, obj=obj, env={"EMBEDSEARCH_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    call = seen[-1]
    assert (call["host"], call["port"], call["count"], call["build"]) == ("127.0.0.1", 0, 2, serve_module.worker_app)
    config = call["config"]
    assert (config.home, config.token, config.token_for_reads) == (str(library_home.resolve()), TOKEN, True)
    assert config.max_upload_bytes == 2**20 and "photos.lan" in config.allowed_hosts
    assert config.max_decodes == default_decodes(2)  # per process: the cores but one, shared by the workers
    assert pickle.loads(pickle.dumps(config)) == config  # it travels to each worker through a pipe

    app = serve_module.worker_app(config)
    service = app.state.service
    assert (service.token, service.token_for_reads, service.max_upload_bytes) == (TOKEN, True, 2**20)
    assert service.engine.home == library_home.resolve() and service.owns_engine
    service.engine.close()


RUN_ARGS = ("config", "build", "host", "port", "count", "log_level")


def test_a_busy_port_is_one_line(library_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["--home", str(library_home), "-q", "serve", "--workers", "2", "--port", str(port)]
        )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")


# -- the real command ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(root: int) -> set[int]:
    """The live processes started by ``root``, at any depth (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else None
        except OSError:
            continue
        if fields and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    tree: set[int] = set()
    grew = {root}
    while grew:
        grew = {pid for pid, parent in parents.items() if parent in grew} - tree
        tree |= grew
    return tree


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def serving(home: Path, workers: int, **popen: Any) -> Iterator[tuple[subprocess.Popen[bytes], str, set[int]]]:
    """``embedsearch serve --workers N`` (token from the environment) once all N answered: (process, URL, pids)."""
    port = free_port()
    command = [sys.executable, "-m", "embedsearch", "-q", "--home", str(home), "serve", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"EMBEDSEARCH_TOKEN": TOKEN}
    proc = subprocess.Popen([*command, "--workers", str(workers)], env=env, stderr=subprocess.PIPE, **popen)
    url, pids = f"http://127.0.0.1:{port}", set()
    try:
        deadline = time.monotonic() + 60
        while len(pids) < workers:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
            try:  # a new connection each time: the processes take turns accepting them
                pids.add(httpx.get(f"{url}/api/health", timeout=5).json()["pid"])
            except httpx.TransportError:
                time.sleep(0.1)
        yield proc, url, pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def pinned_clients(url: str, pids: set[int]) -> dict[int, httpx.Client]:
    """One keep-alive client per worker process: a connection stays with the process that accepted it."""
    clients: dict[int, httpx.Client] = {}
    for _ in range(200):
        if len(clients) == len(pids):
            return clients
        client = httpx.Client(base_url=url, timeout=10)
        pid = client.get("/api/health").json()["pid"]
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
    raise AssertionError(f"200 connections reached only the processes {sorted(clients)} of {sorted(pids)}")


def wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


@pytest.mark.slow
def test_two_workers_share_the_library_and_stop_with_the_parent(library_home: Path) -> None:
    with serving(library_home, 2) as (proc, url, pids):
        assert len(pids) == 2 and proc.pid not in pids
        tree = descendants(proc.pid)
        assert pids <= tree
        for pid in tree | {proc.pid}:  # the token is in no process's command line (`ps`)
            assert TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        for pid in pids:  # one torch thread per request in each worker, as in one process
            assert b"OMP_NUM_THREADS=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        clients = pinned_clients(url, pids)
        writer, reader = list(clients)
        try:
            for client in clients.values():  # every process has the settings: the token is needed
                files = {"files": ("n.png", png_bytes(noise_image(90, 24)))}
                assert client.post("/api/images", files=files).status_code == 401
            before = {pid: c.get("/api/stats").json()["images"] for pid, c in clients.items()}
            files = {"files": ("new.png", png_bytes(noise_image(91, 24)))}
            answer = clients[writer].post("/api/images", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200, answer.text
            new = answer.json()["images"][0]["id"]
            assert clients[writer].get("/api/health").json()["pid"] == writer
            seen: dict[int, float] = {}
            start, deadline = time.monotonic(), time.monotonic() + 2.0 * 3  # target 2 s; 3x slack for CI
            while len(seen) < 2 and time.monotonic() < deadline:
                for pid, client in clients.items():
                    top = client.get("/api/search", params={"image_id": new, "model": "pixels", "k": 1})
                    if pid not in seen and top.status_code == 200 and top.json()["results"][0]["id"] == new:
                        assert client.get("/api/stats").json()["images"] == before[pid] + 1
                        seen[pid] = time.monotonic() - start
                time.sleep(0.05)
            assert set(seen) == {writer, reader}, f"the upload through {writer} showed only in {sorted(seen)}"
            assert clients[reader].get("/api/health").json()["pid"] == reader  # still the other process
        finally:
            for client in clients.values():
                client.close()
        proc.send_signal(signal.SIGTERM)  # what a service manager sends; Ctrl+C (SIGINT) is handled alike
        assert proc.wait(timeout=30) == 0
        assert not wait_gone(tree, 10), "worker processes outlived the stopped parent"


@pytest.mark.slow
def test_workers_stop_when_the_parent_is_killed(library_home: Path) -> None:
    """SIGKILL leaves the parent no chance to stop its workers: each notices and stops by itself."""
    with serving(library_home, 2) as (proc, _, pids):
        tree = descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        assert not wait_gone(tree, 15), "worker processes kept serving after their parent was killed"
    assert pids <= tree


@pytest.mark.slow
def test_ctrl_c_stops_every_process_cleanly(library_home: Path) -> None:
    """Ctrl+C signals the whole process group: the workers and the parent all stop, with no error."""
    with serving(library_home, 2, start_new_session=True) as (proc, _, _pids):
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and b"could not start" not in proc.stderr.read()
        assert not wait_gone(tree, 10)


def cannot_start(config: workers.ServeConfig) -> Any:
    """An app builder that fails as a worker's does when its library went away (pickled by name)."""
    raise NoLibraryError(f"no library at {config.home}")


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    config = workers.ServeConfig(str(tmp_path / "gone"))
    started = time.monotonic()
    with pytest.raises(EmbedSearchError, match="could not start"):
        workers.run_workers(config, cannot_start, "127.0.0.1", 0, 2, "warning")
    assert time.monotonic() - started < 60  # it gave up, not restarted the workers forever


@pytest.mark.slow
def test_a_killed_worker_is_replaced(library_home: Path) -> None:
    with serving(library_home, 2) as (proc, url, pids):
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline, now = time.monotonic() + 30, set()
        while len(now - pids) < 1:  # a new process answers beside the one left
            assert time.monotonic() < deadline and proc.poll() is None, "no worker replaced the killed one"
            try:
                now.add(httpx.get(f"{url}/api/health", timeout=5).json()["pid"])
            except httpx.TransportError:
                time.sleep(0.1)
        assert victim not in now and len(descendants(proc.pid) & (pids | now)) == 2
