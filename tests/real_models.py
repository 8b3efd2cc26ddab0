"""The real models the dual pass is checked on: every classification model of torchvision and a
set of timm's, each built untrained with 10 classes at a small input in float64, and compared
with torch.autograd.forward_ad (``fgkernels.testing.compare_with_forward_ad``). Used by
``tests/nn/test_real_models.py`` (a subset) and ``scripts/check_real_models.py`` (all of them)."""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

import fgkernels
from fgkernels.testing import compare_with_forward_ad

# timm's models, the smallest of each family the checks name: CNNs, vision transformers
# (global, windowed, hierarchical, with relative position biases), MLP mixers and hybrids.
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small",
        "regnetx_002", "convnext_atto", "densenet121", "dla34", "dpn48b", "hrnet_w18_small",
        "rexnet_100", "cspresnet50", "cs3darknet_s", "nf_regnet_b0", "repvgg_a0", "mixnet_s",
        "ghostnet_100", "fastvit_t8", "levit_128s", "vit_tiny_patch16_224",
        "deit_tiny_patch16_224", "efficientformer_l1", "efficientformerv2_s0", "poolformer_s12",
        "poolformerv2_s12", "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small",
        "caformer_s18", "convformer_s18", "eva02_tiny_patch14_224", "xcit_nano_12_p16_224",
        "pvt_v2_b0", "twins_pcpvt_small", "cait_xxs24_224", "coat_lite_tiny",
        "tnt_s_patch16_224", "volo_d1_224", "nest_tiny", "gcvit_xxtiny", "davit_tiny",
        "efficientvit_b0", "efficientvit_m0", "repvit_m1", "tiny_vit_5m_224",
        "inception_next_tiny", "hgnetv2_b0", "nfnet_l0", "res2net50_14w_8s", "skresnet18",
        "resnest14d", "selecsls42b", "ese_vovnet19b_dw", "swin_tiny_patch4_window7_224",
        "swinv2_cr_tiny_ns_224", "maxvit_nano_rw_256", "coatnet_nano_rw_224", "sequencer2d_s",
        "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "convit_tiny",
        "beit_base_patch16_224", "fastvit_sa12", "mambaout_femto", "rdnet_tiny", "starnet_s1",
        "vit_small_patch16_rope_224", "focalnet_tiny_srf", "hiera_tiny_224"]
# The input size of those that take no other (windows, partitions and attention biases laid
# out for 224 pixels, 256 for MaxViT's) or that are ill-conditioned at 64.
_TIMM_FIXED_SIZE = {"efficientformer_l1": 224, "efficientformerv2_s0": 224,
                    "coat_lite_tiny": 224, "gcvit_xxtiny": 224, "efficientvit_m0": 224,
                    "tiny_vit_5m_224": 224, "swin_tiny_patch4_window7_224": 224,
                    "swinv2_cr_tiny_ns_224": 224, "maxvit_nano_rw_256": 256,
                    "coatnet_nano_rw_224": 224, "hiera_tiny_224": 224,
                    # at 64 pixels its last train-mode batch norms normalise 2 values each (1×1
                    # maps of a batch of 2): forward_ad's own tangent moves by 4e-10 when the
                    # input moves by 1e-15
                    "selecsls42b": 96}
# Transformers built for a smaller image (their patch grids and position embeddings follow).
_TIMM_IMAGE_SIZE = {"eva02_tiny_patch14_224": 28, "volo_d1_224": 64, "nest_tiny": 64}
# A few of each library's that run in seconds: the CI subset.
QUICK = ["torchvision/resnet18", "torchvision/mobilenet_v3_small", "torchvision/efficientnet_b0",
         "torchvision/shufflenet_v2_x0_5", "torchvision/squeezenet1_1",
         "torchvision/regnet_y_400mf", "torchvision/googlenet", "torchvision/vit_b_32",
         "torchvision/swin_t", "timm/convnext_atto", "timm/vit_tiny_patch16_224",
         "timm/mobilenetv4_conv_small", "timm/levit_128s", "timm/ghostnet_100"]


def roi_align_in_torch_ops(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
                           aligned=False):
    """``torchvision.ops.roi_align`` computed by torchvision's own ``_roi_align``, written in
    torch ops, which forward_ad differentiates (it refuses torchvision's op): the oracle's
    roi_align (patched into ``torchvision.ops.poolers``)."""
    from torchvision.ops import poolers
    from torchvision.ops.roi_align import _roi_align

    rois = poolers.convert_boxes_to_roi_format(rois) if isinstance(rois, list) else rois
    return _roi_align(x, rois, spatial_scale, *output_size, sampling_ratio, aligned)


@dataclass
class RealModel:
    """A model to check: its builder and input size."""

    name: str
    build: Callable[[], torch.nn.Module]
    size: int


def _torchvision(name: str) -> RealModel:
    import torchvision
    kwargs, size = {}, 64
    if name.startswith("vit_"):
        size = 28 if name.endswith("_14") else 32
        kwargs["image_size"] = size
    elif name == "maxvit_t":
        size = 224  # its partitions of 7 need 224 pixels
    elif name == "inception_v3":
        kwargs, size = dict(aux_logits=False, init_weights=False), 96
    elif name == "googlenet":
        kwargs["init_weights"] = False
    return RealModel(f"torchvision/{name}", lambda: torchvision.models.get_model(
        name, weights=None, num_classes=10, **kwargs), size)


def _timm(name: str) -> RealModel:
    import timm
    size = 64
    kwargs = {}
    if name in _TIMM_FIXED_SIZE:
        size = _TIMM_FIXED_SIZE[name]
    elif name in _TIMM_IMAGE_SIZE:
        size = _TIMM_IMAGE_SIZE[name]
        kwargs = dict(img_size=size)
    elif name.startswith(("vit_", "deit_", "xcit_", "cait_", "tnt_", "mixer_", "resmlp_",
                          "gmlp_", "convit_", "beit_")):
        size, kwargs = 32, dict(img_size=32)
    elif name.startswith("levit"):
        size, kwargs = 64, dict(img_size=64)
    return RealModel(f"timm/{name}", lambda: timm.create_model(
        name, pretrained=False, num_classes=10, **kwargs), size)


class _ByKeyword(torch.nn.Module):
    """A model called with its inputs by keyword (``input_ids=``, ``pixel_values=``), as
    transformers' are, its tensor outputs returned as a tuple."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs)), return_dict=False)
        return tuple(o for o in out if isinstance(o, (torch.Tensor, fgkernels.Dual)))


def _tokens() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sequence
    return dict(input_ids=ids, attention_mask=mask)


def _pixels(size: int) -> Callable[[], dict]:
    return lambda: dict(pixel_values=torch.randn(2, 3, size, size, dtype=torch.float64))


def _seq2seq() -> dict:
    tokens = _tokens()
    return dict(**tokens, decoder_input_ids=tokens["input_ids"][:, :4])


# transformers' models in tiny configurations (random weights, nothing downloaded): the
# language models take token ids only, so their passes run inside ``fgkernels.dual_pass``.
_TEXT = dict(vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TRANSFORMERS: dict[str, tuple[str, dict, Callable[[], dict]]] = {
    "bert": ("BertModel", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37), _tokens),
    "gpt2": ("GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=16), _tokens),
    "llama": ("LlamaForCausalLM", dict(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=40, max_position_embeddings=32),
              _tokens),
    "t5": ("T5Model", dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                           decoder_start_token_id=0), _seq2seq),
    "bart": ("BartModel", dict(d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=37, decoder_ffn_dim=37,
                               max_position_embeddings=32, decoder_start_token_id=1), _seq2seq),
    "mamba": ("MambaModel", dict(hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                                 conv_kernel=3, use_cache=False),
              lambda: dict(input_ids=_tokens()["input_ids"])),
    # (its forward fills zero tensors from Duals, step by step)
    "rwkv": ("RwkvModel", dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                               intermediate_size=64, context_length=16, use_cache=False),
             lambda: dict(input_ids=_tokens()["input_ids"])),
    "vit": ("ViTModel", dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=37), _pixels(16)),
    "swin": ("SwinModel", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                               num_heads=[2, 2], window_size=4), _pixels(32)),
    "convnext": ("ConvNextModel", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
                 _pixels(32)),
    "wav2vec2": ("Wav2Vec2Model", dict(hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=37,
                                       conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                       num_conv_pos_embeddings=4,
                                       num_conv_pos_embedding_groups=2, mask_time_prob=0.0),
                 lambda: dict(input_values=torch.randn(2, 200, dtype=torch.float64))),
}


def check_transformers(name: str, training: bool) -> dict:
    """``check`` for one of ``TRANSFORMERS``: its dual pass (every parameter, and a floating
    input if any, carrying tangents) against forward_ad in float64."""
    import transformers
    cls, config, inputs = TRANSFORMERS[name]
    torch.manual_seed(0)
    config_cls = getattr(transformers, cls).config_class
    options = {**(_TEXT if "vocab_size" in config_cls().to_dict() else {}), **config}
    net = getattr(transformers, cls)(config_cls(**options)).double().train(training)
    given = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare_with_forward_ad(_ByKeyword(net, tuple(given)), list(given.values()),
                                       num_tangents=2)


def catalogue() -> dict[str, RealModel]:
    """Every model to check, by name (``library/model``)."""
    import torchvision
    models = [_torchvision(n) for n in torchvision.models.list_models(module=torchvision.models)]
    models += [_timm(n) for n in TIMM]
    return {m.name: m for m in models}


def check(model: RealModel, training: bool, convert: bool = True, batch: int = 2,
          compiled: bool = False, saved: bool = False) -> dict:
    """Compare one model's dual pass with forward_ad; the relative errors, the ops that took
    the fallback and the seconds it took. ``compiled``: the pass compiled by
    ``fgkernels.compile`` (the seconds include the compile), with the count of its graph
    breaks, against an oracle of hardsigmoid's exact slope (``oracle_mode``). ``saved``: the
    (converted) model saved whole by ``torch.save`` and loaded before the pass."""
    torch.manual_seed(0)
    net = model.build().double().train(training)
    if convert:
        fgkernels.convert(net)
    if saved:
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        net = torch.load(buffer, weights_only=False)
    x = torch.randn(batch, 3, model.size, model.size, dtype=torch.float64)
    start = time.perf_counter()
    breaks = sum(counters["graph_break"].values())
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if compiled:
            # Inductor draws random numbers (dropout's masks) its own way unless told to call
            # torch's random ops, as the oracle's eager pass does.
            stack.enter_context(torch._inductor.config.patch(fallback_random=True))
        result = compare_with_forward_ad(net, [x], run=fgkernels.compile(net) if compiled else None,
                                         exact_hardsigmoid=compiled)
    if compiled:
        result["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
    return {**result, "seconds": time.perf_counter() - start}
