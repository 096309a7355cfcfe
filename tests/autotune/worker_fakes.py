"""Fake attention implementations for the worker-backend tests (module-level, not registered).

Worker processes (process pool, Ray actors) import this module by name (the module of the
implementation's function) and find the ``Impl`` objects in it; they are not registered, so the
rest of the suite never sees them in a search space. Each fake writes
its process id to ``pidfile(TAG)`` so a test can kill the worker running it.
"""
import os
import signal
import tempfile
import time

from graphtune.codegen.attention.cpu import flash_attention
from graphtune.codegen.registry import Impl, KernelConfig

OP = "attention_with_lse"


def pidfile(tag: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"graphtune-worker-fake-{tag}.pid")


def _note_pid(config) -> None:
    path = pidfile(config["TAG"])
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def slow(*a, config):
    """Right, but sleeps SLEEP_MS per call: a window to kill its worker in."""
    _note_pid(config)
    time.sleep(config["SLEEP_MS"] / 1000)
    return flash_attention(*a)


def hang(*a, config):
    _note_pid(config)
    time.sleep(120)
    return flash_attention(*a)


def segfault(*a, config):
    _note_pid(config)
    os.kill(os.getpid(), signal.SIGSEGV)


def _impl(name, fn):
    return Impl(OP, name, "cpu", fn, KernelConfig.make(TAG=0, SLEEP_MS=0), lambda a: [], "fake-" + name)


SLOW, HANG, SEGFAULT = _impl("fake.slow", slow), _impl("fake.hang", hang), _impl("fake.segfault", segfault)


def cfg(tag: int, sleep_ms: int = 0) -> KernelConfig:
    return KernelConfig.make(TAG=tag, SLEEP_MS=sleep_ms)
