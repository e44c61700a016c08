"""normattn: attention with hand-derived backward and forward-mode passes, softmax and beta."""

from .functional import MaxReduceResult, attention, max_reduce
from .normalizers import BETA, NORMALIZERS, SOFTMAX, Normalizer
from .ops.beta_linear.recurrent import BetaState, beta_decode, beta_prefill

__all__ = [
    "attention",
    "max_reduce",
    "MaxReduceResult",
    "Normalizer",
    "NORMALIZERS",
    "SOFTMAX",
    "BETA",
    "beta_prefill",
    "beta_decode",
    "BetaState",
]
__version__ = "0.1.0"
