"""Progress bars on stderr for long work, shown only where a person is watching.

A bar appears when stderr is a terminal and the package's logger is enabled for INFO: the CLI sets
that level unless ``-q`` is given, and a program using the library sees none unless it turns
embedsearch's INFO logs on. Piped output never gets one. Imports nothing of the package.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_LOGGER = "embedsearch"


def wanted() -> bool:
    """Whether bars are shown now: stderr is a terminal and embedsearch logs at INFO."""
    return sys.stderr.isatty() and logging.getLogger(_LOGGER).isEnabledFor(logging.INFO)


def bar(total: int, desc: str, unit: str = "img", enabled: bool | None = None) -> Any:
    """A tqdm bar (a no-op one when not wanted); ``enabled`` None decides by :func:`wanted`."""
    from tqdm import tqdm

    show = wanted() if enabled is None else enabled
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not show or total == 0,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )
