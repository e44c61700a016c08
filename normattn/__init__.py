"""normattn: attention with hand-derived backward and forward-mode passes, softmax and beta."""

from .functional import MaxReduceResult, attention, max_reduce
from .normalizers import BETA, NORMALIZERS, SOFTMAX, Normalizer

__all__ = [
    "attention",
    "max_reduce",
    "MaxReduceResult",
    "Normalizer",
    "NORMALIZERS",
    "SOFTMAX",
    "BETA",
]
__version__ = "0.1.0"
