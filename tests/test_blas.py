"""numpy's OpenBLAS on one thread while a level runs (edgeq/blas.py): its spinning threads made
small products 20x slower on a busy host. Checked on the real OpenBLAS numpy ships."""

from __future__ import annotations

import numpy as np  # noqa: F401 - loads the OpenBLAS threadpoolctl finds
import pytest

from tests.conftest import int8_session

threadpoolctl = pytest.importorskip("threadpoolctl")


def _openblas_threads() -> list[int]:
    """Threads of every OpenBLAS loaded (numpy's, and scipy's once something imported it)."""
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["internal_api"] == "openblas"]


def test_the_level_runs_numpy_blas_on_one_thread_and_gives_it_back(tiny_cnn, calib, monkeypatch):
    from edgeq.optimize import optimize

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert _openblas_threads(), "numpy's OpenBLAS not found"
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core host (CI's)
        outer = _openblas_threads()
        seen = []
        optimize(tiny_cnn, calib[:8], int8_session(), "fast", on_step=lambda _: seen.append(_openblas_threads()))
        assert seen and all(set(t) == {1} for t in seen)
        assert _openblas_threads() == outer  # given back when the level returns


def test_a_users_openblas_setting_is_left_alone(monkeypatch):
    from edgeq.blas import numpy_blas_threads

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        outer = _openblas_threads()
        with numpy_blas_threads():
            assert _openblas_threads() == outer
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        with numpy_blas_threads():
            assert set(_openblas_threads()) == {1}


def test_without_threadpoolctl_a_conversions_error_is_its_own(monkeypatch):
    """With no threadpoolctl the body runs unlimited, and an error raised in it is not chained to the
    failed import (a traceback that opened with 'No module named threadpoolctl' misled)."""
    import sys

    from edgeq.blas import numpy_blas_threads

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    with pytest.raises(ValueError) as err:
        with numpy_blas_threads():
            raise ValueError("the conversion's own error")
    assert err.value.__context__ is None
