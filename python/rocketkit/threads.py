"""Thread counts that make results reproducible.

MKL's Cholesky (torch, whitening) and the native core's LAPACK/BLAS calls (OpenBLAS from the
``scipy-openblas32`` wheel) give results that differ in the last bits with the number of threads
(measured: ``torch.linalg.cholesky`` of a 1024² Gram, and ``rocketkit.factorize``, each differ
between 1 and 2 threads). A run that must be bit-identical to another one (a resumed compress, or
one rank of a distributed one) therefore pins both libraries to one recorded thread count.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


def _openblas():
    import scipy_openblas32

    return scipy_openblas32.dll


def resolve_threads(num_threads: int) -> int:
    """``num_threads``, or torch's current intra-op thread count when it is 0 (under torchrun that is
    OMP_NUM_THREADS, which torchrun sets to 1 unless the caller set it)."""
    import torch

    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be an integer >= 0 (0: torch's current count), got {num_threads!r}")
    return num_threads if num_threads > 0 else int(torch.get_num_threads())


@contextlib.contextmanager
def pinned_threads(num_threads: int) -> Iterator[int]:
    """Run the body with torch and OpenBLAS both at ``resolve_threads(num_threads)`` threads; the
    previous counts are restored afterwards. Yields the count used."""
    import torch

    n = resolve_threads(num_threads)
    blas = _openblas()
    saved_torch, saved_blas = torch.get_num_threads(), int(blas.scipy_openblas_get_num_threads())
    torch.set_num_threads(n)
    blas.scipy_openblas_set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved_torch)
        blas.scipy_openblas_set_num_threads(saved_blas)


def pins_threads(fn):
    """Decorate a function taking ``num_threads``: its body runs under :func:`pinned_threads`. Unpinned,
    OpenBLAS threads spin at their barriers; on a busy machine one 576×1536 factorization then took
    27.7 s at 2 threads against 0.68 s at 1 (AMD EPYC, 2 cores, load 5)."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        with pinned_threads(bound.arguments["num_threads"]):
            return fn(*args, **kwargs)

    return run
