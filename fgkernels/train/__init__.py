"""fgkernels.train: a thin trainer for the forward-gradient algorithms of docs/method.md.

Run ``python -m fgkernels.train --help``; ``python -m fgkernels.train demo`` is the main job.
"""
from .estimators import GUESSES, SPACES, TARGETS, Estimates, estimate_gradients
from .models import ARCHS, AUX_NETS, BlockNet, build_model

__all__ = ["BlockNet", "build_model", "estimate_gradients", "Estimates", "ARCHS", "AUX_NETS",
           "TARGETS", "GUESSES", "SPACES"]
