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

SIGTERM (`timeout`, a CI job cancelled, `kill`) and SIGHUP (the terminal closed) end a command the
same way while it runs: Python's default for them is to die on the spot, which left a conversion's
temporary files and a flash's bundle behind and skipped the device-side cleanup a Ctrl-C gets.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
from contextlib import contextmanager

_installed = False
_pending = 0  # the signal that arrived during recording() (it may have been swallowed on its way up)
_last = 0  # the signal that stopped the last recording(), kept after it for reason()
_STOPPING = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


_held = False  # inside held(): a signal is recorded, and raised by check() after the block


def _on_signal(signum, frame):
    global _pending, _last
    _pending = _last = signum
    if not _held:
        raise KeyboardInterrupt


@contextmanager
def held():
    """Ctrl-C / SIGTERM / SIGHUP that arrive inside the block wait for its end (files.write_all's
    renames, which publish a model with its manifest), then end the command as interrupted (the CLI's
    check() after it returns). Python runs signal handlers in the main thread, whichever thread the
    kernel delivered the signal to, so a flag holds them where blocking the signal in one thread
    does not (numpy's threads took it). Without recording() (library use) the default handler still
    raises at once: write_all rolls its renames back then."""
    global _held
    before = _held
    _held = True
    try:
        yield
    finally:
        _held = before


def pending() -> bool:
    return bool(_pending)


def reason() -> str:
    """What to tell the user a stopped command ended by: "interrupted" (Ctrl-C) or the signal's name."""
    if _last and _last != signal.SIGINT:
        return f"terminated by {signal.Signals(_last).name}"
    return "interrupted"


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
    KeyboardInterrupt, and stop on SIGTERM / SIGHUP the same way; the previous handlers come back
    after. Nothing changes off the main thread, nor for a signal someone else handles (or ignores:
    SIGHUP under nohup)."""
    global _pending, _last
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler}
    ours = {s: signal.getsignal(s) for s in _STOPPING if signal.getsignal(s) is defaults.get(s, signal.SIG_DFL)}
    _pending = _last = 0
    for s in ours:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in ours.items():
            signal.signal(s, handler)
        _pending = 0
