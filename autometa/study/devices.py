"""The devices trials run on: ``--devices`` parsed into worker slots, threads per worker."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from autometa.errors import SearchError


@dataclass
class Slot:
    """One worker place: a device and its index among the workers sharing it."""

    device: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.device}#{self.index}"


def worker_label(attrs: Mapping[str, Any]) -> str:
    """Where a trial ran, for trial lines: its worker slot (``cpu#0``), with ``@host`` when that
    is another machine sharing the study (every machine has its own ``cpu#0``)."""
    label, host = attrs.get("worker", "?"), attrs.get("host")
    return f"{label}@{host}" if host and host != platform.node() else label


def resolve_devices(spec: str, per_device: int) -> list[Slot]:
    """``auto`` (every GPU, else the CPU), ``cpu`` or ``cuda:0,cuda:1`` → worker slots."""
    if per_device < 1:
        raise SearchError("--trials-per-device must be at least 1")
    if spec == "auto":
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SearchError(f"--devices {spec!r}: give auto, cpu or cuda:N[,cuda:M...]")
    count = torch.cuda.device_count()
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise SearchError(f"--devices: {name!r} is not a device name; use auto, cpu or cuda:N") from exc
        if device.type == "cuda" and (device.index or 0) >= count:
            raise SearchError(f"--devices {spec}: torch sees {count} CUDA device(s) on this machine; use cpu or auto")
        if device.type not in ("cpu", "cuda"):
            raise SearchError(f"--devices {spec}: only cpu and cuda devices are supported")
    if len(set(names)) != len(names):
        raise SearchError(f"--devices {spec}: a device is listed twice; use --trials-per-device for several trials per device")
    return [Slot(name, i) for name in names for i in range(per_device)]


def threads_per_worker(slots: list[Slot]) -> int:
    """CPU threads each worker may use: the cores shared out among the CPU workers.

    Oversubscribing cores stalls (second-order) autograd badly, so never more than a fair share.
    """
    cpu_workers = sum(1 for s in slots if s.device == "cpu")
    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use (taskset, container limits)
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, cpu_workers)) if cpu_workers else max(1, min(4, cores // len(slots)))
    # OMP_NUM_THREADS is how users (and other searches on the same machine) ask for fewer.
    try:
        return max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    except (KeyError, ValueError):
        return threads
