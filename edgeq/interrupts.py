"""Ctrl-C that stops every stage.

A KeyboardInterrupt raised while the interpreter runs a garbage-collector callback is reported as
"unraisable" and dropped: Python cannot propagate exceptions out of gc callbacks. JAX (pulled in
by litert-torch) registers such a callback, and during model loading and the PyTorch -> LiteRT
conversion the collector runs often, so a Ctrl-C in those seconds was lost and the conversion went
on to write its output. `install()` catches that case and delivers the interrupt to the main thread
again as soon as it is outside every gc callback, where it ends the command like any other Ctrl-C.

Code that catches every exception (a bare `except:` in some library's import fallback) can still
swallow the KeyboardInterrupt itself: seen once in 9 tries with MiniLM interrupted at 3.6 s on a
loaded host, which then wrote its output and exited 0. So install() also records that a Ctrl-C
arrived while a command runs (`recording()`), and `check()` raises it again: files.atomic_write
calls it before writing anything, and the CLI after the command returns.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
from contextlib import contextmanager

_installed = False
_pending = False  # a Ctrl-C arrived during recording() (it may have been swallowed on its way up)


def _on_sigint(signum, frame):
    global _pending
    _pending = True
    raise KeyboardInterrupt


def pending() -> bool:
    return _pending


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived during recording(), even one something swallowed."""
    if _pending:
        raise KeyboardInterrupt


def _callback_codes() -> set:
    return {getattr(cb, "__code__", None) for cb in gc.callbacks}


def _in_gc_callback(frame) -> bool:
    codes = _callback_codes()
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _raise_outside_callbacks(frame) -> None:
    """Trace the main thread (the thread whose gc callback dropped the interrupt) and raise
    KeyboardInterrupt at the first line it runs outside every gc callback: an exception a trace
    function raises propagates into the traced code, so it ends the command like any Ctrl-C.
    (A thread that waits and then interrupts again lands inside a callback again when the program
    spends most of its time in them: its GIL turns come mostly there.)"""
    traced = []

    def stop() -> None:
        sys.settrace(None)
        for f in traced:
            f.f_trace = None

    def tracer(f, event, arg):
        if event in ("call", "line") and not _in_gc_callback(f):
            stop()
            raise KeyboardInterrupt
        return tracer

    f = frame
    while f is not None:  # frames already running get line events only through f_trace
        f.f_trace = tracer
        traced.append(f)
        f = f.f_back
    sys.settrace(tracer)


def install() -> None:
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # Not raised from here: an exception raised in this hook would be dropped as well.
            _raise_outside_callbacks(sys._getframe(1))
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True


@contextmanager
def recording():
    """While a command runs: record every Ctrl-C (check()), keeping Python's behaviour of raising
    KeyboardInterrupt; the previous handler comes back after. Nothing changes off the main thread
    or when someone else installed a SIGINT handler."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pending = False
