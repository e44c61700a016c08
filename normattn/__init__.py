"""normattn: attention with hand-derived backward and forward-mode passes for a family of normalizers."""

from . import normalizers
from .functional import MaxReduceResult, attention, max_reduce
from .normalizers import BETA, NORMALIZERS, SIGMOID, SOFTMAX, SOFTPICK, Normalizer
from .ops.beta_linear.recurrent import BetaState, beta_decode, beta_prefill

__all__ = [
    "attention",
    "max_reduce",
    "MaxReduceResult",
    "Normalizer",
    "NORMALIZERS",
    "normalizers",
    "SOFTMAX",
    "BETA",
    "SIGMOID",
    "SOFTPICK",
    "beta_prefill",
    "beta_decode",
    "BetaState",
]
__version__ = "0.2.0"
