"""glibc's malloc policies: raised once for bulk work, left alone where the user or the service set them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from embedsearch.engine import Engine

SCRIPT = """
import embedsearch.malloc as m
print(m.keep_freed_memory(), m.keep_freed_memory())
"""


def _run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_thresholds_are_raised_once_per_process() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _run(env) == "True True"


def test_thresholds_the_user_set_are_left_alone() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "1000000"}
    assert _run(env) == "False False"


LOAD_THEN_BULK = """
import sys
import embedsearch.malloc as m
from embedsearch.engine import Engine
with Engine(sys.argv[1]) as engine:
    encoder = engine.encoder("ae")  # what the service does: load and encode, never bulk-index
    loaded = m.policy()
    with encoder.sharing_cores():  # a bulk run's encoding
        pass
print(loaded, m.policy())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_loading_a_model_keeps_the_services_setting_and_a_bulk_run_raises_the_thresholds(trained: Engine) -> None:
    home = str(trained.home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", LOAD_THEN_BULK, home], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "None keep"


SERVICE_FIRST = """
import embedsearch.malloc as m
print(m.return_large_buffers(), m.keep_freed_memory(), m.policy())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_services_policy_is_never_undone_by_bulk_work() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", SERVICE_FIRST], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "True False return"
