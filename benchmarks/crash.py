"""Crash campaign: SIGKILL ``index`` and ``train`` at random moments; every re-run must leave the library whole.

    .venv/bin/python benchmarks/crash.py [--images 10000] [--kills 50] [--train-kills 6] [--seed 0] [--keep]

Part 0 (a new library). ``--new-library-kills`` times, ``index`` on a new library is killed 0-60 ms
after ``library.db`` appears (while the schema is being created) and then re-run: the re-run must
succeed.

Part 1 (index). Writes ``--images`` small grey PNG files (16x16, 8 label folders) plus a few bad
files, then, until ``--kills`` runs have been SIGKILLed and re-run: changes the library or the folder a little
(forgets 1-3 label folders so that their images must be indexed again, rewrites 20 files with new
content, adds 20 files, copies 5 files under new names, rewrites 2 files with another file's
content, swaps the contents of 2 files, renames 2 files), starts
``python -m embedsearch --home H index DIR --model pixels --batch-size 200``,
SIGKILLs it at a random moment (seeded; a quarter of the moments anywhere in start-up, the rest
while it indexes; every 5th run its re-run is killed too), then re-runs it to completion and
checks:

- the re-run exits 0 and reports exactly the bad files as failed, each once;
- ``embedsearch check --json`` says ok with no notes (the FAISS file on disk agrees with the DB);
- the database holds exactly one image row and one index entry per distinct good content on disk,
  each row's file has that content, the FAISS file's ids are the entry ids, and the stored vector
  of every file changed in the cycle (and of 300 random others) is its decoded pixels;
- no worker process of the killed run outlives it (their BrokenPipeError tracebacks are counted,
  any other traceback is a failure).

Part 2 (train). A small AE (``train DATA --model ae --epochs 3``) is killed at random moments (a
random phase of what the attempt has left -- start-up, or the time after an epoch's log line, when
its checkpoints are written and the next epoch runs -- and a random delay in it) and resumed with
``--resume`` until it completes: each resume must say it continues after the epoch the
resume state (``models/NAME/resume.json``) recorded at the kill, the final report has epochs 1..3,
no temporary files are left, ``check`` is ok, and the final weights equal those of an
uninterrupted run with the same seed.

Prints one line per run, then the outcomes and timings. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, machine

sys.path.insert(0, str(ROOT))

import contextlib

from embedsearch.core.vectors import VectorIndex
from embedsearch.data.images import InputSpec, decode_file
from embedsearch.data.synth import SHAPES, make_image_array
from embedsearch.encoders.classic import to_unit_float
from embedsearch.engine import Engine

SPEC = InputSpec(16, 1)
CLI = [sys.executable, "-m", "embedsearch"]


@dataclass
class Cycle:
    n: int
    todo: int = 0  # images the killed run had to (re)index
    kill_at: float = 0.0
    outcome: str = ""
    committed: int = 0  # index entries the killed run committed before it died
    orphans: int = 0
    rerun_killed: bool = False
    pipe_noise: int = 0  # killed runs whose pool workers printed a BrokenPipeError traceback
    rerun_s: float = 0.0
    check_s: float = 0.0
    problems: list[str] = field(default_factory=list)


# -- the corpus --------------------------------------------------------------------------------------


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "L").save(path)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring ``width`` x ``height`` over a tiny body (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def make_corpus(root: Path, n: int, seed: int) -> set[str]:
    """``n`` shape images in label folders, and the bad files (returned as absolute paths)."""
    images, labels = make_image_array(n, 16, 1, seed=seed)
    for i, (arr, label) in enumerate(zip(images, labels, strict=False)):
        write_png(root / SHAPES[label] / f"{i:05d}.png", arr[..., 0])
    good = (root / SHAPES[int(labels[0])] / "00000.png").read_bytes()
    bad = {
        root / SHAPES[0] / "empty.png": b"",
        root / SHAPES[1] / "text.png": b"not an image\n",
        root / SHAPES[2] / "truncated.png": good[: len(good) // 2],
        root / "bomb.png": png_declaring(100_000, 100_000),
    }
    for path, data in bad.items():
        path.write_bytes(data)
    os.symlink(root / "gone.png", root / "dangling.png")
    return {str(p) for p in bad} | {str(root / "dangling.png")}


def good_files(root: Path, bad: set[str]) -> dict[str, str]:
    """path -> sha256 of every good image file under ``root``."""
    out = {}
    for path in root.rglob("*.png"):
        if str(path) not in bad:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def perturb(engine: Engine, root: Path, cycle: int, rng: random.Random, bad: set[str]) -> tuple[set[str], int, int]:
    """Make work for the next run: (paths whose stored vector to verify, files to read, new entries due)."""
    files = sorted(good_files(root, bad))
    forgotten: set[str] = set()
    for label in rng.sample(SHAPES, rng.randint(1, 3)):  # forget whole folders: re-indexed next run
        engine.remove([str(root / label)])
        forgotten.update(p for p in files if Path(p).parent.name == label)
    changed: set[str] = set()
    for path in rng.sample(files, 20):  # new content under the same name: 'updated'
        write_png(Path(path), np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (16, 16), np.uint8))
        changed.add(path)
    for i in range(20):  # new files: 'added'
        path = root / rng.choice(SHAPES) / f"new-{cycle:03d}-{i:02d}.png"
        write_png(path, np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (16, 16), np.uint8))
        changed.add(str(path))
    copies = set()
    for i, src in enumerate(rng.sample(files, 5)):  # copies under new names: 'duplicates'
        dest = Path(src).with_name(f"copy-{cycle:03d}-{i}.png")
        shutil.copy(src, dest)
        copies.add(str(dest))
    for dest, src in zip(rng.sample(files, 2), rng.sample(files, 2), strict=False):  # content of another file
        if dest != src:
            shutil.copyfile(src, dest)
            copies.add(dest)
    a, b = rng.sample(files, 2)  # two files swap contents through a temporary name: 'updated' twice
    os.rename(a, a + ".swap")
    os.rename(b, a)
    os.rename(a + ".swap", b)
    changed |= {a, b}
    # Renames: the stored image follows its file. Not of a file rewritten in this cycle: that would
    # be a deletion (whose row stays until 'embedsearch remove', by design) plus a new file.
    for i, src in enumerate(rng.sample([p for p in files if p not in changed | copies | {a, b}], 2)):
        dest = Path(src).with_name(f"moved-{cycle:03d}-{i}.png")
        os.rename(src, dest)
        changed.add(str(dest))
        forgotten.discard(src)
    now = time.time()
    for i, path in enumerate(sorted(changed - forgotten)):  # a distinct mtime each (the scan's quick check)
        if os.path.exists(path):
            os.utime(path, (now + i * 1e-3, now + i * 1e-3))
    due = (forgotten | changed) - copies
    verify = changed | set(rng.sample(sorted(forgotten), min(200, len(forgotten))))
    return verify, len(forgotten | changed | copies), len(due)


# -- observing a library from outside ----------------------------------------------------------------


def db_query(home: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(f"file:{home / 'library.db'}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def entry_sequence(home: Path) -> int:
    """The highest index-entry id ever handed out (entry ids only grow; max(id) drops when the newest
    entries are removed, the sequence does not)."""
    try:
        rows = db_query(home, "SELECT seq FROM sqlite_sequence WHERE name = 'index_entries'")
    except sqlite3.Error:
        return 0
    return rows[0][0] if rows else 0


def entries_after(home: Path, after: int) -> int:
    """How many index entries with an id above ``after`` the database holds (committed since)."""
    try:
        return db_query(home, "SELECT count(*) FROM index_entries WHERE id > ?", (after,))[0][0]
    except sqlite3.Error:
        return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_and_kill(cmd: list[str], kill_at: float, after: str | None = None) -> tuple[bool, int, str, float]:
    """Start ``cmd`` and SIGKILL it ``kill_at`` s after it started, or after it printed a stderr line
    matching the regex ``after``; (killed, orphaned workers, stderr, seconds it ran)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    lines: list[str] = []
    trigger = [None if after else started]
    reader = threading.Thread(target=_read_lines, args=(proc, lines, after, trigger), daemon=True)
    reader.start()
    while proc.poll() is None and (trigger[0] is None or time.monotonic() - trigger[0] < kill_at):
        time.sleep(0.005)
    if proc.poll() is not None:
        reader.join(timeout=10)
        return False, 0, "".join(lines), time.monotonic() - started
    kids = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    deadline = time.monotonic() + 3.0
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [k for k in kids if alive(k)]
    for pid in orphans:  # workers of the run we started: ours to end
        os.kill(pid, signal.SIGKILL)
    return True, len(orphans), "".join(lines), time.monotonic() - started


def _read_lines(proc: subprocess.Popen[str], lines: list[str], after: str | None, trigger: list) -> None:
    for line in proc.stderr or []:
        lines.append(line)
        if after and trigger[0] is None and re.match(after, line):
            trigger[0] = time.monotonic()


# -- part 0: a new library ---------------------------------------------------------------------------


def new_library_campaign(work: Path, args: argparse.Namespace, rng: random.Random) -> tuple[list[str], int]:
    """Kill ``index`` while it creates a new library (just after library.db appears); re-run it."""
    data = work / "small"
    images, _ = make_image_array(20, 16, 1, seed=args.seed + 2)
    for i, arr in enumerate(images):
        write_png(data / f"{i:02d}.png", arr[..., 0])
    lines, bricked = [], 0
    for trial in range(args.new_library_kills):
        home = work / f"new-{trial}"
        proc = subprocess.Popen(index_cmd(home, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (home / "library.db").exists() and proc.poll() is None:
            time.sleep(0.001)
        delay = rng.uniform(0.0, 0.06)
        time.sleep(delay)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rerun = subprocess.run(index_cmd(home, data, "--json"), check=False, capture_output=True, text=True)
        ok = rerun.returncode == 0 and json.loads(rerun.stdout)["added"] + json.loads(rerun.stdout)["unchanged"] == 20
        bricked += not ok
        lines.append(
            f"new library {trial + 1:2d}: SIGKILL {delay * 1000:4.1f} ms after library.db appeared"
            f"{'' if killed else ' (had finished)'}; re-run: "
            + ("OK" if ok else f"FAILED exit {rerun.returncode}: {rerun.stderr.strip()[-160:]}")
        )
        print(lines[-1], flush=True)
        shutil.rmtree(home, ignore_errors=True)
    return lines, bricked


# -- part 1: index ------------------------------------------------------------------------------------


def index_cmd(home: Path, data: Path, *extra: str) -> list[str]:
    """The brief's command, with -q (errors only on stderr)."""
    return [*CLI, "-q", "--home", str(home), "index", str(data), "--model", "pixels", "--batch-size", "200", *extra]


def verify(
    home: Path, data: Path, bad: set[str], touched: set[str], rerun: dict, rng: random.Random, cycle: Cycle
) -> None:
    problems = cycle.problems
    failed = [f["path"] for f in rerun["failed"]]
    if sorted(failed) != sorted(bad):
        problems.append(f"re-run reported failed {sorted(failed)}, expected {sorted(bad)}")
    started = time.perf_counter()
    check = subprocess.run([*CLI, "--home", str(home), "check", "--json"], check=False, capture_output=True, text=True)
    cycle.check_s = time.perf_counter() - started
    try:
        report = json.loads(check.stdout)
    except json.JSONDecodeError:
        report = {"ok": False, "problems": [check.stderr[-500:]], "notes": []}
    if check.returncode != 0 or not report["ok"] or report["notes"]:
        problems.append(f"check: exit {check.returncode}, problems {report['problems']}, notes {report['notes']}")
    on_disk = good_files(data, bad)
    rows = db_query(
        home, "SELECT i.id, i.path, i.sha256, e.vector FROM images i LEFT JOIN index_entries e ON e.image_id = i.id"
    )
    entries = db_query(home, "SELECT image_id FROM index_entries")
    shas = [r[2] for r in rows]
    if set(shas) != set(on_disk.values()):
        lost, extra = set(on_disk.values()) - set(shas), set(shas) - set(on_disk.values())
        problems.append(f"contents lost: {len(lost)}, stored but not on disk: {len(extra)}")
    if len(rows) != len(set(shas)) or len(entries) != len({e[0] for e in entries}) or len(entries) != len(rows):
        problems.append(f"{len(rows)} rows, {len(set(shas))} distinct contents, {len(entries)} entries")
    by_path = {r[1]: r for r in rows}
    for image_id, path, sha, vector in rows:
        if vector is None:
            problems.append(f"image {image_id} ({path}) has no vector")
        elif on_disk.get(path) != sha:
            problems.append(f"image {image_id}: {path} does not hold its stored content")
    sample = (touched | set(rng.sample(sorted(on_disk), 100))) & set(by_path)
    for path in sorted(sample):
        want = to_unit_float(decode_file(path, SPEC)[1][None])[0]
        if not np.array_equal(np.frombuffer(by_path[path][3], np.float32), want):
            problems.append(f"stored vector of {path} is not its pixels")
    index = VectorIndex.load(home / "indexes" / "pixels.faiss", SPEC.image_size**2, "l2")
    if sorted(index.ids().tolist()) != sorted(e[0] for e in entries):
        problems.append("the FAISS file's ids differ from the database's entries")


def index_campaign(work: Path, args: argparse.Namespace, rng: random.Random) -> list[Cycle]:
    data, home = work / "data", work / "home"
    started = time.perf_counter()
    bad = make_corpus(data, args.images, args.seed)
    print(f"wrote {args.images} PNG files and {len(bad)} bad ones in {time.perf_counter() - started:.1f} s")
    # Calibration on a scratch library: a full run, and a run with nothing to do (start-up + scan).
    scratch = work / "scratch"
    t0 = time.perf_counter()
    subprocess.run(index_cmd(scratch, data), check=True, stdout=subprocess.DEVNULL)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(index_cmd(scratch, data), check=True, stdout=subprocess.DEVNULL)
    idle = time.perf_counter() - t0
    shutil.rmtree(scratch)
    per_image = max(full - idle, 0.1) / args.images
    scale = 1.0
    print(
        f"calibration: full run {full:.1f} s, nothing-to-do run {idle:.1f} s "
        f"-> {per_image * 1e3:.2f} ms per image after {idle:.1f} s of start-up"
    )

    Engine(home, create=True).close()  # the library exists: killing its creation is part 0
    cycles: list[Cycle] = []
    kills = 0
    while kills < args.kills:
        n = len(cycles)
        cycle = Cycle(n)
        touched: set[str] = set()
        cycle.todo = due = args.images
        if n:
            with Engine(home) as engine:
                touched, cycle.todo, due = perturb(engine, data, n, rng, bad)
        # A quarter of the kills anywhere in start-up and scan, the rest while files are indexed. The
        # calibration is scaled by how long runs that outlived their kill time really took (load varies).
        horizon = (idle + cycle.todo * per_image) * scale
        cycle.kill_at = (
            rng.uniform(0.05, idle * scale) if rng.random() < 0.25 else rng.uniform(0.8 * idle * scale, horizon)
        )
        before = entry_sequence(home)
        killed, cycle.orphans, err, took = run_and_kill(index_cmd(home, data), cycle.kill_at)
        cycle.committed = entries_after(home, before)
        note_traceback(err, cycle)
        if not killed:
            cycle.outcome = f"finished before the kill (in {took:.2f} s)"
            scale = 0.5 * scale + 0.5 * took / (idle + cycle.todo * per_image)
        elif cycle.committed == 0:
            cycle.outcome = "killed before its first commit"
        elif cycle.committed < due:
            cycle.outcome = "killed between commits"
        else:
            cycle.outcome = "killed after its last commit"
        kills += killed
        if n % 5 == 4:  # kill the re-run as well
            again_at = rng.uniform(0.05, horizon)
            killed, orphans, err, _ = run_and_kill(index_cmd(home, data), again_at)
            note_traceback(err, cycle)
            cycle.orphans += orphans
            cycle.rerun_killed = killed  # an extra kill: not counted towards --kills
            cycle.outcome += (
                f", re-run killed too at {again_at:.2f} s" if killed else ", re-run finished before its kill"
            )
        t0 = time.perf_counter()
        rerun = subprocess.run(index_cmd(home, data, "--json"), check=False, capture_output=True, text=True)
        cycle.rerun_s = time.perf_counter() - t0
        if rerun.returncode != 0:
            cycle.problems.append(f"re-run exit {rerun.returncode}: {rerun.stderr[-500:]}")
        else:
            verify(home, data, bad, touched, json.loads(rerun.stdout), rng, cycle)
        if cycle.orphans:
            cycle.problems.append(f"{cycle.orphans} worker processes outlived the killed run")
        noise = " [its workers printed BrokenPipeError]" if cycle.pipe_noise else ""
        print(
            f"run {n + 1:2d}: {cycle.todo:5d} to do, SIGKILL at {cycle.kill_at:5.2f} s: {cycle.outcome} "
            f"({cycle.committed} entries committed){noise}; "
            f"re-run {cycle.rerun_s:.1f} s, check {cycle.check_s:.1f} s: "
            + ("OK" if not cycle.problems else "FAILED " + "; ".join(cycle.problems)),
            flush=True,
        )
        cycles.append(cycle)
    return cycles


def only_pipe_noise(err: str) -> bool:
    """Pool workers of a killed run die on the broken pipe with a traceback: noise, not a failure.

    Two workers may write at once (their lines interleave), so this looks at the exception lines:
    all must be BrokenPipeError, and no frame may be embedsearch's own code.
    """
    raised = [line for line in err.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    return bool(raised) and all(line.startswith("BrokenPipeError") for line in raised) and "embedsearch" not in err


def note_traceback(err: str, cycle: Cycle) -> None:
    if "Traceback" not in err:
        return
    if only_pipe_noise(err):
        cycle.pipe_noise += 1
    else:
        cycle.problems.append(f"a killed run printed a traceback: {err[-400:]}")


# -- part 2: train ------------------------------------------------------------------------------------


def train_cmd(home: Path, data: Path, name: str, resume: bool) -> list[str]:
    return [
        *CLI,
        "--home",
        str(home),
        "train",
        str(data),
        "--model",
        "ae",
        "--name",
        name,
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--latent-dim",
        "8",
        "--image-size",
        "16",
        "--channels",
        "1",
        "--seed",
        "0",
        *(["--resume"] if resume else []),
    ]


def saved_epoch(home: Path, name: str) -> int:
    path = home / "models" / name / "resume.json"
    return int(json.loads(path.read_text())["epoch"]) if path.exists() else 0


def weights_of(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def weights_report(path: Path) -> dict:
    """The training report stored in a weights file's metadata (history, resumed_from ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return json.loads(fh.metadata()["embedsearch"])["report"]


def train_campaign(work: Path, args: argparse.Namespace, rng: random.Random) -> tuple[list[str], list[str]]:
    data, home = work / "train-data", work / "train-home"
    images, labels = make_image_array(args.train_images, 16, 1, seed=args.seed + 1)
    for i, (arr, label) in enumerate(zip(images, labels, strict=False)):
        write_png(data / SHAPES[label] / f"{i:05d}.png", arr[..., 0])
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # skipped with a warning
    # The uninterrupted reference run, timed line by line: start-up, then one log line per epoch.
    t0 = time.monotonic()
    ref = subprocess.Popen(
        train_cmd(home, data, "reference", False), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    epoch_at = [time.monotonic() - t0 for line in ref.stderr or [] if re.match(r"epoch \d+/3", line)]
    assert ref.wait() == 0 and len(epoch_at) == 3, "the reference training run failed"
    full = time.monotonic() - t0
    epoch_s = (epoch_at[2] - epoch_at[0]) / 2
    startup_s = max(epoch_at[0] - epoch_s, 0.5)
    reference = weights_of(next((home / "models" / "reference").glob("v-*/weights.safetensors")))
    print(
        f"reference training run (uninterrupted): {full:.1f} s ({startup_s:.1f} s start-up and data, "
        f"then {epoch_s:.1f} s per epoch)"
    )

    lines, problems = [], []
    kills, run = 0, 0
    while kills < args.train_kills:
        run += 1
        name, resume, attempt, last_resume = f"ae{run}", False, 0, 0
        while True:
            attempt += 1
            expected = saved_epoch(home, name)
            # A random moment of a random phase of what this attempt has left to do: its start-up (reading
            # the data), or the epoch after the k-th epoch's log line -- which comes just before that
            # epoch's checkpoints are written, so short delays kill the run while it writes them.
            phase = rng.choice(["start-up"] + [f"epoch {k}" for k in range(expected + 1, 3 + 1)])
            if kills >= args.train_kills:
                kill_at, after, when = float("inf"), None, "no kill"
            elif phase == "start-up":
                kill_at, after = rng.uniform(0.3, startup_s), None
                when = f"{kill_at:.1f} s into start-up"
            else:
                kill_at, after = rng.uniform(0.0, epoch_s), rf"{phase}/3 "
                when = f"{kill_at:.2f} s after the '{phase}/3' log line"
            t0 = time.perf_counter()
            killed, orphans, err, _ = run_and_kill(train_cmd(home, data, name, resume), kill_at, after)
            took = time.perf_counter() - t0
            said = re.search(r"resuming after epoch (\d+) of 3", err)
            if resume:  # what a resumed run says (a run killed during start-up says nothing yet)
                if said is not None and int(said.group(1)) != expected:
                    problems.append(
                        f"{name} attempt {attempt}: resume.json had epoch {expected}, the run said {said.group(0)}"
                    )
                if not killed and expected and said is None:
                    problems.append(
                        f"{name} attempt {attempt}: resume.json had epoch {expected}, the run did not say it resumed"
                    )
                if not killed and not expected and "no resume state" not in err:
                    problems.append(f"{name} attempt {attempt}: no resume state, and the run did not say so")
            if "Traceback" in err and not (killed and only_pipe_noise(err)):
                problems.append(f"{name} attempt {attempt}: traceback: {err[-300:]}")
            if orphans:
                problems.append(f"{name} attempt {attempt}: {orphans} processes outlived the kill")
            start = f"resumed after epoch {expected}" if resume and expected else "from the start"
            if resume and not killed:
                last_resume = expected
            if killed:
                kills += 1
                now = saved_epoch(home, name)
                if now < expected:
                    problems.append(f"{name}: the resume state went back from epoch {expected} to {now}")
                lines.append(
                    f"train kill {kills}: {name} attempt {attempt} ({start}) SIGKILL {when}; "
                    f"resume state now after epoch {now}"
                )
                print(lines[-1], flush=True)
                resume = True
                continue
            lines.append(f"train {name} attempt {attempt} ({start}) completed in {took:.1f} s")
            print(lines[-1], flush=True)
            break
        listed = subprocess.run(
            [*CLI, "--home", str(home), "models", "--json"], check=False, capture_output=True, text=True
        )
        if name not in [m["name"] for m in json.loads(listed.stdout or "[]")]:
            problems.append(f"{name} is not registered")
        folder = home / "models" / name
        leftovers = [p.name for p in folder.glob(".*.tmp")]
        if leftovers:
            problems.append(f"{name}: temporary files left: {leftovers}")
        weights = next(folder.glob("v-*/weights.safetensors"))
        report = weights_report(weights)
        epochs = [h["epoch"] for h in report["history"]]
        if epochs != [1, 2, 3]:
            problems.append(f"{name}: the final report has epochs {epochs}, expected [1, 2, 3]")
        if report.get("resumed_from") != (last_resume or None):
            problems.append(f"{name}: report says resumed_from {report.get('resumed_from')}, expected {last_resume}")
        final = weights_of(weights)
        diff = max(float(np.abs(final[k] - reference[k]).max()) for k in reference)
        if set(final) != set(reference) or diff > 1e-6:
            problems.append(f"{name}: final weights differ from the uninterrupted run's (max |diff| {diff:.3g})")
        lines.append(
            f"  {name}: epochs in its report {epochs}, resumed_from {report.get('resumed_from')}, "
            f"weights max |diff| from the uninterrupted run {diff:.3g}"
        )
        print(lines[-1], flush=True)
    check = subprocess.run([*CLI, "--home", str(home), "check", "--json"], check=False, capture_output=True, text=True)
    if check.returncode != 0 or not json.loads(check.stdout)["ok"]:
        problems.append(f"check after training: {check.stdout[-500:]}")
    return lines, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--new-library-kills", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--train-kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (printed) for inspection.")
    args = parser.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="embedsearch-crash-"))
    rng = random.Random(args.seed)
    started = time.perf_counter()
    try:
        _, bricked = new_library_campaign(work, args, rng)
        t0 = time.perf_counter()
        cycles = index_campaign(work, args, rng)
        t_index = time.perf_counter() - t0
        _, train_problems = train_campaign(work, args, rng)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    outcomes = Counter(c.outcome.split(" (")[0].split(",")[0] for c in cycles)
    failed = [c for c in cycles if c.problems]
    first_kills = sum(not c.outcome.startswith("finished") for c in cycles)
    second = sum(c.rerun_killed for c in cycles)
    print()
    print(
        f"index: {len(cycles)} runs, {first_kills + second} SIGKILLs ({first_kills} runs killed at a random moment, "
        f"{second} of their re-runs killed too); {len(cycles) - len(failed)}/{len(cycles)} completing re-runs "
        "verified clean"
    )
    for outcome, count in outcomes.most_common():
        print(f"  {count:3d} x {outcome}")
    rerun = [c.rerun_s for c in cycles]
    checks = [c.check_s for c in cycles]
    print(
        f"  entries committed by killed runs: median {int(np.median([c.committed for c in cycles]))}, "
        f"max {max(c.committed for c in cycles)}; orphaned workers: {sum(c.orphans for c in cycles)}; "
        f"killed runs whose workers printed a BrokenPipeError traceback: {sum(c.pipe_noise for c in cycles)}"
    )
    print(
        f"  re-run to completion: mean {np.mean(rerun):.1f} s, max {max(rerun):.1f} s; "
        f"check --json: mean {np.mean(checks):.1f} s, max {max(checks):.1f} s; part 1 took {t_index:.0f} s"
    )
    print(
        f"new library: {args.new_library_kills} index runs SIGKILLed while creating the library: "
        + (f"{bricked} left a library that no later command can open" if bricked else "every re-run succeeded")
    )
    print(
        f"train: {args.train_kills} runs SIGKILLed and resumed; "
        + (
            "all resumes continued from the last checkpoint and matched the uninterrupted run"
            if not train_problems
            else f"{len(train_problems)} problems"
        )
    )
    for problem in train_problems:
        print(f"  PROBLEM: {problem}")
    for c in failed:
        print(f"  PROBLEM in kill {c.n + 1}: {'; '.join(c.problems)}")
    print(f"total {total / 60:.1f} min")
    sys.exit(1 if failed or train_problems or bricked else 0)


if __name__ == "__main__":
    main()
