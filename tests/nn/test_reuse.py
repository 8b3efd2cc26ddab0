"""A convolution's primal output handed to the dual pass: the ``primal=`` argument of the
functional ops and ``reuse_conv_outputs`` on the Dual layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgkernels
import fgkernels.functional as DF
from fgkernels import Dual


def _dual_input(T=2, shape=(3, 4, 6, 5)):
    x = torch.randn(shape, dtype=torch.float64)
    return Dual(x, torch.randn(T, *shape, dtype=x.dtype))


def test_given_primal_gives_the_same_dual(backend):
    d = _dual_input()
    w = Dual(torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(2, 5, 4, 3, 3,
                                                                      dtype=torch.float64))
    b = Dual(torch.randn(5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    fresh = DF.conv2d(d, w, b, 2, 1)
    y = F.conv2d(d.primal, w.primal, b.primal, 2, 1)
    given = DF.conv2d(d, w, b, 2, 1, primal=y)
    assert given.primal.data_ptr() == y.data_ptr()
    torch.testing.assert_close(given.primal, fresh.primal, rtol=0, atol=0)
    torch.testing.assert_close(given.tangents, fresh.tangents, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_batch_norm_with_conv_primal(backend, relu):
    d = _dual_input()
    w = Dual(torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(2, 5, 4, 3, 3,
                                                                      dtype=torch.float64))
    g, bb = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    stats = [torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)]
    stats2 = [s.clone() for s in stats]
    fresh = DF.conv2d_batch_norm(d, w, None, 1, 1, 1, 1, *stats, g, bb, True, 0.1, 1e-5, relu)
    given = DF.conv2d_batch_norm(d, w, None, 1, 1, 1, 1, *stats2, g, bb, True, 0.1, 1e-5, relu,
                                 conv_primal=F.conv2d(d.primal, w.primal, None, 1, 1))
    torch.testing.assert_close(given.primal, fresh.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(given.tangents, fresh.tangents, rtol=1e-12, atol=1e-12)
    for a, b in zip(stats, stats2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_primal_raises():
    d = _dual_input()
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"primal must be a torch.float64 tensor of shape "
                                         r"\(3, 5, 4, 3\)"):
        DF.conv2d(d, w, primal=torch.zeros(3, 5, 6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="got torch.float32"):
        DF.conv2d(d, w, primal=torch.zeros(3, 5, 4, 3))
    with pytest.raises(TypeError, match="primal must be a Tensor, got Dual"):
        DF.conv2d(d, w, primal=Dual(torch.zeros(3, 5, 4, 3, dtype=torch.float64)))
    stats = [torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)]
    before = [s.clone() for s in stats]
    with pytest.raises(ValueError, match="conv2d_batch_norm: primal must be"):
        DF.conv2d_batch_norm(d, w, None, 1, 0, 1, 1, *stats, None, None, True, 0.1, 1e-5, False,
                             conv_primal=torch.zeros(3, 5, 6, 5, dtype=torch.float64))
    for a, b in zip(stats, before):  # nothing half-done: the running stats are untouched
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _block():
    """Conv→BN→ReLU→Conv→BN (fused runs) and a lone convolution after them."""
    torch.manual_seed(0)
    return fgkernels.convert(nn.Sequential(
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)),
        nn.Conv2d(6, 3, 1)).double())


@pytest.mark.parametrize("channels_last", [False, True])
def test_reuse_matches_a_fresh_dual_pass(backend, channels_last):
    block, fresh = _block(), _block()
    d = _dual_input()
    x, xt = d.primal, d.tangents
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        xt = xt.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    d = Dual(x, xt, directions=[0, 1])
    tangents = fgkernels.random_tangents(block, direction=2)
    fgkernels.set_tangents(fresh, tangents, direction=2)
    with fgkernels.nn.reuse_conv_outputs(block):
        plain = block(d.primal.clone().requires_grad_())
        plain.square().sum().backward()          # as a guess does: autograd, then the dual pass
        kept = block[1].__dict__["_fg_kept"][0].output
        out = block(d)
    expected = fresh(d)
    assert out.primal.data_ptr() == kept.data_ptr()  # the lone convolution's output, reused
    assert out.directions == expected.directions == (0, 1, 2)
    torch.testing.assert_close(out.primal, expected.primal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.tangents, expected.tangents, rtol=1e-10, atol=1e-12)
    assert all("_fg_kept" not in m.__dict__ for m in block.modules())


@pytest.mark.parametrize("change", ["weight", "weight replaced", "input shape", "input dtype",
                                    "input layout", "mode", "output", "used once",
                                    "autocast output"])
def test_stale_kept_output_is_not_used(backend, change):
    conv = fgkernels.convert(nn.Conv2d(4, 5, 3).double())
    d = _dual_input()
    with fgkernels.nn.reuse_conv_outputs(conv):
        kept = conv(d.primal)
        if change == "weight":
            with torch.no_grad():
                conv.weight.add_(1.0)
        elif change == "weight replaced":  # a state dict loaded with assign=True
            new = nn.Parameter(conv.weight.detach() + 1.0)
            with torch.no_grad():
                while new._version < conv.weight._version:  # versions alike, tensors not
                    new.mul_(1.0)
            conv.weight = new
        elif change == "input shape":
            d = Dual(d.primal[:2], d.tangents[:, :2])
        elif change == "input dtype":
            conv.float()
            d = Dual(d.primal.float(), d.tangents.float())
        elif change == "input layout":
            d = Dual(d.primal.to(memory_format=torch.channels_last),
                     d.tangents.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3))
        elif change == "mode":
            conv.eval()
        elif change == "autocast output":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                kept = conv(d.primal)
        elif change == "output":
            kept.detach().mul_(2)
        elif change == "used once":
            conv(d)
        out = conv(d)
    assert out.primal.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(out.primal, F.conv2d(d.primal, conv.weight, conv.bias),
                               rtol=0, atol=0)


def test_a_layer_called_twice_keeps_both_outputs_in_order(backend):
    """A convolution applied twice in one forward (a shared layer) keeps each output; the dual
    pass takes them in the same order."""
    conv = fgkernels.convert(nn.Conv2d(4, 4, 3, padding=1).double())
    model = lambda v: conv(torch.relu(conv(v)))
    d = _dual_input()
    fgkernels.random_tangents(conv, num_tangents=2)
    expected = model(d)
    with fgkernels.nn.reuse_conv_outputs(conv):
        model(d.primal)
        out = model(d)
    fgkernels.clear_tangents(conv)
    torch.testing.assert_close(out.primal, expected.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangents, expected.tangents, rtol=1e-10, atol=1e-12)


def test_a_backward_after_the_dual_call_raises_instead_of_reading_an_overwritten_output():
    """The dual call may overwrite the output it takes (a fused batch norm does): a backward
    through a graph that saved that output, run after the dual call, raises autograd's error
    instead of computing from the overwritten values."""
    block = fgkernels.convert(nn.Sequential(nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5),
                                            nn.ReLU())).double()
    d = _dual_input()
    with fgkernels.nn.reuse_conv_outputs(block):
        loss = block(d.primal.clone().requires_grad_()).square().sum()
        block(d)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_plain_forwards_that_keep_nothing():
    """Inside the block, a forward under inference mode and one of a convolution whose weight
    a parametrization computes run as they do outside it, and the dual call computes its own
    primal."""
    from torch.nn.utils.parametrizations import weight_norm
    d = _dual_input()
    conv = fgkernels.convert(nn.Conv2d(4, 5, 3).double())
    with fgkernels.nn.reuse_conv_outputs(conv), torch.inference_mode():
        y = conv(d.primal)
    torch.testing.assert_close(y, F.conv2d(d.primal, conv.weight, conv.bias), rtol=0, atol=0)
    normed = fgkernels.convert(weight_norm(nn.Conv2d(4, 5, 3, bias=False)).double())
    fgkernels.random_tangents(normed, num_tangents=2)
    with fgkernels.nn.reuse_conv_outputs(normed):
        normed(d.primal)
        out = normed(d)
    fgkernels.clear_tangents(normed)
    torch.testing.assert_close(out.primal, normed(d.primal).detach(), rtol=1e-12, atol=1e-12)


def test_nothing_is_kept_outside_the_block():
    conv = fgkernels.convert(nn.Conv2d(4, 5, 3).double())
    d = _dual_input()
    conv(d.primal)
    assert "_fg_kept" not in conv.__dict__
    assert conv(d).primal.data_ptr() != conv(d.primal).data_ptr()
    with pytest.raises(RuntimeError, match="boom"), fgkernels.nn.reuse_conv_outputs(conv):
        conv(d.primal)
        raise RuntimeError("boom")
    assert "_fg_kept" not in conv.__dict__  # dropped on the way out, error or not
    with fgkernels.nn.reuse_conv_outputs(conv):
        with fgkernels.nn.reuse_conv_outputs(conv):
            pass
        kept = conv(d.primal)                  # the enclosing block still keeps outputs
        assert conv(d).primal.data_ptr() == kept.data_ptr()
