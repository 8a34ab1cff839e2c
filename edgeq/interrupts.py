"""Ctrl-C that stops every stage.

A KeyboardInterrupt raised while the interpreter runs a garbage-collector callback is reported as
"unraisable" and dropped: Python cannot propagate exceptions out of gc callbacks. JAX (pulled in
by litert-torch) registers such a callback, and during model loading and the PyTorch -> LiteRT
conversion the collector runs often, so a Ctrl-C in those seconds was lost and the conversion went
on to write its output. `install()` catches that case and delivers the interrupt to the main thread
again as soon as it is outside every gc callback, where it ends the command like any other Ctrl-C.
"""

from __future__ import annotations

import _thread
import gc
import sys
import threading
import time

_installed = False


def _in_gc_callback(thread_id: int) -> bool:
    frame = sys._current_frames().get(thread_id)
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _redeliver(main_id: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _in_gc_callback(main_id) and time.monotonic() < deadline:
        time.sleep(0.001)
    _thread.interrupt_main()  # one interrupt for the one that was dropped


def install() -> None:
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook
    main_id = threading.main_thread().ident

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # Not from inside this hook: an exception raised here would be dropped as well.
            _thread.start_new_thread(_redeliver, (main_id,))  # no waiting: a wait here is interruptible
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True
