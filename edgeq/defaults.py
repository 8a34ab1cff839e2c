"""Defaults shared by the library and the CLI (kept import-free so `edgeq --help` stays instant)."""

DEFAULT_CALIB_SAMPLES = 200  # the TFLite docs recommend ~100-500 representative samples
DEFAULT_EVAL_SAMPLES = 50  # held out from calibration, for fidelity
MIN_RECOMMENDED_CALIB = 100
