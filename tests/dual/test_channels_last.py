"""channels_last end to end: convert() leaves the layout alone, every slot of every activation
stays channels_last, and a channels_last pass makes no copy that the contiguous pass does not
(none with one slot; with P parameter slots both move them out of the channel axis once per
convolution)."""
from collections import Counter

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fgkernels
from fgkernels import Dual
from fgkernels.dual.layout import in_kernel_layout

from zoo import build_resnet

CL = torch.channels_last
pytestmark = pytest.mark.skipif("native" not in fgkernels.available_backends(),
                                reason="the native extension is not built")


def _net(channels_last: bool, slots: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_resnet(8)
    x = torch.randn(4, 3, 16, 16)
    if channels_last:
        model, x = model.to(memory_format=CL), x.to(memory_format=CL)
    net = fgkernels.convert(model)
    fgkernels.random_tangents(net, slots, torch.Generator().manual_seed(1), dtype=dtype)
    return net, x


def _copies(channels_last: bool, slots: int, dtype: torch.dtype) -> list[tuple]:
    """The layout copies of activations in one dual pass (every copy ends in aten::copy_,
    whatever called it: contiguous, clone, to, a kernel's own), with their ranks: copies of
    4-D tensors or stacks of them within one dtype (a cast to the tangents' dtype is not one)."""
    net, x = _net(channels_last, slots, dtype)
    with fgkernels.use_backend("native"), profile(activities=[ProfilerActivity.CPU],
                                                   record_shapes=True) as prof:
        F.cross_entropy(net(Dual(x)), torch.zeros(4, dtype=torch.long))
    return sorted((e.cpu_parent.name if e.cpu_parent else "", len(e.input_shapes[0]))
                  for e in prof.events() if e.name == "aten::copy_" and e.input_shapes
                  and len(e.input_shapes[0]) >= 4 and e.input_dtypes[0] == e.input_dtypes[1])


def test_convert_leaves_the_layout_alone():
    net, _ = _net(True, 1, torch.float32)
    weights = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous(memory_format=CL) and not p.is_contiguous()
                           for p in weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_copy_with_one_slot(dtype):
    assert _copies(True, 1, dtype) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_adds_no_copy(dtype):
    # Every copy of the channels_last pass is one the contiguous pass makes too. (Not the
    # converse: on a CPU with bfloat16 instructions, torch's own bfloat16 convolution copies a
    # contiguous input to channels_last first.)
    extra = Counter(_copies(True, 3, dtype)) - Counter(_copies(False, 3, dtype))
    assert not extra, f"copies only the channels_last pass makes: {dict(extra)}"


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_every_slot_stays_channels_last(backend):
    """Each Conv→BN→ReLU, pool and residual add returns slots laid out like the primal."""
    net, x = _net(True, 2, torch.bfloat16)
    seen = []
    hook = lambda module, args, out: seen.append((type(module).__name__, out))
    for m in net.modules():
        if isinstance(m, (fgkernels.nn.DualSequential, fgkernels.nn.DualMaxPool2d)):
            m.register_forward_hook(hook)
    with fgkernels.use_backend(backend):
        net(Dual(x))
    four_d = [(name, out) for name, out in seen if out.primal.dim() == 4]
    assert four_d
    for name, out in four_d:
        assert out.primal.is_contiguous(memory_format=CL), name
        assert in_kernel_layout(out.primal, out.tangents), name


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("op", [
    F.relu, lambda v: F.hardtanh(v, -0.5, 0.5), lambda v: F.max_pool2d(v, 2),
    lambda v: F.conv2d(v[:1], torch.randn(4, 3, 3, 3), None, 1, 1),  # one image: ambiguous
    lambda v: torch.clamp(v, -0.5, 0.5), lambda v: torch.div(v, 0.3, rounding_mode="floor"),
    lambda v: F.pad(v, (1, 1, 1, 1)), lambda v: F.max_pool2d(v, 2, return_indices=True)[0],
    lambda v: F.adaptive_max_pool2d(v, 3), lambda v: v.sort(1)[0], lambda v: v.roll(1, 1),
    lambda v: torch.cat([v, v * 2], 1), lambda v: torch.cat([v[:1], v], 0),
    lambda v: F.group_norm(v, 1), lambda v: F.mse_loss(v, torch.zeros(()), reduction="none"),
    lambda v: F.huber_loss(v, torch.zeros(()), reduction="none"),
], ids=["relu", "hardtanh", "max_pool2d", "conv2d of one image", "clamp", "rounded quotient",
        "constant pad", "max_pool2d with indices", "adaptive max pool", "sort", "roll",
        "cat of channels", "cat of images", "group norm", "unreduced mse loss",
        "unreduced huber loss"])
def test_an_op_lays_out_each_slot_as_its_primal(op, backend):
    """A channels_last primal and slots, each op on its own: its slots channels_last too, on
    every CPU backend (a broadcast mask's masked_fill, a gather over flattened slots and a
    convolution of one image had laid them out contiguous on the reference backend; a
    constant pad, the max pools with indices, sort and roll on every backend; torch.cat and
    group norm too, a DenseNet's and a GhostNet's pass)."""
    x = torch.randn(2, 3, 6, 6).to(memory_format=CL)
    xt = torch.randn(1, 2, 6, 6, 3).permute(0, 1, 4, 2, 3)  # one slot, channels_last
    with fgkernels.use_backend(backend):
        out = op(Dual(x, xt))
    assert out.primal.is_contiguous(memory_format=CL)
    assert all(s.is_contiguous(memory_format=CL) for s in out.tangents)


@pytest.mark.parametrize("op", [lambda v: torch.softmax(v, 1), lambda v: F.log_softmax(v, -1),
                                lambda v: F.softmin(v, 1)],
                         ids=["softmax", "log_softmax", "softmin"])
def test_a_softmax_lays_out_its_slots_as_torch_lays_out_its_primal(op):
    """torch gives a channels_last input's softmax contiguous: its slots follow the primal (they
    kept the input's layout, and the next op copied one of the two)."""
    x = torch.randn(2, 3, 6, 6).to(memory_format=CL)
    xt = torch.randn(2, 2, 6, 6, 3).permute(0, 1, 4, 2, 3)  # two slots, channels_last
    out = op(Dual(x, xt))
    assert in_kernel_layout(out.primal, out.tangents)


@pytest.mark.parametrize("write", [
    lambda d, v: d.copy_(v), lambda d, v: d.fill_(v[0, 0, 0, 0]),
    lambda d, v: d.masked_fill_(torch.ones(2, 3, 4, 5, dtype=torch.bool), 1.0),
], ids=["copy_ of a contiguous value", "fill_ with a Dual", "masked_fill_ by a contiguous mask"])
def test_an_in_place_op_keeps_the_dual_s_layout(write):
    """A channels_last Dual written in place from contiguous operands stays channels_last, its
    slots too, as torch's in-place ops keep their tensor's strides (they came out contiguous:
    the next convolution copied them back)."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=CL)
    xt = torch.randn(1, 2, 4, 5, 3).permute(0, 1, 4, 2, 3)
    value = Dual(torch.randn(2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5))
    d = Dual(x.clone(memory_format=CL), xt.clone())
    write(d, value)
    with fwAD.dual_level():
        expected = fwAD.make_dual(x.clone(memory_format=CL), xt[0].clone())
        write(expected, fwAD.make_dual(value.primal, value.tangents[0]))
        expected = fwAD.unpack_dual(expected)
    assert torch.equal(d.primal, expected.primal) and d.primal.is_contiguous(memory_format=CL)
    assert torch.equal(d.tangents[0], expected.tangent)
    assert in_kernel_layout(d.primal, d.tangents)


@pytest.mark.parametrize("params", [False, True], ids=["input slots", "and parameter slots"])
def test_group_norm_of_channels_last_makes_no_copy(params):
    """Group norm views a channels_last input's groups in its own order: no copy of x or of
    its slots (reshaped into groups in contiguous order, both were copied, and the result's
    slots copied back), and the tangents as forward_ad's."""
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64).to(memory_format=CL)
    xt = torch.randn(2, 2, 3, 5, 4, dtype=torch.float64).permute(0, 1, 4, 2, 3)
    w, b = torch.randn(2, 4, dtype=torch.float64).unbind()
    wt, bt = torch.randn(2, 2, 4, dtype=torch.float64).unbind()  # two slots each
    weight, bias = (Dual(w, wt), Dual(b, bt)) if params else (w, b)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = F.group_norm(Dual(x, xt), 2, weight, bias)
    copies = [e.input_shapes[0] for e in prof.events()
              if e.name == "aten::copy_" and e.input_shapes and len(e.input_shapes[0]) >= 4]
    assert copies == []
    assert out.primal.is_contiguous(memory_format=CL) and in_kernel_layout(out.primal,
                                                                           out.tangents)
    for k in range(2):
        with fwAD.dual_level():  # (torch's own group norm refuses channels_last under forward AD)
            dual = lambda v, t: fwAD.make_dual(v, t) if params else v
            expected = F.group_norm(fwAD.make_dual(x.contiguous(), xt[k].contiguous()), 2,
                                    dual(w, wt[k]), dual(b, bt[k]))
            expected = fwAD.unpack_dual(expected)
        torch.testing.assert_close(out.primal, expected.primal)
        torch.testing.assert_close(out.tangents[k], expected.tangent)


def test_cat_of_slots_that_require_grad_keeps_their_layout():
    """torch.cat of channels_last slots that require grad (a parameter without tangent times
    a Dual, in an autograd region: a layer scale in activity space) joins them as any others,
    laid out as the primal (an out= cat refused them: out= takes no autograd)."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=CL)
    xt = torch.randn(1, 2, 4, 5, 3).permute(0, 1, 4, 2, 3)
    gamma = torch.randn(3, 1, 1, requires_grad=True)
    with torch.enable_grad():
        scaled = Dual(x, xt) * gamma
        out = torch.cat([scaled, Dual(x, xt)], 1)
    assert out.tangents.requires_grad
    assert out.primal.is_contiguous(memory_format=CL) and in_kernel_layout(out.primal,
                                                                          out.tangents)
    torch.testing.assert_close(out.tangents.detach(), torch.cat([xt * gamma, xt], 2).detach())


def test_instance_norm_lays_out_its_slots_as_its_primal():
    """F.instance_norm of a channels_last input returns a contiguous primal (torch's): its
    slots are laid out as that primal (they kept the input's layout)."""
    x = torch.randn(2, 3, 6, 6).to(memory_format=CL)
    xt = torch.randn(1, 2, 6, 6, 3).permute(0, 1, 4, 2, 3)
    out = F.instance_norm(Dual(x, xt))
    assert in_kernel_layout(out.primal, out.tangents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_directions_entering_part_way_stay_channels_last(dtype):
    """Slots assembled from parts (a direction added to an activation, a sum of operands with
    different directions, an operand spread over more slots) are laid out like the primal, so
    the next convolution copies nothing."""
    torch.manual_seed(0)
    conv1, conv2 = (fgkernels.convert(torch.nn.Conv2d(8, 8, 3, padding=1)).to(memory_format=CL)
                    for _ in range(2))
    x = torch.randn(2, 8, 6, 6).to(memory_format=CL)
    slot = lambda: torch.randn(2, 8, 6, 6, dtype=dtype).to(memory_format=CL)
    with fgkernels.use_backend("native"), profile(activities=[ProfilerActivity.CPU],
                                                   record_shapes=True) as prof:
        a = fgkernels.functional.add_direction(conv1(Dual(x, slot()[None], directions=[0])),
                                               1, slot())
        b = Dual(x, slot()[None], directions=[2]) + a      # disjoint parts: 0, 1 and 2
        c = Dual(x, slot()[None], directions=[1]) + a      # overlapping parts, none covers
        outs = [a, b, c, conv2(b), conv2(c)]

    def in_a_convolution(event):
        while event is not None and not event.name.startswith("fgkernels::dual_conv2d"):
            event = event.cpu_parent
        return event is not None

    assert not [e for e in prof.events() if e.name == "aten::copy_" and in_a_convolution(e)
                and e.input_dtypes[0] == e.input_dtypes[1]]  # a cast of the weight is no copy
    assert [o.directions for o in outs] == [(0, 1), (0, 1, 2), (0, 1), (0, 1, 2), (0, 1)]
    for o in outs:
        assert in_kernel_layout(o.primal, o.tangents) and o.tangent_dtype == dtype


@pytest.mark.parametrize("to_layout", [
    lambda v, fmt: v.contiguous(memory_format=fmt), lambda v, fmt: v.clone(memory_format=fmt),
    lambda v, fmt: torch.clone(v, memory_format=fmt), lambda v, fmt: v.to(memory_format=fmt),
    lambda v, fmt: v.float(memory_format=fmt)],
    ids=["contiguous", "clone", "torch.clone", "to", "float"])
@pytest.mark.parametrize("fmt", [CL, torch.channels_last_3d], ids=["2-d", "3-d"])
def test_a_layout_asked_for_lays_out_each_slot_so(to_layout, fmt):
    """``contiguous``/``clone``/``to`` in channels_last or channels_last_3d: each slot laid out
    as the primal, with its values (a 3-d map's ``contiguous`` and ``to`` left the slots
    contiguous)."""
    x = torch.randn(2, 3, 4, 5, *(() if fmt == CL else (6,)))
    xt = torch.randn(2, *x.shape)
    out = to_layout(Dual(x, xt), fmt)
    assert out.primal.is_contiguous(memory_format=fmt)
    assert all(s.is_contiguous(memory_format=fmt) for s in out.tangents)
    assert torch.equal(out.tangents, xt)
