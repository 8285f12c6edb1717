"""Checkpoint files: safetensors for tensors, JSON for the rest; never pickle.

Every file is written atomically with :mod:`embedsearch.files` (temporary file in the same folder,
fsync, ``os.replace``, fsync of the folder), so a crash or SIGKILL at any moment leaves either the
previous file or the new one.
The resume state is a pair: ``resume-EEEEE.safetensors`` (model, optimizer and RNG tensors after
epoch E) and ``resume.json`` naming it. The tensors are written first and the JSON last, so the
JSON only ever points at a complete tensor file.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from embedsearch.encoders.base import write_weights
from embedsearch.errors import ModelError
from embedsearch.files import atomic_write

log = logging.getLogger(__name__)

#: The single metadata key of our safetensors files; its value is a JSON document.
META_KEY = "embedsearch"
RESUME_JSON = "resume.json"
RESUME_FORMAT = 1


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    # safetensors wants dense, contiguous CPU tensors; conv weights are channels_last in memory.
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    text = json.dumps(meta, sort_keys=True)
    write_weights(path, lambda name: save_file(plain, name, metadata={META_KEY: text}))


def read_tensors(path: Path, what: str = "weights file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors of a safetensors file and its metadata; ModelError if missing or unreadable."""
    if not path.is_file():
        raise ModelError(f"{what} {path} is missing; train the model again")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta_text = (fh.metadata() or {}).get(META_KEY, "{}")
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a dict)
        meta = json.loads(meta_text)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{what} {path} is corrupt or truncated ({exc}); train the model again") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{what} {path} has malformed metadata; train the model again")
    return tensors, meta


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy weights into ``model``; a file for another network is refused with ModelError."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path} does not fit this model's architecture ({first})") from None


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state into named tensors and a JSON-able rest (hyper-parameters)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]
) -> None:
    per_param: dict[int, dict[str, Any]] = defaultdict(dict)
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            per_param[int(pid)][key] = value
    for name, value in rest.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        per_param[int(pid)][key] = value
    try:
        optimizer.load_state_dict({"state": dict(per_param), "param_groups": rest["param_groups"]})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"the saved optimizer state does not fit this model ({exc}); train without resume") from None


def write_resume(workdir: Path, epoch: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the resume pair for ``epoch`` and drop tensor files of earlier epochs."""
    name = f"resume-{epoch:05d}.safetensors"
    write_tensors(workdir / name, tensors, {"epoch": epoch})
    doc = {"format": RESUME_FORMAT, "epoch": epoch, "tensors": name, **state}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    atomic_write(workdir / RESUME_JSON, text.encode())
    for old in workdir.glob("resume-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_resume(workdir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The resume JSON and its tensors, or None when there is no resume state."""
    path = workdir / RESUME_JSON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        tensors_name = str(doc["tensors"])
        if doc.get("format") != RESUME_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {RESUME_FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"resume state {path} is unreadable ({exc}); train without resume") from None
    tensors, _ = read_tensors(workdir / tensors_name, "resume state")
    return doc, tensors


def remove_stale_temps(workdir: Path) -> None:
    """Delete temporary files a killed run of ours left behind (never anybody else's)."""
    for name in ("weights.safetensors", RESUME_JSON, "resume-*.safetensors"):
        for stale in workdir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def clear_resume(workdir: Path) -> None:
    """Forget an earlier run's resume state (a fresh run must never be resumed from it)."""
    (workdir / RESUME_JSON).unlink(missing_ok=True)
    for old in workdir.glob("resume-*.safetensors"):
        old.unlink(missing_ok=True)
