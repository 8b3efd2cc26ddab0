"""What a dual pass changes on a module and puts back as it ends: the modules of a tree, the
containers of a module's attributes that a pass looks into for tensors with a tangent, the
snapshots of a module's attributes that it restores (a forward may store a Dual on its module),
and the classes a pass gives layers while it runs."""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import NamedTuple, Optional

from torch import nn

from .value import Dual


def check_module(module, who: str) -> None:
    """Raise TypeError naming ``who`` unless ``module`` is an nn.Module."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(module).__name__}")


def module_tree(root: nn.Module) -> list[nn.Module]:
    """``root.modules()``, each module once, without the names ``named_modules`` builds."""
    seen, order, stack = set(), [], [root]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:  # (a child registered as None)
            continue
        seen.add(id(m))
        order.append(m)
        if m._modules:
            stack.extend(reversed(m._modules.values()))
    return order


# The containers of a module's attributes that a pass looks into for tensors with a tangent, how
# deep (``[[w1, b1], [w2, b2]]`` is two), and the attributes every module has, which it skips.
CONTAINERS = (list, tuple, dict)
CONTAINER_DEPTH = 4
MODULE_STATE = frozenset(vars(nn.Module()))


# module type -> whether its forward sets no public attribute on its module: torch.nn's own
# layers, and the twins of fgkernels.nn (registered there); any other type may.
_NO_ATTRIBUTES: dict[type, bool] = {}


def forward_sets_no_attributes(cls: type) -> type:
    """Mark module type ``cls`` (exactly: not its subclasses) as one whose forward sets no
    public attribute on its module, so that a dual pass need not look for Duals left there."""
    _NO_ATTRIBUTES[cls] = True
    return cls


def may_store_attributes(m: nn.Module, foreign_hooks: bool) -> bool:
    """True if a call of ``m`` may store a value on it: a forward of a type not known to
    store nothing, a hook of the module's, or a global one of someone else's
    (``foreign_hooks``). What it stores during a dual pass (a weight computed by a weight_norm
    or prune pre-hook, a cache such as LeViT's attention biases) is a Dual: it is put back as
    the pass ends (``Attributes``), so that no Dual outlives the pass in a module's state."""
    return foreign_hooks or bool(m._forward_pre_hooks) or bool(m._forward_hooks) \
        or not sets_no_attributes(type(m))


def strip_dual_buffers(modules: Iterable[nn.Module]) -> None:
    """A buffer the forward rebound to a Dual (a carried state: ``self.state = h``) keeps
    its new value without the tangent, as forward_ad's dual tensor does when its level ends
    (the next plain call would otherwise read the pass's tangent)."""
    for m in modules:
        for name, b in m._buffers.items():
            if isinstance(b, Dual):
                m._buffers[name] = b.primal


def sets_no_attributes(cls: type) -> bool:
    """True if the forward of module type ``cls`` sets no public attribute on its module
    (``forward_sets_no_attributes``, or a torch.nn layer's but a recurrent one's)."""
    known = _NO_ATTRIBUTES.get(cls)
    if known is None:
        # (a recurrent layer's forward lists its weights anew in _flat_weights)
        known = _NO_ATTRIBUTES[cls] = cls.__module__.startswith("torch.nn.modules.") \
            and not issubclass(cls, nn.RNNBase)
    return known


# torch.nn layer class -> how to find the class a full dual pass gives a layer of it (or of a
# subclass) while it runs (``run_as_during_passes``).
_PASS_CLASS_OF: dict[type, Callable[[type], Optional[type]]] = {}


def run_as_during_passes(cls: type, pass_class_of: Callable[[type], Optional[type]]) -> None:
    """Make every layer of class ``cls`` or a subclass of it that a full dual pass substitutes
    run as ``pass_class_of(its class)`` (a subclass of its class adding no state; None: as it
    is) until the pass ends: ``fgkernels.nn`` gives ``nn.MultiheadAttention`` its twin so, whose
    forward takes Dual masks, which torch's refuses. A layer called as the pass's root, or held
    outside the tree of the module the pass started at, joins the pass as it is called: that
    call runs its own class's forward."""
    _PASS_CLASS_OF[cls] = pass_class_of


def class_during_passes(cls: type) -> Optional[type]:
    """The class a full dual pass gives a layer of class ``cls`` while it runs
    (``run_as_during_passes``; None: its own)."""
    for base, pass_class_of in _PASS_CLASS_OF.items():
        if issubclass(cls, base):
            return pass_class_of(cls)
    return None


def holds_dual(values: Iterable) -> bool:
    """True if a Dual is among ``values`` or inside a tuple, list or dict among them, at any
    depth (``model({"x": [Dual(x)]})``)."""
    for v in values:
        if isinstance(v, Dual):
            return True
        if isinstance(v, (tuple, list)) and holds_dual(v):
            return True
        if isinstance(v, dict) and holds_dual(v.values()):
            return True
    return False


class _Snapshot(NamedTuple):
    """A value before a dual pass, and for a dict or list, a snapshot of each entry (else
    None): what it is put back to."""

    value: object
    entries: object


def _snapshot(v) -> _Snapshot:
    if type(v) is dict:
        return _Snapshot(v, {k: _snapshot(e) for k, e in v.items()})
    if type(v) is list:
        return _Snapshot(v, [_snapshot(e) for e in v])
    return _Snapshot(v, None)


def _strip(container, entries) -> None:
    """Take every Dual the pass put into ``container`` (a dict or list, whose entries were
    ``entries`` before it) out of it: an entry that holds one becomes what it was (a container
    changed in place, in place), and one added that holds one is dropped; any other entry
    stays."""
    if type(container) is dict:
        for key in [key for key, e in container.items() if holds_dual((e,))]:
            if key in entries:
                container[key] = _put_back(entries[key])
            else:
                del container[key]
    else:
        container[:] = [_put_back(entries[i]) if i < len(entries) and holds_dual((e,)) else e
                        for i, e in enumerate(container)
                        if i < len(entries) or not holds_dual((e,))]


def _put_back(snapshot: _Snapshot):
    """The value a snapshot was taken of, with any Dual put into it since taken out."""
    if snapshot.entries is not None:
        _strip(snapshot.value, snapshot.entries)
    return snapshot.value


class Attributes(NamedTuple):
    """A module's attributes before a dual pass: its ``__dict__`` (a shallow copy) and a
    snapshot of each public dict and list in it, nested ones included (a cache or a record a
    forward may fill)."""

    module: nn.Module
    before: dict
    containers: dict[str, _Snapshot]

    @classmethod
    def of(cls, m: nn.Module) -> Attributes:
        d = m.__dict__
        return cls(m, d.copy(), {k: _snapshot(v) for k, v in d.items()
                                 if type(v) in (dict, list) and k[:1] != "_"})

    def restore(self) -> None:
        """Put back each attribute that the pass set to a Dual or to a value holding one at any
        depth (``self.state = (h, c)``), private ones included (delete it if it is new), and
        take the Duals out of each public dict or list, nested ones included, and of a private
        one the pass set anew (a recurrent layer's ``_flat_weights``): what an entry held
        before, or nothing for an entry added."""
        d, before, snapshots = self.module.__dict__, self.before, self.containers
        # Usually no attribute was set: every name still holds what it held (compared at C
        # speed), and only the containers that were there before can have gained a Dual.
        if d.keys() == before.keys() \
                and all(map(operator.is_, d.values(), map(before.__getitem__, d))):
            changed = snapshots
        else:
            changed = [k for k, v in d.items() if holds_dual((v,))
                       and (type(v) not in (dict, list) or k[:1] != "_"
                            or v is not before.get(k))]
        for k in changed:
            v = d.get(k)
            if type(v) in (dict, list):
                snapshot = snapshots.get(k) or _snapshot(_container(before.get(k), type(v)))
                _strip(v, snapshot.entries)
            elif holds_dual((v,)):
                if k in before:
                    d[k] = before[k]
                else:
                    del d[k]


def _container(v, kind: type):
    """``v`` where it is a ``kind`` (what a private container held before the pass), else an
    empty one."""
    return v if type(v) is kind else kind()
