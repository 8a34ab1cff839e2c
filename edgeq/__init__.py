"""edgeq: take a trained model to phones and small boards, and prove how it runs there."""

__version__ = "0.1.0"
