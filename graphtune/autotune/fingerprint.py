"""Device fingerprints: the hardware/toolchain part of a tuning record's key.

A fingerprint has three parts, all stored as columns:

* ``device`` (in the key): ``cpu:<ISA>:<cores>c:<model name>`` on a CPU, ``cuda:sm_<cc>`` on a
  GPU. For GPUs the key is the architecture so that records made by static mode for a GPU you
  do not have (``--target sm_90``) are found on any sm_90 part;
* ``device_name`` (not in the key; lookups prefer records from the same product name);
* ``versions`` (in the key): torch (without its ``+cpu``/``+cu128`` build tag, so static records
  made on a CPU box apply to a GPU box), triton and graphtune versions.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from importlib import metadata

import torch

from graphtune.errors import OptionError

__all__ = ["Fingerprint", "current", "for_target", "versions"]


@dataclass(frozen=True)
class Fingerprint:
    device: str
    device_name: str
    versions: str


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "none"


@functools.cache
def versions() -> str:
    torch_v = torch.__version__.split("+")[0]
    return f"torch={torch_v};triton={_version('triton')};graphtune={_version('graphtune')}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _cpu() -> Fingerprint:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    isa = torch.backends.cpu.get_cpu_capability()  # e.g. AVX512, AVX2: what ATen's kernels dispatch on
    name = _cpu_model()
    return Fingerprint(f"cpu:{isa}:{cores}c:{name}", name, versions())


def current(device: str | torch.device = "cpu") -> Fingerprint:
    """Fingerprint of the device that runs tensors of ``device`` (``"cpu"`` or ``"cuda[:i]"``)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return _cpu()
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return Fingerprint(f"cuda:sm_{major}{minor}", torch.cuda.get_device_name(idx), versions())
    raise OptionError(f"no tuning fingerprint for device type {dev.type!r}")


def for_target(target: str) -> Fingerprint:
    """Fingerprint of a GPU architecture you may not have, e.g. ``"sm_90"`` (static mode)."""
    t = target.strip().lower()
    if not (t.startswith("sm_") and t[3:].isdigit() and len(t) >= 5):
        raise OptionError(f"target {target!r} is not a CUDA architecture like 'sm_80' or 'sm_90'")
    return Fingerprint(f"cuda:{t}", f"static:{t}", versions())
