"""Roofline of a ResNet-18 (CIFAR shapes) dual pass on an H100 or H200, per layer and in total.

    python benchmarks/roofline.py [--batch 256] [--device h100|h200] [--json]

For every convolution and every batch norm (+ReLU) of the network, one tangent on the input and
on every parameter: the FLOPs and the least HBM bytes of
  (a) fgkernels' fused dual pass: the dual convolution reads x, ẋ, W, Ẇ once and writes y, ẏ
      (batch-norm sums in its epilogue); the batch norm then updates y, ẏ in place;
  (b) forward_ad's composition: three convolutions and an add; batch norm as its statistics and
      normalisation passes and the elementwise ops of its JVP, ReLU and its mask;
  (c) a backprop step: forward, input-gradient and weight-gradient convolutions; batch norm and
      ReLU forward and backward.
Each op is counted as reading its operands and writing its result once (no cache reuse across
ops), which is the least traffic of that composition. The time each needs at the device's
peaks (``DEVICES``: H100 SXM dense bf16 989 TFLOP/s, TF32 495 TFLOP/s, 3.35 TB/s; H200 the same
arithmetic at 4.8 TB/s, of which a device-to-device copy measured about 4.3) is
max(FLOPs/peak, bytes/bandwidth); their ratios are the floors a measured run can be compared
with, and a measured time's share of the roofline time is its fraction of the peak.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

PEAK_FLOPS = {"bf16": 989e12, "tf32": 495e12}
ELEM_BYTES = {"bf16": 2, "tf32": 4}
HBM_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Peaks:
    """A device's dense matrix rates (FLOP/s, per precision) and memory bandwidth (bytes/s)."""

    flops: dict
    bytes_per_s: float


# The vendors' datasheet figures; "h200-measured" takes the copy bandwidth measured on one
# (4.3 TB/s counting bytes read and written), the ceiling a kernel can reach in practice.
DEVICES = {"h100": Peaks(PEAK_FLOPS, HBM_BYTES_PER_S),
           "h200": Peaks({"bf16": 990e12, "tf32": 495e12}, 4.8e12),
           "h200-measured": Peaks({"bf16": 990e12, "tf32": 495e12}, 4.3e12)}
# Bytes per activation element of a batch norm (+ReLU), in units of the activation's size.
BN_TRAFFIC = {"dual": 4,          # read y, ẏ; write y, ẏ (in place; sums from the epilogue)
              "forward_ad": 14,   # stats 1, normalise 2; JVP 6 (mean ẋ, mean x̂ẋ, combine); ReLU 2,
                                  # its mask on ẏ 3
              "backprop": 13}     # forward: stats 1, normalise 2, ReLU 2; backward: ReLU 3, BN 5
BN_FLOPS_PER_ELEM = {"dual": 8, "forward_ad": 12, "backprop": 14}


@dataclass
class Layer:
    name: str
    flops: dict      # per composition
    bytes: dict      # per composition and precision


def resnet18_convs(batch: int):
    """(name, C_in, C_out, kernel, stride, input H=W) of ResNet-18's CIFAR convolutions."""
    convs = [("stem", 3, 64, 3, 1, 32)]
    cin, size = 64, 32
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            convs.append((f"s{stage}b{block}c1", cin, cout, 3, stride, size))
            if stride == 2 or cin != cout:
                convs.append((f"s{stage}b{block}down", cin, cout, 1, stride, size))
            size //= stride
            convs.append((f"s{stage}b{block}c2", cout, cout, 3, 1, size))
            cin = cout
    return convs


def conv_layer(batch, name, cin, cout, k, stride, size) -> list[Layer]:
    """The convolution and the batch norm after it."""
    out = size // stride
    x, w, y = batch * cin * size * size, cout * cin * k * k, batch * cout * out * out
    primal = 2 * batch * out * out * cout * cin * k * k
    conv_bytes = {"dual": 2 * x + 2 * w + 2 * y, "forward_ad": 3 * x + 3 * w + 6 * y,
                  "backprop": 3 * x + 3 * w + 3 * y}
    conv = Layer(name, {c: 3 * primal for c in conv_bytes},
                 {c: {p: n * ELEM_BYTES[p] for p in ELEM_BYTES} for c, n in conv_bytes.items()})
    bn = Layer(f"{name}.bn", {c: BN_FLOPS_PER_ELEM[c] * y for c in BN_TRAFFIC},
               {c: {p: n * y * ELEM_BYTES[p] for p in ELEM_BYTES} for c, n in BN_TRAFFIC.items()})
    return [conv, bn]


def seconds(layer: Layer, composition: str, precision: str,
            peaks: Peaks = DEVICES["h100"]) -> float:
    """The layer's roofline time: compute- or bandwidth-bound, whichever is slower."""
    return max(layer.flops[composition] / peaks.flops[precision],
               layer.bytes[composition][precision] / peaks.bytes_per_s)


def conv_seconds(batch: int, cin: int, cout: int, k: int, stride: int, size: int,
                 composition: str, precision: str, with_bn: bool = False,
                 device: str = "h200-measured") -> float:
    """The roofline time of one convolution (and the batch norm after it) of the dual pass
    (``"dual"``), of forward_ad's composition or of a backprop step, on ``device``."""
    layers = conv_layer(batch, "conv", cin, cout, k, stride, size)
    return sum(seconds(layer, composition, precision, DEVICES[device])
               for layer in (layers if with_bn else layers[:1]))


def bn_seconds(batch: int, channels: int, size: int, composition: str, precision: str,
               device: str = "h200-measured") -> float:
    """The roofline time of one batch norm (+ReLU) of ``channels`` × ``size``² activations."""
    return seconds(conv_layer(batch, "bn", channels, channels, 1, 1, size)[1], composition,
                   precision, DEVICES[device])


def roofline(batch: int, device: str = "h100") -> dict:
    peaks = DEVICES[device]
    layers = [part for conv in resnet18_convs(batch) for part in conv_layer(batch, *conv)]
    total = {p: {c: sum(seconds(layer, c, p, peaks) for layer in layers) for c in BN_TRAFFIC}
             for p in PEAK_FLOPS}
    floors = {p: {"dual / forward_ad": t["dual"] / t["forward_ad"],
                  "dual / backprop": t["dual"] / t["backprop"]} for p, t in total.items()}
    return {"batch": batch, "device": device, "layers": [asdict(layer) for layer in layers],
            "total_seconds": total, "floor_ratios": floors}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = roofline(args.batch, args.device)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    peaks = DEVICES[args.device]
    print(f"ResNet-18 (CIFAR), batch {args.batch}, one tangent; {args.device} roofline times (ms)")
    print("| layer | dual bf16 | forward_ad bf16 | backprop bf16 | dual tf32 | forward_ad tf32 "
          "| backprop tf32 |\n|---|---|---|---|---|---|---|")
    for layer in (Layer(**d) for d in r["layers"]):
        cells = [f"{seconds(layer, c, p, peaks) * 1e3:.3f}" for p in ("bf16", "tf32")
                 for c in ("dual", "forward_ad", "backprop")]
        print(f"| {layer.name} | " + " | ".join(cells) + " |")
    for p, t in r["total_seconds"].items():
        ratios = r["floor_ratios"][p]
        print(f"{p}: dual {t['dual'] * 1e3:.2f} ms, forward_ad {t['forward_ad'] * 1e3:.2f} ms, "
              f"backprop {t['backprop'] * 1e3:.2f} ms; floors dual/forward_ad "
              f"{ratios['dual / forward_ad']:.2f}, dual/backprop {ratios['dual / backprop']:.2f}")


if __name__ == "__main__":
    main()
