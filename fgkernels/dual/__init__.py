"""The value a dual pass carries and the policy every layer above shares: ``Dual`` (a primal with
its stacked tangent slots and their directions, ``value``), how operands' slots line up
(``slots``), the tangents of parameter tensors (``tangents``: set into ``tangent_store``, handed
out by the dual pass, ``passes``), which tangent dtypes fit a primal and what sums accumulate in
(``dtypes``, ``precision``), how slots are laid out in memory (``layout``), which rule a
torch function runs on Duals (``rule_table``) and whether code runs inside one
(``rule_state``). It runs no kernel and imports no backend."""
from .value import Dual, is_dual

__all__ = ["Dual", "is_dual"]
