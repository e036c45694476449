"""The OpenMP runtime that torch's CPU operations run on, where a process's threads share a few cores.

A thread that runs a parallel torch operation gets an OpenMP team, whose threads outlive the operation, waiting
for the next one. With more of them in the process than cores, the runtime stops waiting actively between
parallel regions, and every team sleeps between a prefill's many small operations: a request on one thread after
a model loaded on another, after a request on another, or after a store's threads decoded entries, started
markedly later. Two helpers keep one team at a time: threads that run torch beside the engine's work run it on
themselves alone, and a thread done with its torch work (a model loaded, a request answered) lets its team go.
Where the process holds no OpenMP runtime, torch's operations start no teams and both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch


@functools.cache
def _openmp(name: str) -> Callable[[int], int] | None:
    """The OpenMP runtime's function ``name`` among the process's symbols (torch's runtime), or ``None``; looked up
    once (every request on CPU calls :func:`release_openmp_team`)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):
        return None


def run_torch_on_this_thread_alone() -> None:
    """Run the calling thread's torch operations on that thread alone, leaving torch's thread count elsewhere as it
    is: for threads that each do a small part of some work beside the engine's (a store's reading threads)."""
    torch.get_num_threads()  # torch's own set-up of a new thread's OpenMP thread count first, which this overrides
    if (set_threads := _openmp("omp_set_num_threads")) is not None:
        set_threads(1)


def release_openmp_team() -> None:
    """Let the calling thread's OpenMP team go (its next parallel torch operation starts another): for a thread done
    with its torch work while the next may run on another (a model loaded, a request answered)."""
    if (pause := _openmp("omp_pause_resource_all")) is not None:
        pause(1)  # omp_pause_soft
