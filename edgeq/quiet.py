"""TensorFlow, imported lazily and quietly.

TensorFlow, the converter, litert-torch and the interpreter print to stdout and stderr from C++
(SavedModel export notices, MLIR logs, "Created TensorFlow Lite XNNPACK delegate"). `--json`
promises one document on stdout and errors promise one line, so that work runs under
`quiet_native()`, which sends both file descriptors to a temporary file. Set EDGEQ_DEBUG=1 to see
what was captured when something fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings


def import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_native():
        import tensorflow as tf
    return tf


@contextlib.contextmanager
def quiet_native():
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # Python-level writes too, for when sys.stdout/sys.stderr are not fds 1/2 (embedding, tests).
            text = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                warnings.simplefilter("ignore")
                yield
        except BaseException:
            if os.environ.get("EDGEQ_DEBUG"):
                log.seek(0)
                os.write(saved[1], log.read()[-20000:])
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
