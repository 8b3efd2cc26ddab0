"""The roofline model's arithmetic: counts that can be checked by hand."""
from roofline import conv_layer, resnet18_convs, roofline, seconds


def test_resnet18_flops_and_shapes():
    convs = resnet18_convs(1)
    assert len(convs) == 1 + 16 + 3  # stem, two per block, three projections
    primal = sum(conv_layer(1, *c)[0].flops["dual"] / 3 for c in convs)
    assert abs(primal / 2 - 0.556e9) / 0.556e9 < 0.01  # ResNet-18 (CIFAR): 0.556 GMACs


def test_fused_pass_moves_the_fewest_bytes_and_floors_are_ratios():
    r = roofline(256)
    for layer in r["layers"]:
        for p in ("bf16", "tf32"):
            assert layer["bytes"]["dual"][p] < layer["bytes"]["forward_ad"][p]
            assert layer["bytes"]["dual"][p] <= layer["bytes"]["backprop"][p]
    for ratios in r["floor_ratios"].values():
        assert all(0 < v <= 1 for v in ratios.values())


def test_time_is_the_slower_of_compute_and_bandwidth():
    conv, bn = conv_layer(256, "c", 512, 512, 3, 1, 4)
    assert seconds(conv, "dual", "bf16") == conv.flops["dual"] / 989e12  # compute-bound
    assert seconds(bn, "dual", "bf16") == bn.bytes["dual"]["bf16"] / 3.35e12  # bandwidth-bound
