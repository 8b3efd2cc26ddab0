"""The forward-mode rules of torch's ops on a ``Dual``, one module per op family, each registered
as the op's rule when its module is imported (``dual.rule_table.implements``): the layers
(``layers``: convolution, batch norm, linear, pooling, calling the backend the registry picks),
the ``convolutions`` without a kernel of their own (3-d, transposed), ``losses``, ``pointwise``
arithmetic and activations, ``products``, the rows' ``distances``, ``norms``, ``attention``,
``indexing``, nonlinear ``reductions``, the ``recurrent`` layers, ``sampling`` at a grid,
torchvision's pooling over boxes (``regions``) and deformable convolution (``deformable``), the
ops that only touch the primal (``primal_ops``), and torch's own forward mode for every op
without a rule (``fallback``), and ``torch.autograd.Function``s by their own jvp
(``functions``).
``operands`` splits a call's Duals into primals and slots (the layers' argument contracts are
``backends.contracts``, which their compiled ops' fakes run too)."""
from . import (  # noqa: F401
    attention,
    convolutions,
    deformable,
    distances,
    fallback,
    functions,
    indexing,
    layers,
    losses,
    norms,
    pointwise,
    primal_ops,
    products,
    recurrent,
    reductions,
    regions,
    sampling,
)
