"""glibc's thresholds are raised once, and left alone where the user set them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import embedsearch.encoders.nn.memory as m
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
