"""The ops that have a CPU kernel but no CUDA kernel yet, registered for CUDA in torch's own ops
(``bn_math``'s composites): the batch norm's coefficients and its running-statistics update, a
few per-channel ops each."""
from __future__ import annotations

import torch

from ..bn_math import coefficients_composite, update_running_stats_composite

_LIB = torch.library.Library("fgkernels", "IMPL")
_LIB.impl("dual_bn_coefficients", coefficients_composite, "CUDA")
_LIB.impl("bn_update_running_stats_", update_running_stats_composite, "CUDA")
