"""numpy's BLAS on one thread while a conversion runs.

The levels multiply many small matrices (weight rounding's input moments: 64-512 wide, a few
hundred rows, thousands of times). OpenBLAS splits each product over every core, and its threads
wait for each other by spinning: on a host where another process keeps the cores busy, a 128-wide
product then took 7 ms on average against 0.3 ms on one thread. MobileNetV2's level went from 13 s
to 28 s at load 3 (weight rounding 5 s -> 18 s), on the same choices. On an idle host the one
thread costs little: the products are small (docs/accuracy.md, "Time under load").

Only numpy's own OpenBLAS is limited (torch's MKL and TensorFlow's and LiteRT's thread pools are
not), and not when the user set OPENBLAS_NUM_THREADS, which OpenBLAS reads itself.
"""

from __future__ import annotations

import contextlib
import functools
import os

BLAS_THREADS = 1


@contextlib.contextmanager
def numpy_blas_threads(n: int = BLAS_THREADS):
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        yield
        return
    limit = contextlib.nullcontext()
    try:
        from threadpoolctl import ThreadpoolController
        limit = ThreadpoolController().select(internal_api="openblas").limit(limits=n)
    except Exception:  # noqa: BLE001 - no threadpoolctl or no OpenBLAS found: nothing to limit
        pass
    # outside the except: the conversion's own errors must not be chained to a missing threadpoolctl
    with limit:
        yield


def one_blas_thread(fn):
    """Run `fn` with numpy's OpenBLAS on BLAS_THREADS threads (numpy_blas_threads)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with numpy_blas_threads():
            return fn(*args, **kwargs)
    return wrapper
