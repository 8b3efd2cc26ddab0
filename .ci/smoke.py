"""An installed fgkernels works: its compiled extension loads, and a converted Conv→BN→ReLU block
gives, in one dual pass on the native backend, the primal and the tangent that PyTorch's own
forward-mode AD gives. Run it with the source tree off the path (``python -P``, from another
folder), so that the installed package is the one imported."""
import sys
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import fgkernels
from fgkernels import Dual


def main() -> None:
    print(f"fgkernels from {Path(fgkernels.__file__).parent}, torch {torch.__version__}")
    if "site-packages" not in fgkernels.__file__:
        sys.exit("error: fgkernels was imported from the source tree, not the installed package")
    backends = fgkernels.available_backends()
    if "native" not in backends:
        sys.exit(f"error: the native backend is missing (backends: {backends}): "
                 f"{fgkernels.backends.native.native_load_error()}")

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU()).double()
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    x_tangent = torch.randn_like(x)
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    with fwAD.dual_level():  # the oracle: the same block, train mode (batch statistics)
        dual_params = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
        out = functional_call(block, dual_params, (fwAD.make_dual(x, x_tangent),))
        want = fwAD.unpack_dual(out)

    fgkernels.convert(block)
    fgkernels.set_tangents(block, tangents)
    with fgkernels.use_backend("native"):
        got = block(Dual(x, x_tangent))
    for name, a, b in (("primal", got.primal, want.primal),
                       ("tangent", got.tangent, want.tangent)):
        err = (a - b).abs().max().item()
        print(f"{name}: max |fgkernels - forward_ad| = {err:.2e}")
        if not err <= 1e-10 * max(1.0, b.abs().max().item()):
            sys.exit(f"error: the {name} differs from forward_ad's by {err}")
    print(f"smoke test passed; backends: {', '.join(backends)}")


if __name__ == "__main__":
    main()
