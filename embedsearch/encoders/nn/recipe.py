"""The training recipe's names and defaults, without torch (compare and the CLI check them early).

The defaults were chosen by ``benchmarks/ablation.py``; the README's "Training defaults" table has
the measurements behind each one.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedsearch.errors import InvalidArgumentError

#: Every operation, in the order they are applied (flip only ever when asked for).
OPERATIONS = ("jpeg", "crop", "shift", "rotate", "flip", "brightness", "blur", "noise")
#: What ``--augment`` without a list turns on (chosen by benchmarks/ablation.py; see the README).
DEFAULT_AUGMENT = ("jpeg", "crop", "brightness", "blur", "noise")


def parse_augment(value: str | Sequence[str] | None) -> list[str]:
    """``"crop,noise"``, a list, ``"default"`` or ``"none"``/``""`` -> a checked list of operations."""
    if value is None:
        return []
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s).strip() for s in value]
    names: list[str] = []
    for item in items:
        if item in ("", "none"):
            continue
        for name in DEFAULT_AUGMENT if item == "default" else (item,):
            if name not in OPERATIONS:
                raise InvalidArgumentError(
                    f"unknown augmentation {name!r}; choose from {', '.join(OPERATIONS)}, 'default' or 'none'"
                )
            if name not in names:
                names.append(name)
    return [n for n in OPERATIONS if n in names]  # canonical order, so equal sets compare equal


#: Weight of the InfoNCE term against the per-image reconstruction loss (summed over pixels).
DEFAULT_CONSISTENCY = 30.0
DEFAULT_TEMPERATURE = 0.1
#: Adam's learning rate, and the schedules, the default first (README "Training defaults", fifth
#: try): a cosine from 4e-3 lifted near-duplicate recall on Fashion-MNIST's 60k images (2,100
#: steps) but lowered every figure on 3k emoji (110 steps), so the constant rate stays the default.
DEFAULT_LR = 1e-3
LR_SCHEDULES = ("constant", "cosine")
#: The share of a cosine schedule's steps over which the rate rises linearly to its peak.
WARMUP = 0.05
