"""TensorFlow, imported lazily and quietly.

TensorFlow and the converter print to stdout (SavedModel export notices, C++ logs); `--json` promises
one JSON document on stdout, so converter work runs under `quiet_native()`, which sends fd 1 to
stderr for its duration.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings


def import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_native():
        import tensorflow as tf
    return tf


@contextlib.contextmanager
def quiet_native():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
