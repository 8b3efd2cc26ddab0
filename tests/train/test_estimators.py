"""The forward-gradient estimators equal the same projections computed with plain autograd:
the proof that the dual pass computes the paper's estimator."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fgkernels
from fgkernels import Dual
from fgkernels.train import GUESSES, SPACES, TARGETS, build_model, estimate_gradients
from fgkernels.train.estimators import _local_backward, local_gradients, preserved_buffers
from fgkernels.train.models import BlockNet, aux_head, final_head

from helpers import held_by_bfloat16

TOL = dict(rtol=1e-10, atol=1e-12)


def small_net(arch="cnn"):
    torch.manual_seed(0)
    net = build_model(arch, num_classes=3, in_channels=1, width=4, aux_width=6).double()
    return net


def first_ops_in_place():
    """The small CNN with each block's last ReLU dropped (outputs of both signs), and each block
    and head beginning with a LeakyReLU in place, which writes into its input."""
    net = small_net()
    leaky = lambda: nn.LeakyReLU(0.1, inplace=True)
    return fgkernels.convert(BlockNet([nn.Sequential(leaky(), *list(b)[:-1]) for b in net.blocks],
                                      [nn.Sequential(leaky(), *h) for h in net.heads]))


def autograd_view(net, x, y):
    """Every block output a_j (kept for grad) and the losses: global, and aux loss per block.
    Each module takes a copy of its input, which a first op in place writes into."""
    acts, h = [], x
    for block in net.blocks:
        h = block(h.clone())
        h.retain_grad() if h.requires_grad else None
        acts.append(h)
    global_loss = F.cross_entropy(net.heads[-1](acts[-1].clone()), y)
    aux = [F.cross_entropy(net.heads[j](acts[j].clone()), y) for j in range(len(acts) - 1)]
    aux.append(global_loss)
    return acts, global_loss, aux


def grads_of(loss, params):
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if v is None else v for v, p in zip(g, params)]


@pytest.mark.parametrize("variant", ["", "block-1-frozen", "first-ops-in-place"])
@pytest.mark.parametrize("target,guess,space", list(itertools.product(TARGETS, GUESSES, SPACES)))
def test_estimate_equals_autograd_projection(target, guess, space, variant):
    """Every block's estimate, the exact last block and classifier, the heads' gradients and
    the running statistics, against plain autograd. ``block-1-frozen``: block 1's parameters
    all frozen (requires_grad False): it gets no estimate, in weight space a derivative of 0
    (its direction perturbs nothing), and the other blocks theirs. ``first-ops-in-place``:
    each module's autograd forward and dual pass writes into an input of its own, not into
    the pass's activation (that went on written, or a leaf requiring grad was written)."""
    net = first_ops_in_place() if variant == "first-ops-in-place" else small_net()
    if variant == "block-1-frozen":
        net.blocks[1].requires_grad_(False)
    ref = copy.deepcopy(net)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    aux_buffers = [b.clone() for head in net.heads[:-1] for b in head.buffers()]
    est = estimate_gradients(net, x, y, target, guess, space,
                             generator=torch.Generator().manual_seed(5), keep_guesses=True)
    acts, global_loss, aux = autograd_view(ref, x, y)
    J = len(ref.blocks)
    assert [b.block for b in est.blocks] == list(range(J - 1))
    for b in est.blocks:
        j = b.block
        block_params = [p for p in ref.blocks[j].parameters() if p.requires_grad]
        names = [f"blocks.{j}.{n}" for n, p in ref.blocks[j].named_parameters()
                 if p.requires_grad]
        tgt_loss = {"global": global_loss, "local": aux[j], "above": aux[j + 1]}[target]
        if not block_params:
            assert space == "activity" or b.derivative == 0.0
            assert not any(n.startswith(f"blocks.{j}.") for n in est.grads)
            continue
        if space == "weight":
            true = grads_of(tgt_loss, block_params)
            g = [b.guess[n.split(".", 2)[2]] for n in names]
            if guess == "local":  # the guess is the gradient of block j's own aux loss
                for gi, ti in zip(g, grads_of(aux[j], block_params)):
                    torch.testing.assert_close(gi, ti, **TOL)
            deriv = sum(float((t * v).sum()) for t, v in zip(true, g))
            norm2 = sum(float((v * v).sum()) for v in g)
            scale = deriv if guess == "random" else deriv / norm2
            expected = [scale * v for v in g]
        else:
            true = grads_of(tgt_loss, [acts[j]])[0]
            g = b.guess
            if guess == "local":
                torch.testing.assert_close(g, grads_of(aux[j], [acts[j]])[0], **TOL)
            deriv = float((true * g).sum())
            scale = deriv if guess == "random" else deriv / float((g * g).sum())
            expected = torch.autograd.grad(acts[j], block_params, scale * g, retain_graph=True)
        assert b.derivative == pytest.approx(deriv, rel=1e-10, abs=1e-12)
        for n, e in zip(names, expected):
            torch.testing.assert_close(est.grads[n], e, **TOL)
    # The last block and the classifier: exact; the heads: their own aux loss, unless fixed.
    last = list(ref.blocks[-1].parameters()) + list(ref.heads[-1].parameters())
    last_names = ([f"blocks.{J - 1}.{n}" for n, _ in ref.blocks[-1].named_parameters()]
                  + [f"heads.{J - 1}.{n}" for n, _ in ref.heads[-1].named_parameters()])
    for n, e in zip(last_names, grads_of(global_loss, last)):
        torch.testing.assert_close(est.grads[n], e, **TOL)
    for j in range(J - 1):
        hp = list(ref.heads[j].parameters())
        hn = [f"heads.{j}.{n}" for n, _ in ref.heads[j].named_parameters()]
        if guess == "fixed-ntk":
            assert not any(n in est.grads for n in hn)
        else:
            for n, e in zip(hn, grads_of(aux[j], hp)):
                torch.testing.assert_close(est.grads[n], e, **TOL)
    assert set(est.grads) <= {n for n, _ in net.named_parameters()}
    assert est.loss == pytest.approx(float(global_loss.detach()), rel=1e-12)
    # One update of the blocks' and the classifier's running statistics, as the plain forward;
    # the aux heads' as they were (the plain forward never runs them).
    for part in (lambda m: m.blocks, lambda m: m.heads[-1]):
        for (n, a), (_, b) in zip(part(ref).named_buffers(), part(net).named_buffers()):
            torch.testing.assert_close(b, a, msg=n)
    after = [b for head in net.heads[:-1] for b in head.buffers()]
    for before, now in zip(aux_buffers, after, strict=True):
        torch.testing.assert_close(now, before, rtol=0, atol=0)


class _FixedMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("space", SPACES)
def test_a_block_with_dropout_draws_one_mask_a_step(space):
    """Dropout in a block that a step runs twice (the guess's autograd forward, then the dual
    pass carrying the block before's direction): both draw the same mask, and the derivative
    is the step's forward's under it (the two passes drew two masks, and the estimate mixed
    them: ⟨∇L, g⟩ −0.094 where either mask gives −0.103 or −0.006)."""
    torch.manual_seed(0)
    conv_bn_relu = lambda: [nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.Dropout(0.5),
                            nn.BatchNorm2d(4), nn.ReLU(), *conv_bn_relu()),
              nn.Sequential(*conv_bn_relu())]
    heads = [aux_head("linear", 4, 3, 0), aux_head("linear", 4, 3, 0), final_head(4, 3)]
    net = BlockNet(blocks, heads).double()
    ref = copy.deepcopy(net)
    masks = []
    net.blocks[1][1].register_forward_hook(
        lambda m, args, out: masks.append(getattr(out, "primal", out) != 0))
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    est = estimate_gradients(net, x, y, "global", "local", space, keep_guesses=True)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    ref.blocks[1][1] = _FixedMask(masks[0].double() * 2)  # kept values scaled by 1/(1 − p)
    a1 = ref.blocks[1](ref.blocks[0](x))
    loss = F.cross_entropy(ref.heads[-1](ref.blocks[2](a1)), y)
    guess = est.blocks[1].guess
    if space == "weight":
        params = dict(ref.blocks[1].named_parameters())
        true = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        derivative = sum(float((true[n] * guess[n]).sum()) for n in params)
    else:
        derivative = float((torch.autograd.grad(loss, a1)[0] * guess).sum())
    assert est.blocks[1].derivative == pytest.approx(derivative, rel=1e-10)
    assert est.loss == pytest.approx(float(loss.detach()), rel=1e-12)


@pytest.mark.parametrize("guess", ["local", "random"])
@pytest.mark.parametrize("space", SPACES)
def test_an_aux_head_with_dropout_draws_one_mask_a_step(space, guess):
    """Dropout in an aux head that a step runs twice for a local target (plainly, for the guess
    or the head's gradient, then dual): both draw the same mask, and the derivative and the
    head's gradient are those of the aux loss under it. (With two masks, the dual pass also
    took its convolution's primal output from the first and its tangent from the second, and
    a local guess measured against its own local target gave a scale far from 1.)"""
    torch.manual_seed(0)
    # blocks end in a batch norm: no zero reaches a dropout, whose output then shows its mask
    conv_bn = lambda cin: nn.Sequential(nn.Conv2d(cin, 4, 3, 1, 1, bias=False),
                                        nn.BatchNorm2d(4))
    head = lambda: nn.Sequential(nn.Dropout(0.5), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3))
    net = fgkernels.convert(BlockNet([conv_bn(1), conv_bn(4), conv_bn(4)],
                                     [head(), head(), final_head(4, 3)])).double()
    ref = copy.deepcopy(net)
    outputs = {(j, i): [] for j in (0, 1) for i in (0, 4)}
    for (j, i), seen in outputs.items():
        net.heads[j][i].register_forward_hook(
            lambda m, args, out, seen=seen: seen.append(getattr(out, "primal", out).clone()))
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    est = estimate_gradients(net, x, y, "local", guess, space, keep_guesses=True,
                             generator=torch.Generator().manual_seed(3))
    for (j, i), (first, second) in outputs.items():
        torch.testing.assert_close(second, first, rtol=1e-12, atol=0)  # the same mask
        ref.heads[j][i] = _FixedMask((first != 0).double() * 2)  # kept values scaled by 1/(1 − p)
    acts, _, aux = autograd_view(ref, x, y)
    for b in est.blocks:
        j = b.block
        if space == "weight":
            params = dict(ref.blocks[j].named_parameters())
            true = dict(zip(params, grads_of(aux[j], list(params.values()))))
            derivative = sum(float((true[n] * b.guess[n]).sum()) for n in params)
        else:
            derivative = float((grads_of(aux[j], [acts[j]])[0] * b.guess).sum())
        assert b.derivative == pytest.approx(derivative, rel=1e-10)
        if guess == "local":  # the guess is the target's gradient: the estimate is the guess
            assert b.scale == pytest.approx(1, rel=1e-10)
        names = [f"heads.{j}.{n}" for n, _ in ref.heads[j].named_parameters()]
        for n, e in zip(names, grads_of(aux[j], list(ref.heads[j].parameters()))):
            torch.testing.assert_close(est.grads[n], e, **TOL)


@pytest.mark.parametrize("space", SPACES)
def test_estimate_on_resnet_blocks(space):
    """ResNet blocks (skip connections, projection shortcuts) with the global target."""
    torch.manual_seed(1)
    net = build_model("resnet18-8b", num_classes=3, in_channels=3, width=4, aux="linear").double()
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    est = estimate_gradients(net, x, y, "global", "local", space, keep_guesses=True)
    acts, global_loss, aux = autograd_view(ref, x, y)
    for b in est.blocks:
        j = b.block
        if space == "weight":
            params = list(ref.blocks[j].parameters())
            true = grads_of(global_loss, params)
            g = [b.guess[n] for n, _ in ref.blocks[j].named_parameters()]
            deriv = sum(float((t * v).sum()) for t, v in zip(true, g))
        else:
            deriv = float((grads_of(global_loss, [acts[j]])[0] * b.guess).sum())
        assert b.derivative == pytest.approx(deriv, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("space", SPACES)
def test_a_batch_of_numpy_memory_is_estimated_as_a_torch_one(space):
    """A batch on a NumPy array's memory (torch.from_numpy, which torch cannot clone
    copy-on-write) gives the estimates a batch of torch's own memory gives."""
    torch.manual_seed(1)
    net = first_ops_in_place()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    expected = estimate_gradients(copy.deepcopy(net), x, y, "global", "local", space)
    got = estimate_gradients(net, torch.from_numpy(x.numpy().copy()), y, "global", "local", space)
    assert got.grads.keys() == expected.grads.keys()
    for name, g in expected.grads.items():
        torch.testing.assert_close(got.grads[name], g, rtol=0, atol=0)


@pytest.mark.parametrize("space", SPACES)
def test_random_guesses_draw_the_noise_asked_for(space):
    """Rademacher guesses are ±1 (both signs drawn), Gaussian ones are not."""
    net = small_net()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    for noise in ("rademacher", "gaussian"):
        est = estimate_gradients(net, x, y, "global", "random", space, keep_guesses=True,
                                 generator=torch.Generator().manual_seed(0), noise=noise)
        values = torch.cat([g.flatten() for b in est.blocks
                            for g in (b.guess.values() if space == "weight" else [b.guess])])
        signs = values.abs() == 1
        assert bool(signs.all()) == (noise == "rademacher"), noise
        assert bool((values > 0).any()) and bool((values < 0).any()), noise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("guess", ["local", "random"])
@pytest.mark.parametrize("space", SPACES)
def test_bfloat16_guesses_are_the_directions_measured(space, guess, dtype):
    """bfloat16 tangents of a wider network: each guess is rounded to bfloat16 once and is the
    estimate's basis (the estimate is the projection on exactly the guess kept, and the
    derivative is ⟨∇L, g⟩ for that g, to the bfloat16 pass's error). A local weight-space
    guess is computed in bfloat16 (its convolutions' values differ from the exact gradient
    rounded: not merely rounded at the end), near the local gradient; the heads' gradients
    are plain autograd's."""
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    net = small_net().to(dtype)
    ref = copy.deepcopy(net)
    x = torch.randn(6, 1, 8, 8, dtype=dtype)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    with fgkernels.tangent_dtype(torch.bfloat16):
        est = estimate_gradients(net, x, y, "global", guess, space, keep_guesses=True,
                                 generator=torch.Generator().manual_seed(3))
    acts, global_loss, aux = autograd_view(ref, x, y)
    for b in est.blocks:
        j = b.block
        params = list(ref.blocks[j].parameters())
        names = [f"blocks.{j}.{n}" for n, _ in ref.blocks[j].named_parameters()]
        if space == "weight":
            g = [b.guess[n.split(".", 2)[2]] for n in names]
            deriv = sum(float((t * v).sum()) for t, v in zip(grads_of(global_loss, params), g))
            expected = [b.scale * v for v in g]
        else:
            g = [b.guess]
            deriv = float((grads_of(global_loss, [acts[j]])[0] * b.guess).sum())
            expected = torch.autograd.grad(acts[j], params, b.scale * b.guess,
                                           retain_graph=True)
        if space == "weight" and guess == "local":
            local = grads_of(aux[j], params)
            convs = [(v, t) for v, t in zip(g, local) if v.dim() == 4]
            differ = sum(int((v != t.to(torch.bfloat16).to(dtype)).sum()) for v, t in convs)
            assert differ >= 0.1 * sum(v.numel() for v, _ in convs)
            cosine = sum(float((v * t).sum()) for v, t in zip(g, local)) / (
                sum(float((v * v).sum()) for v in g) * sum(float((t * t).sum()) for t in local)
            ) ** 0.5
            assert cosine > 0.999
        assert all(held_by_bfloat16(v) for v in g)
        norm2 = 1.0 if guess == "random" else sum(float((v * v).sum()) for v in g)
        assert b.scale == pytest.approx(b.derivative / norm2, rel=1e-6)
        # The direction rides the later blocks' dual passes in bfloat16: a few percent.
        assert b.derivative == pytest.approx(deriv, rel=0.1)
        for n, e in zip(names, expected):
            torch.testing.assert_close(est.grads[n], e, **tol)
    for j in range(len(ref.blocks) - 1):
        hn = [f"heads.{j}.{n}" for n, _ in ref.heads[j].named_parameters()]
        for n, e in zip(hn, grads_of(aux[j], list(ref.heads[j].parameters()))):
            torch.testing.assert_close(est.grads[n], e, **tol)


def test_a_block_weight_the_head_reads_too_is_differentiated_in_full():
    """With bfloat16 guesses, a block's convolution whose weight the head reads too (a tied
    layer) is differentiated in the network's dtype, since the head's gradient trains the head;
    the block's other convolutions in bfloat16."""
    torch.manual_seed(0)
    tied = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
    block = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, bias=False),
                                torch.nn.ReLU(), tied).double()
    head = torch.nn.Sequential(tied, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(2, 3)).double()
    h, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    local = _local_backward(block, head, h, y, block_dtype=torch.bfloat16)
    with torch.enable_grad():
        loss = F.cross_entropy(head(block(h)), y)
    first, shared = grads_of(loss, list(block.parameters()))
    torch.testing.assert_close(local.block[1], shared, **TOL)
    torch.testing.assert_close(local.head[0], shared, **TOL)
    assert held_by_bfloat16(local.block[0]) and not torch.equal(local.block[0], first)
    torch.testing.assert_close(local.block[0], first, rtol=2 ** -7,
                               atol=1e-3 * float(first.abs().max()))


def test_a_parameter_of_two_blocks_or_heads_is_refused_by_name():
    """One module used as two blocks, or two heads sharing a layer: refused before anything runs
    (``net.named_parameters()`` lists a shared parameter once, and the estimate or gradient
    under the other name was dropped). A frozen one is left alone: it takes none."""
    torch.manual_seed(0)
    conv_bn_relu = lambda: nn.Sequential(nn.Conv2d(2, 2, 3, 1, 1), nn.BatchNorm2d(2), nn.ReLU())
    head = lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    shared = conv_bn_relu()
    twice = BlockNet([conv_bn_relu(), shared, shared], [head(), head(), head()]).double()
    tied = BlockNet([conv_bn_relu(), conv_bn_relu()], [head(), head()]).double()
    tied.heads[0][2].weight = tied.heads[1][2].weight
    estimators = [local_gradients] + [
        lambda net, x, y, space=space: estimate_gradients(net, x, y, "global", "local", space)
        for space in SPACES]
    for net, message in ((twice, "'blocks.2.0.weight' is 'blocks.1.0.weight'"),
                         (tied, "'heads.1.2.weight' is 'heads.0.2.weight'")):
        buffers = [b.clone() for b in net.buffers()]
        for estimator in estimators:
            with pytest.raises(ValueError, match=message):
                estimator(net, x, y)
        for before, now in zip(buffers, net.buffers(), strict=True):
            assert torch.equal(now, before)
    tied.heads[0][2].weight.requires_grad_(False)
    assert set(estimate_gradients(tied, x, y).grads) <= {n for n, _ in tied.named_parameters()}


def test_bad_choices_list_the_valid_ones():
    net = small_net()
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown guess 'noise'; choose one of random, local"):
        estimate_gradients(net, x, y, guess="noise")
    with pytest.raises(ValueError, match="unknown target"):
        estimate_gradients(net, x, y, target="nearby")
    with pytest.raises(ValueError, match="unknown arch 'vgg'; choose one of"):
        build_model("vgg", 10, 3)


@pytest.mark.parametrize("make_net", [small_net, first_ops_in_place])
def test_local_baseline_equals_autograd_of_each_aux_loss(make_net):
    net = make_net()
    ref = copy.deepcopy(net)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    est = local_gradients(net, x, y)
    acts, global_loss, aux = autograd_view(ref, x, y)
    for j in range(len(ref.blocks)):
        for part in ("blocks", "heads"):
            module = getattr(ref, part)[j]
            names = [f"{part}.{j}.{n}" for n, _ in module.named_parameters()]
            if not names:  # the small CNN's last block is empty
                continue
            for n, e in zip(names, grads_of(aux[j], list(module.parameters()))):
                torch.testing.assert_close(est.grads[n], e, **TOL)
    assert est.loss == pytest.approx(float(global_loss.detach()), rel=1e-12)
    for (n, a), (_, b) in zip(ref.blocks.named_buffers(), net.blocks.named_buffers()):
        torch.testing.assert_close(b, a, msg=n)  # one update of the blocks' running stats


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("target", TARGETS)
def test_heads_keep_conv_outputs_only_for_a_local_target(target, space, monkeypatch):
    """A head's conv outputs are kept for its dual pass, which only a local target runs; for a
    global target they would only raise the step's memory peak (in the block's backward)."""
    from fgkernels.train import estimators
    net, kept = small_net(), []
    block_targets = estimators._block_targets

    def spy(run, j, d):
        kept.append(any("_fg_kept" in m.__dict__ for m in run.net.heads[j].modules()))
        return block_targets(run, j, d)

    monkeypatch.setattr(estimators, "_block_targets", spy)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    estimate_gradients(net, x, y, target, "local", space)
    assert kept == [target != "global"] * (len(net.blocks) - 1)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("target", TARGETS)
def test_no_dual_pass_where_no_direction_is_carried(target, space):
    """The last block is never run on a Dual (its local backward gives the derivatives of the
    directions reaching it), nor, in activity space, a block that no direction reaches (the
    first; every block for a local target): the autograd forward already gave its output."""
    net = small_net()
    inputs = {j: [] for j in range(len(net.blocks))}
    for j, block in enumerate(net.blocks):
        block.register_forward_pre_hook(lambda m, args, j=j: inputs[j].append(type(args[0])))
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    estimate_gradients(net, x, y, target, "local", space)
    J = len(net.blocks)
    reached = {"weight": range(J - 1), "activity": range(1 if target != "local" else J, J - 1)}
    assert [j for j in inputs if Dual in inputs[j]] == list(reached[space])


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("target", TARGETS)
def test_dual_passes_carry_only_the_directions_a_target_still_needs(target, space):
    """Into block j's dual pass come the directions whose target lies ahead: every earlier
    block's for a global target, block j−1's for "above" (its target is block j's aux loss),
    none for a local one; a direction is dropped once its target is met, so a local target's
    pass costs one direction per block, not j."""
    net, carried = small_net(), {}

    def record(j):
        def hook(module, args):
            if isinstance(args[0], Dual):
                carried[j] = tuple(args[0].directions or ())
        return hook

    for j, block in enumerate(net.blocks):
        block.register_forward_pre_hook(record(j))
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    estimate_gradients(net, x, y, target, "local", space)
    ahead = {"global": lambda j: tuple(range(j)), "above": lambda j: (j - 1,) if j else (),
             "local": lambda j: ()}[target]
    assert carried == {j: ahead(j) for j in carried}
    assert len(carried) == (len(net.blocks) - 1 if space == "weight" else
                            0 if target == "local" else len(net.blocks) - 2)


class _Counting(torch.nn.Module):
    """A layer whose forward writes a buffer of its own (a call counter)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize("momentum", [0.1, None])
def test_preserved_buffers_leave_every_buffer_and_the_output_as_training_gives_it(momentum):
    """Inside ``preserved_buffers`` a net in training computes what it computes outside (batch
    statistics), and afterwards every buffer, running statistics and others, is as before."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3, momentum=momentum),
                              _Counting(), torch.nn.BatchNorm2d(3).eval()).double()
    net[3].running_mean.uniform_()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with preserved_buffers(net):
        inside = net(x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[1].track_running_stats
    torch.testing.assert_close(inside, net(x), rtol=0, atol=0)


class _CountingNorm(torch.nn.BatchNorm1d):
    """A batch norm subclass with a buffer of its own, written by its forward."""

    def __init__(self, n):
        super().__init__(n)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += x.shape[0]
        return super().forward(x)


def test_preserved_buffers_restore_what_a_batch_norm_subclass_writes():
    """A batch norm whose forward is its own may write anything: every buffer of it is saved
    and put back (its running statistics included)."""
    norm = _CountingNorm(3).double()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with preserved_buffers(norm):
        norm(torch.randn(8, 3, dtype=torch.float64))
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("estimator", ["fg-random-weight", "fg-local-activity", "local"])
@pytest.mark.parametrize("labels,error", [
    (torch.tensor([0, 1, 2, 0]), "shape \\(5,\\)"),               # one label short
    (torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]), "int64 class indices"),  # floats
    ([0, 1, 2, 0, 1], "tensor of class indices"),                 # not a tensor
])
def test_bad_labels_raise_before_any_running_statistic_moves(estimator, labels, error):
    """Labels that do not fit the batch are refused before the first block runs (which would
    update its running statistics): the error names them, and every buffer is as before."""
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=error):
        if estimator == "local":
            local_gradients(net, x, labels)
        else:
            _, guess, space = estimator.split("-")
            estimate_gradients(net, x, labels, "global", guess, space,
                               generator=torch.Generator().manual_seed(0))
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device"))])
def test_ntk_guess_draws_from_the_generator_and_leaves_global_rng_alone(device):
    """The NTK guess re-initialises a copy of each head from the estimator's generator (on the
    net's device, as the trainer passes it): the same generator state gives the same estimate,
    and no global generator (CPU or CUDA) moves."""
    net = small_net().to(device)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, device=device)
    y = torch.tensor([0, 1, 2, 2, 1, 0], device=device)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if device == "cuda" else None
    runs = [estimate_gradients(copy.deepcopy(net), x, y, "global", "ntk", "weight",
                               generator=torch.Generator(device).manual_seed(3)).grads
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    # Bitwise on the CPU; a GPU's backward sums in no fixed order (atomics), so there the same
    # draws agree to float64's rounding, and other draws would differ in every digit.
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-10, atol=1e-12)
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, **tol, msg=name)
