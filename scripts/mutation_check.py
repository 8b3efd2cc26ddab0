"""Does the test suite notice wrong code? Each mutant below changes the package in one place as
a plausible bug would (a sign, a dropped term, a kink or a tie taken on the other side, a
check left out) and names the tests that must then fail. The script applies each mutant to a
copy of the checkout (the checkout itself is never written), runs those tests there, and
reports the mutant killed (a test failed) or survived; it exits 1 if any survived.

    python scripts/mutation_check.py [--native] [--only NAME ...] [--list]

The unmutated copy runs every selected test file first: a mutant counts as killed only
against a suite that passes without it. ``--native`` adds the mutants of the C++ kernels, each
rebuilding the extension in the copy (the checkout's build folder is copied along for them, so
only the mutated file compiles again). Run it from the checkout's environment after
``scripts/setup.sh`` (the copy takes the checkout's built extension).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

OPS = ("tests/rules/test_ops.py", "tests/rules/test_properties.py",
       "tests/rules/test_functional.py")
ESTIMATORS = ("tests/train/test_estimators.py",)
IN_PLACE = ("tests/train/test_estimators.py::test_estimate_equals_autograd_projection",)
SHARED = ("tests/train/test_estimators.py::test_a_parameter_of_two_blocks_or_heads_is_refused_"
          "by_name",)
LEAN = ("tests/train/test_lean_autograd.py",)
REUSE = ("tests/nn/test_reuse.py", "tests/train/test_estimators.py")
SEMANTICS = ("tests/dual/test_dual_semantics.py",)
TRAINER = ("tests/train/test_train.py",)
STORE = ("tests/dual/test_tangent_store.py", "tests/nn/test_modules.py")
TRITON = ("tests/backends/test_triton.py",)
HOSTILE = ("tests/rules/test_hostile_inputs.py",)
COMPILE = "tests/nn/test_compile.py::"  # + a test's name
COMPILED_TEMPORARY = (COMPILE + "test_a_temporary_filled_from_duals_becomes_a_dual_in_a_"
                                "compiled_pass",)
TRITON_BN = "fgkernels/backends/triton/batch_norm.py"
BN_PER_CHANNEL = "csrc/bn_per_channel.h"
POINTWISE = "fgkernels/rules/pointwise.py"
LAYERS = "fgkernels/rules/layers.py"
PACKED = ("tests/rules/test_properties.py::test_packed_recurrent_layers",
          "tests/rules/test_layer_configs.py::test_packing_moves_every_slot_as_the_primal")
CELLS = ("tests/rules/test_properties.py::test_recurrent_layers",
         "tests/rules/test_properties.py::test_recurrent_directions_enter_part_way",
         "tests/rules/test_layer_configs.py")
RANGE = ("tests/rules/test_hostile_inputs.py::test_tangent_formulas_keep_in_range_where_the_"
         "derivative_does",)
CANCELLATION = ("tests/dual/test_mixed_precision.py::test_a_coefficient_near_cancellation_is_"
                "formed_before_it_is_rounded",)
PAD_SEQUENCE = ("tests/rules/test_layer_configs.py::test_pad_sequence_pads_every_slot_as_the_"
                "primal",)
INDEXING = ("tests/dual/test_dual_semantics.py::test_getitem_follows_the_primal",
            "tests/dual/test_dual_semantics.py::test_setitem_follows_the_primal")
EDGES = ("tests/dual/test_dual_semantics.py::test_op_edge_cases_as_forward_ad",)
IN_PLACE_COPY = ("tests/dual/test_dual_semantics.py::test_an_in_place_write_without_out_of_"
                 "place_form_acts_as_forward_ad",)
UNDEFINED_TANGENT = ("tests/dual/test_dual_semantics.py::test_an_output_forward_ad_leaves_"
                     "without_tangent_is_refused_where_differentiable",)
DUAL_MASKS = ("tests/rules/test_layer_configs.py::test_attention_takes_masks_with_tangents",
              "tests/rules/test_layer_configs.py::test_attention_mask_from_input_tangent_alone",
              "tests/rules/test_layer_configs.py::test_attention_with_a_dual_mask_alone",
              "tests/rules/test_properties.py::test_models_reading_parameters_every_way",
              "tests/rules/test_layer_configs.py::test_attention_with_a_dual_mask_takes_every_"
              "form")
TRANSFORMER_MASKS = (
    "tests/rules/test_layer_configs.py::test_transformer_layers_take_masks_with_tangents",
    "tests/rules/test_layer_configs.py::test_a_converted_encoder_takes_a_dual_mask_as_the_passs_"
    "root",
    "tests/rules/test_properties.py::test_transformer_encoders_with_learned_masks",
    "tests/rules/test_layer_configs.py::test_a_causal_mask_with_a_tangent_is_dropped_as_torch_"
    "drops_it")
TINY_MAP = ("tests/backends/test_native.py::test_conv_onto_a_tiny_map",
            "tests/backends/test_native.py::test_a_biased_conv_onto_a_tiny_map",
            "tests/backends/test_native.py::test_a_channels_last_gemm_reads_a_sliced_input_"
            "where_it_lies")
# a parameter of a class of its own, which is not lifted, in a module's container
OWN_CLASS = ("tests/dual/test_tangent_store.py::test_a_parameter_of_its_own_class_in_a_container_"
             "carries_its_tangent",)
PROMOTION = ("tests/dual/test_mixed_precision.py::test_a_tangent_of_its_primal_s_dtype_follows_"
             "the_primal_s_promotion",
             "tests/rules/test_properties.py::test_arithmetic_across_dtypes")
ORACLE_PACKING = ("tests/test_testing.py::test_the_oracle_differentiates_packing",)
LOSS_DTYPES = ("tests/dual/test_mixed_precision.py::test_a_loss_against_a_wider_target_has_"
               "forward_ad_s_dtypes",)
HARDTANH_16 = ("tests/dual/test_mixed_precision.py::test_hardtanh_of_a_16_bit_primal_compares_"
               "with_the_bounds_unrounded",)
CHANNELS_LAST = ("tests/dual/test_channels_last.py",)
FAR_FROM_ZERO = ("tests/dual/test_mixed_precision.py::test_a_norm_of_an_input_and_tangent_far_"
                 "from_zero", "tests/dual/test_mixed_precision.py::test_a_softmax_of_an_input_"
                 "and_tangent_far_from_zero")
TRITON_STATS = ("tests/backends/test_triton.py::test_bn_sums_of_a_channel_far_from_zero_keep_"
                "float32_s_precision",)
COMPLEX = ("tests/dual/test_dual_semantics.py::test_complex_results_keep_complex_tangents",)
BF16_ROUNDING = ("tests/backends/test_native.py::test_layer_norm_rounds_to_bfloat16_as_torch_does",)
COMPUTED_APART = (COMPILE + "test_weights_computed_apart_from_the_mode_keep_their_tangents_"
                  "compiled",)
NATIVE = ("tests/rules/test_ops.py", "tests/backends/test_native.py",
          "tests/rules/test_layer_configs.py", "tests/rules/test_properties.py")


class Mutant(NamedTuple):
    name: str
    path: str           # relative to the checkout
    old: str            # found exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files or single tests (path::test_name)
    needs_amx: bool = False  # the code runs only on a CPU with AMX (the tiny-map GEMM)

    @property
    def native(self) -> bool:
        return self.path.startswith("csrc/")


MUTANTS = [
    # the local passes' lean autograd
    Mutant("lean batch-norm backward flips the covariance term", "fgkernels/train/lean_autograd.py",
           "k = -a * r * r * g_cov", "k = a * r * r * g_cov", LEAN),
    Mutant("a ReLU output modified in place is recomputed all the same",
           "fgkernels/train/lean_autograd.py",
           "return known[0] if known is not None and known[1] == t._version else t",
           "return known[0] if known is not None else t", LEAN),
    Mutant("lean batch-norm backward gives no bias gradient without a weight",
           "fgkernels/train/lean_autograd.py",
           "grad_bias = g_mean * count if output_mask[2] else None",
           "grad_bias = g_mean * count if output_mask[2] and weight is not None else None", LEAN),
    Mutant("a recipe checks its input's version only", "fgkernels/train/lean_autograd.py",
           "if _versions(self.input, self.weight, self.bias) != self.versions:",
           "if _versions(self.input) != self.versions[:1]:", LEAN),
    Mutant("the forward's notes outlive it", "fgkernels/train/lean_autograd.py",
           "        follow.batch_norms.clear()\n", "", LEAN),
    Mutant("an in-place ReLU's version taken before its bump", "fgkernels/train/lean_autograd.py",
           "bump = 1 if func is aten.relu_.default else 0", "bump = 0", LEAN),
    Mutant("a reduced weight's convolution differentiated in full",
           "fgkernels/train/lean_autograd.py",
           "if self._reduced and self._is_reduced(args[2]):", "if False:", LEAN),
    Mutant("a reduced weight recognised as the very tensor object only",
           "fgkernels/train/lean_autograd.py",
           "return known is not None and weight.is_set_to(known)", "return known is weight",
           LEAN),
    # the rules of fgkernels.rules
    Mutant("a narrower tangent's activation product is written out= while compiling",
           POINTWISE, "        if torch.compiler.is_dynamo_compiling() or (",
           "        if False or (",
           ("tests/nn/test_compile.py::test_activation_layers_compile_in_one_graph",)),
    Mutant("sub drops alpha", "fgkernels/rules/pointwise.py",
           "(lambda t: t) if alpha == 1 else (lambda t: t * alpha)", "(lambda t: t)", OPS),
    Mutant("mul scales the other tangent by the wrong factor", "fgkernels/rules/pointwise.py",
           "(bo, bt, lambda t: _like(a, t) * t)", "(bo, bt, lambda t: _like(b, t) * t)", OPS),
    Mutant("a number bound's tie taken as outside the bounds", "fgkernels/rules/pointwise.py",
           "inside &= x >= min if not _CLAMP_TIES_SHARED else x > min", "inside &= x > min", OPS),
    Mutant("pow keeps the base's term where the exponent is 0", "fgkernels/rules/pointwise.py",
           "return _real_if(a, torch.where(b == 0, 0, t * _like(b * torch.pow(a, b - 1), t)))",
           "return _real_if(a, t * _like(b * torch.pow(a, b - 1), t))", OPS),
    Mutant("pow keeps y·ln(a) at a zero base", "fgkernels/rules/pointwise.py",
           "factor = torch.where(at_least_0 & (a == 0), 0, y * torch.log(a.to(y.dtype)))",
           "factor = y * torch.log(a.to(y.dtype))", OPS),
    Mutant("rsqrt's slope of the wrong sign", "fgkernels/rules/pointwise.py",
           "lambda t, x: -0.5 * t * _like(y, t).pow(3)",
           "lambda t, x: 0.5 * t * _like(y, t).pow(3)", OPS),
    Mutant("conv1d pads the height of its image, not the length", "fgkernels/rules/layers.py",
           "pad = padding if isinstance(padding, str) else (0, *_single(padding))",
           "pad = padding if isinstance(padding, str) else (*_single(padding), 0)", OPS),
    Mutant("vdot's tangent leaves ȧ unconjugated", "fgkernels/rules/products.py",
           "return stack.conj() @ f[1] if i == 0 else stack @ f[0].conj()",
           "return stack @ f[1] if i == 0 else stack @ f[0].conj()", SEMANTICS),
    Mutant("outer's second term as the first operand's", "fgkernels/rules/products.py",
           "f[0].unsqueeze(-1) * stack.unsqueeze(-2)", "stack.unsqueeze(-1) * f[1]", OPS),
    Mutant("cumsum's dim taken on the stack unshifted (a sum over slots)",
           "fgkernels/rules/pointwise.py", "return t.cumsum(_slot_dim(dim, n), dtype=dtype)",
           "return t.cumsum(dim, dtype=dtype)", OPS),
    Mutant("repeat_interleave's dim taken on the stack unshifted", "fgkernels/rules/pointwise.py",
           "return t.repeat_interleave(repeats, _slot_dim(dim, n), output_size=output_size)",
           "return t.repeat_interleave(repeats, dim, output_size=output_size)", OPS),
    Mutant("cos's slope of the wrong sign", "fgkernels/rules/pointwise.py",
           "lambda t, x: -t * _like(x.sin(), t)", "lambda t, x: t * _like(x.sin(), t)", OPS),
    Mutant("a chunked linear_cross_entropy is differentiated chunked",
           "fgkernels/rules/losses.py", "label_smoothing=label_smoothing, options=None))",
           "label_smoothing=label_smoothing, options=options))",
           ("tests/rules/test_functional.py::test_chunked_linear_cross_entropy_matches_forward_"
            "ad_of_its_reference_form",)),
    Mutant("a loss's mean taken as its sum", "fgkernels/rules/losses.py",
           'return out.mean() if reduction == "mean" else out.sum() if reduction == "sum" else out',
           'return out.sum() if reduction in ("mean", "sum") else out', OPS),
    Mutant("binary cross-entropy's positive weight left out of the logits' slope",
           "fgkernels/rules/losses.py",
           "slope_x = w * ((1 + (p - 1) * yp) * torch.sigmoid(xp) - p * yp)",
           "slope_x = w * (torch.sigmoid(xp) - yp)", OPS),
    Mutant("binary cross-entropy's soft target given no tangent", "fgkernels/rules/losses.py",
           "slope_y = None if y.tangents is None else w * ((p - 1)",
           "slope_y = None if y.tangents is None else 0 * w * ((p - 1)", OPS),
    Mutant("a convolution's bias tangent placed as if the input were batched",
           "fgkernels/rules/convolutions.py", "lead = x.dim() - spatial_dims - 1", "lead = 1", OPS),
    Mutant("a convolution's input term computed without its options",
           "fgkernels/rules/convolutions.py", "op(s, w, None, *args, **kwargs)", "op(s, w, None)",
           OPS),
    Mutant("instance norm's tangent from one group of all channels", "fgkernels/rules/norms.py",
           "d = group_norm(x, x.shape[1], weight, bias, eps)",
           "d = group_norm(x, 1, weight, bias, eps)", OPS),
    Mutant("group norm's channels_last groups in contiguous order", "fgkernels/rules/norms.py",
           "    if fmt == torch.channels_last:\n        def grouped",
           "    if False:\n        def grouped",
           ("tests/dual/test_channels_last.py::test_group_norm_of_channels_last_makes_no_copy",)),
    Mutant("group norm's channels_last statistics over each pixel's channels only",
           "fgkernels/rules/norms.py", "dims, stat_shape = [1, 3], (n, 1, num_groups, 1)",
           "dims, stat_shape = [3], (n, 1, num_groups, 1)",
           ("tests/dual/test_channels_last.py::test_group_norm_of_channels_last_makes_no_copy",)),
    Mutant("the KL divergence's target slope without its 1", "fgkernels/rules/losses.py",
           "torch.xlogy(yp != 0, yp) + yp / yp - xp", "torch.xlogy(yp != 0, yp) - xp", OPS),
    Mutant("the KL divergence's batch mean over every element", "fgkernels/rules/losses.py",
           "out = out.sum() / xp.shape[0]", "out = out.mean()", OPS),
    Mutant("cosine similarity's norms taken before the operands are broadcast",
           "fgkernels/rules/norms.py", "            .expand(shape) for v in (a, b))",
           "            for v in (a, b))", OPS),
    Mutant("log-sigmoid's slope taken at -x", "fgkernels/rules/pointwise.py",
           "_aten.log_sigmoid_backward(t, x, buffer)", "_aten.log_sigmoid_backward(t, -x, buffer)",
           OPS),
    Mutant("GLU's gate term without the output's factor", "fgkernels/rules/pointwise.py",
           "tb * _like(y * (1 - s), t)", "tb * _like(1 - s, t)", OPS),
    Mutant("clamp_min's tie taken by the bound before torch 2.14", "fgkernels/rules/pointwise.py",
           "to_x = x >= lo if x_takes_ties else x > lo", "to_x = x > lo", OPS),
    Mutant("a selection's tangents picked at the wrong indices", "fgkernels/rules/reductions.py",
           "picked = t.gather(at, index.expand(t.shape[0], *index.shape))",
           "picked = t.gather(at, index.flip(-1).expand(t.shape[0], *index.shape))", OPS),
    Mutant("lerp's weight term taken from the wrong end", POINTWISE,
           "(wo, wt, lambda t: t * _like(e - a, t))", "(wo, wt, lambda t: t * _like(a - e, t))",
           OPS),
    Mutant("addcdiv's divisor term not squared", POINTWISE,
           "-(t * _like(b / c, t)) / _like(c, t)", "-(t * _like(b / c, t))", OPS),
    Mutant("addcdiv's divisor squared before it divides", POINTWISE,
           "-(t * _like(b / c, t)) / _like(c, t)", "-(t * _like(b, t)) / _like(c * c, t)", RANGE),
    Mutant("softsign's denominator squared before it divides", POINTWISE,
           "t / _like(den, t) / _like(den, t)", "t / _like(den * den, t)", RANGE),
    Mutant("lerp's 1 - w taken after w is rounded to the tangents' dtype", POINTWISE,
           "[(ao, at, lambda t: t * _like(1 - w, t))", "[(ao, at, lambda t: t * (1 - _like(w, t)))",
           CANCELLATION),
    Mutant("atan2's second operand term of the wrong sign", POINTWISE,
           "t * _like(-a / den, t)", "t * _like(a / den, t)", OPS),
    Mutant("atan2's coefficients through 1/(a² + b²)", POINTWISE,
           "t * _like(b / den, t)", "t * _like(b * den.reciprocal(), t)", RANGE),
    Mutant("a number base's ln taken in the result's dtype", POINTWISE,
           "else math.log(a) if a > 0 else math.nan)",
           "else torch.full((), a, dtype=y.dtype, device=y.device).log())", RANGE),
    Mutant("nan_to_num keeps the tangent of a replaced value", POINTWISE,
           "lambda t, x: t * torch.isfinite(x)", "lambda t, x: t", OPS),
    Mutant("tanhshrink's slope not squared", POINTWISE,
           "lambda t, x: t * _like(th * th, t)", "lambda t, x: t * _like(th, t)", OPS),
    Mutant("GRU update gate mixes the wrong way", "fgkernels/rules/recurrent.py",
           "h_new = n + z * (sp - n)", "h_new = n + z * (n - sp)", CELLS),
    Mutant("GRU cell's reset gate not applied to the hidden candidate's slots",
           "fgkernels/rules/recurrent.py", "like(r) * htn", "htn", CELLS),
    Mutant("GRU cell's update term of the wrong sign", "fgkernels/rules/recurrent.py",
           "zt * like(sp - n)", "zt * like(n - sp)", CELLS),
    Mutant("GRU cell's reset tangent dropped", "fgkernels/rules/recurrent.py",
           "itn + rt * like(hn)", "itn + 0 * rt * like(hn)", CELLS),
    Mutant("GRU cell's state tangent carried past the update gate", "fgkernels/rules/recurrent.py",
           "like(z) * st", "st", CELLS),
    Mutant("GRU cell's candidate tangent carried past the update gate",
           "fgkernels/rules/recurrent.py", "like(1 - z) * nt", "nt", CELLS),
    Mutant("GRU cell's 1 - z taken after z is rounded to the tangents' dtype",
           "fgkernels/rules/recurrent.py", "like(1 - z) * nt", "(1 - like(z)) * nt",
           CANCELLATION),
    Mutant("reverse direction reads the sequence forwards", "fgkernels/rules/recurrent.py",
           "range(x.shape[0] - 1, -1, -1) if reverse", "range(x.shape[0]) if reverse", OPS),
    Mutant("recurrent dropout also on the last layer", "fgkernels/rules/recurrent.py",
           "layer < num_layers - 1:", "layer < num_layers:",
           ("tests/rules/test_layer_configs.py",)),
    Mutant("packed layer's final states in the wrong order", "fgkernels/rules/recurrent.py",
           "torch.cat([h, *reversed(done_h)])", "torch.cat([h, *done_h])", PACKED),
    Mutant("packed reverse direction starts a sequence from another's state",
           "fgkernels/rules/recurrent.py", "h = torch.cat([h, h0[h.shape[0]:n]])",
           "h = torch.cat([h, h0[:n - h.shape[0]]])", PACKED),
    Mutant("padding a packed sequence pads its tangent with the padding value",
           "fgkernels/rules/recurrent.py", "batch_sizes, batch_first, 0.0,",
           "batch_sizes, batch_first, padding_value,", PACKED),
    Mutant("LSTM cell's forget-gate term without the cell state", "fgkernels/rules/recurrent.py",
           "ft * d_sigmoid(cp, sf)", "ft * d_sigmoid(torch.ones_like(cp), sf)", CELLS),
    Mutant("LSTM cell's state carried through the input gate", "fgkernels/rules/recurrent.py",
           "_slots.cast(ct, dtype) * like(sf)", "_slots.cast(ct, dtype) * like(si)", CELLS),
    Mutant("LSTM cell's candidate slope a sigmoid's", "fgkernels/rules/recurrent.py",
           "gtt * d_tanh(si, tg)", "gtt * d_sigmoid(si, tg)", CELLS),
    Mutant("LSTM cell's output slope through tanh(c') a sigmoid's",
           "fgkernels/rules/recurrent.py", "ct_new * d_tanh(so, tc)", "ct_new * d_sigmoid(so, tc)",
           CELLS),
    Mutant("LSTM cell's output-gate term in the first slots, not the gates'",
           "fgkernels/rules/recurrent.py", "_slots.add_into_slots(ht_new, g_pos, o_term)",
           "ht_new[:len(g_pos)].add_(o_term)", CELLS),
    Mutant("LSTM projection skipped", "fgkernels/rules/recurrent.py",
           "w_hr = weights[4 if has_biases else 2] if len(weights) in (3, 5) else None",
           "w_hr = None", OPS),
    Mutant("torch.compile traces into what should run eagerly", "fgkernels/dual/dynamo.py",
           "target.__setitem__(0, torch.compiler.disable(fn))", "target.__setitem__(0, fn)",
           ("tests/nn/test_compile.py::test_a_packed_recurrent_model_compiles_around_its_packing",)),
    Mutant("the oracle's packing drops the tangent", "fgkernels/testing.py",
           "input_t, ctx.lengths, ctx.batch_first)[0], None",
           "input_t, ctx.lengths, ctx.batch_first)[0] * 0, None", ORACLE_PACKING),
    Mutant("the oracle pads a packed tangent with ones", "fgkernels/testing.py",
           "ctx.batch_first, 0.0,\n", "ctx.batch_first, 1.0,\n", ORACLE_PACKING),
    Mutant("pad_sequence pads the tangents with the padding value", "fgkernels/rules/recurrent.py",
           "(stacks, batch_first, 0.0, padding_side)",
           "(stacks, batch_first, padding_value, padding_side)", PAD_SEQUENCE),
    Mutant("pad_sequence takes a sequence's slots for all slots", "fgkernels/rules/recurrent.py",
           "_slots.spread(d.tangents, pos, plan.count, d.primal, plan.dtype)",
           "_slots.spread(d.tangents, tuple(range(plan.count)), plan.count, d.primal, "
           "plan.dtype)", PAD_SEQUENCE),
    Mutant("a recurrent layer keeps the pass's Duals in its weight list",
           "fgkernels/dual/tangents.py", "and not issubclass(cls, nn.RNNBase)", "and True",
           ("tests/dual/test_tangent_store.py::test_a_recurrent_layer_lists_its_parameters_"
            "again_after_the_pass",)),
    Mutant("F.l1_loss's weight left where torch drops it", "fgkernels/rules/losses.py",
           "    if weight is None:\n        weight = _l1_loss_weight()\n", "",
           ("tests/rules/test_hostile_inputs.py::test_weighted_regression_losses_match_forward_"
            "ad",)),
    Mutant("var's tangent scaled after its sum", "fgkernels/rules/reductions.py",
           ".conj() * (2.0 / (n - correction))\n"
           "    yt = (t * _like(coefficient, t)).sum(_slot_dims(dims, x.dim()), keepdim)\n"
           "    if yt.is_complex():\n        yt = yt.real\n"
           "    return yt.reshape(",
           ".conj()\n"
           "    yt = (t * _like(coefficient, t)).sum(_slot_dims(dims, x.dim()), keepdim)\n"
           "    if yt.is_complex():\n        yt = yt.real\n"
           "    return (yt * (2.0 / (n - correction))).reshape(",
           ("tests/rules/test_hostile_inputs.py::test_a_float16_spread_scales_its_terms_before_"
            "it_sums_them",)),
    Mutant("a norm's tangent in its parameters' wider dtype", "fgkernels/rules/norms.py",
           "    dtype = plan.dtype_for(y.dtype)\n", "    dtype = plan.dtype\n",
           ("tests/dual/test_mixed_precision.py::test_a_norm_of_a_bfloat16_input_with_float32_"
            "parameters_is_bfloat16",)),
    Mutant("a list index read as one list of integers", "fgkernels/rules/indexing.py",
           "        return tuple(index)\n", "        return index\n", INDEXING),
    Mutant("indexing asks Dynamo hasattr of a slice", "fgkernels/rules/indexing.py",
           "    if i is None or i is Ellipsis or isinstance(i, (int, slice, torch.SymInt)):\n",
           "    if False:\n",
           (COMPILE + "test_op_table_under_fgkernels_compile[recurrent_layers]",
            COMPILE + "test_op_table_under_fgkernels_compile[selecting_pools]")),
    Mutant("a NumPy array index read as basic", "fgkernels/rules/indexing.py",
           '    return hasattr(i, "__len__") and not isinstance(i, str)  # a NumPy array',
           "    return False  # a NumPy array", INDEXING),
    Mutant("a max pool's one-element size lists passed on as they are", LAYERS,
           "            return v * 2 if len(v) == 1 else v", "            return v", EDGES),
    Mutant("conv1d's geometry taken only as Python ints", LAYERS,
           "        return operator.index(v)\n", "        return v\n", EDGES),
    Mutant("batch norm takes one running statistic", "fgkernels/backends/contracts.py",
           "    if (bn.running_mean is None) != (bn.running_var is None):\n", "    if False:\n",
           ("tests/rules/test_hostile_inputs.py::test_bad_input_gets_an_error_naming_it",)),
    Mutant("a pool's form with indices returns the values alone", LAYERS,
           "return (out, index) if return_indices or pair else out",
           "return (out, index) if return_indices else out", EDGES),
    Mutant("cat joins the slots of a legacy empty operand", LAYERS,
           'legacy = [op == "cat" and d.primal.shape == (0,) and y.dim() != 1 for d in duals]',
           "legacy = [False for d in duals]", EDGES),
    Mutant("a Dual's view reshapes", "fgkernels/dual/value.py",
           "return Dual.__torch_function__(torch.Tensor.view, (Dual,), (self, *shape), size)",
           "return Dual.__torch_function__(torch.Tensor.reshape, (Dual,), (self, *shape), size)",
           ("tests/dual/test_dual_semantics.py::test_view_refuses_what_torch_refuses_and_writes_"
            "through_what_it_takes",)),
    Mutant("antialiased bfloat16 tangents resampled as they are on the CPU", LAYERS,
           '    if antialias and narrow and d.primal.device.type == "cpu":\n',
           "    if False:\n",
           ("tests/dual/test_mixed_precision.py::test_antialiased_resampling_of_bfloat16_"
            "tangents_on_the_cpu",)),
    Mutant("causal attention keeps the mask torch drops", "fgkernels/rules/attention.py",
           "    causal = is_causal and key_padding_mask is None and not need_weights\n",
           "    causal = False\n",
           ("tests/rules/test_layer_configs.py::test_causal_attention_takes_torchs_mask",)),
    Mutant("einsum's output sublist ignored", "fgkernels/rules/products.py",
           "    if len(args) % 2:\n        equation +=", "    if False:\n        equation +=",
           EDGES),
    Mutant("multi-head attention drops a mask's recorded tangent", "fgkernels/rules/attention.py",
           "    key_padding_mask, attn_mask = map(with_recorded_tangent, (key_padding_mask, "
           "attn_mask))\n", "", DUAL_MASKS),
    Mutant("a Dual mask's attention takes batch-first inputs as sequence-first",
           "fgkernels/nn/modules.py",
           "        if self.batch_first and batched:  # the rule takes sequence-first inputs\n",
           "        if False:\n", DUAL_MASKS),
    Mutant("a full pass leaves nn.MultiheadAttention its own class", "fgkernels/dual/tangents.py",
           "        pass_class = _pass_class(type(m))\n", "        pass_class = None\n",
           DUAL_MASKS),
    Mutant("a full pass leaves torch's encoder layers their own class", "fgkernels/nn/modules.py",
           "for _cls in (nn.MultiheadAttention, nn.TransformerEncoderLayer, "
           "nn.TransformerEncoder):\n", "for _cls in (nn.MultiheadAttention,):\n",
           TRANSFORMER_MASKS),
    Mutant("an encoder layer hands a Dual mask to torch's forward", "fgkernels/nn/modules.py",
           "        if not isinstance(src_mask, Dual):\n", "        if True:\n", TRANSFORMER_MASKS),
    Mutant("an encoder hands a Dual mask to torch's forward", "fgkernels/nn/modules.py",
           "        if not isinstance(mask, Dual):\n            return super().forward(src, mask,",
           "        if True:\n            return super().forward(src, mask,", TRANSFORMER_MASKS),
    Mutant("a pre-norm encoder layer with a Dual mask runs post-norm", "fgkernels/nn/modules.py",
           "        if self.norm_first:\n            x = x + self._sa_block(self.norm1(x), src",
           "        if False:\n            x = x + self._sa_block(self.norm1(x), src",
           TRANSFORMER_MASKS),
    Mutant("an encoder layer with a Dual mask forgets it is causal", "fgkernels/nn/modules.py",
           "        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,\n"
           "                                          is_causal=is_causal))",
           "        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,\n"
           "                                          is_causal=False))", TRANSFORMER_MASKS),
    Mutant("an encoder with a Dual mask never finds it causal", "fgkernels/nn/modules.py",
           "            is_causal = _is_causal_mask(mask.primal if isinstance(mask, Dual) else "
           "mask,\n                                        seq_len)",
           "            is_causal = False", TRANSFORMER_MASKS),
    Mutant("an encoder's left-aligned padding question takes the fallback",
           "fgkernels/rules/primal_ops.py",
           "    torch._nested_tensor_from_mask_left_aligned,\n", "",
           ("tests/rules/test_layer_configs.py::test_a_default_encoder_with_a_padding_mask_takes_"
            "no_fallback",)),
    Mutant("an encoder leaves asking whether a mask is causal to torch",
           "fgkernels/nn/modules.py",
           "        if is_causal is None and mask is not None and torch.is_floating_point(mask):",
           "        if False:",
           ("tests/nn/test_compile.py::test_an_encoder_with_a_learned_mask_compiles",)),
    Mutant("an encoder with a Dual mask skips its final norm", "fgkernels/nn/modules.py",
           "        return output if self.norm is None else self.norm(output)\n",
           "        return output\n", TRANSFORMER_MASKS),
    Mutant("a pass gives the exact class alone its twin", "fgkernels/dual/tangents.py",
           "        if issubclass(cls, base):\n", "        if cls is base:\n",
           ("tests/rules/test_layer_configs.py::test_a_subclass_of_attention_takes_a_learned_"
            "mask",)),
    Mutant("a Dual mask's attention transposes an unbatched input", "fgkernels/nn/modules.py",
           "        if self.batch_first and batched:  # the rule takes sequence-first inputs\n",
           "        if self.batch_first:\n", DUAL_MASKS),
    Mutant("multi-head attention adds an integer mask", "fgkernels/rules/attention.py",
           "        if isinstance(mask, Tensor) and mask.dtype != torch.bool and not "
           "mask.is_floating_point():\n", "        if False:\n",
           ("tests/rules/test_hostile_inputs.py::test_bad_input_gets_an_error_naming_it",)),
    Mutant("a layer keeps the class a pass gave it", "fgkernels/dual/tangents.py",
           "        for m, cls in self.class_swaps:\n            m.__class__ = cls\n",
           "        for m, cls in self.class_swaps:\n            pass\n", DUAL_MASKS),
    Mutant("torch's metadata functions take the fallback on a Dual",
           "fgkernels/rules/primal_ops.py",
           "    torch.is_floating_point, torch.is_complex, torch.is_signed, torch.is_inference,\n"
           "    torch.is_same_size, torch.numel,\n", "",
           ("tests/dual/test_dual_semantics.py::test_storage_metadata_is_the_primal_s_and_no_"
            "fallback_op",)),
    Mutant("attention takes a 3-D mask of any first size", "fgkernels/rules/attention.py",
           "        else (N * num_heads, L, S_in)", "        else (attn_mask.shape[0], L, S_in)",
           ("tests/rules/test_hostile_inputs.py::test_bad_input_gets_an_error_naming_it",)),
    Mutant("a pass keeps what parametrize.cached() kept", "fgkernels/dual/tangents.py",
           "        if parametrize._cache_enabled:\n", "        if False:\n",
           ("tests/dual/test_tangent_store.py::test_a_cached_parametrization_is_computed_anew_"
            "for_the_pass_and_after_it",)),
    Mutant("a Dual two containers deep starts no pass", "fgkernels/dual/tangents.py",
           "        if isinstance(v, dict) and _holds_dual(v.values()):",
           "        if isinstance(v, dict) and any(isinstance(e, Dual) for e in v.values()):",
           ("tests/dual/test_tangent_store.py::test_a_dual_nested_in_the_inputs_starts_the_pass_"
            "at_the_model",)),
    Mutant("a pass ends before its root's own forward hooks", "fgkernels/dual/tangents.py",
           "        if getattr(self.local, \"active\", None) is not None:\n"
           "            return  # the pass's root ends it (``root_done``)\n",
           "        active = getattr(self.local, \"active\", None)\n"
           "        if active is not None:\n"
           "            if active.root is module:\n"
           "                self.root_done(module)\n"
           "            return\n",
           ("tests/dual/test_tangent_store.py::test_a_forward_hook_of_the_passs_root_reads_its_"
            "parameters_with_their_tangents",)),
    Mutant("the comparison gives complex inputs no tangents", "fgkernels/testing.py",
           "    return isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())\n",
           "    return isinstance(v, Tensor) and v.is_floating_point()\n",
           ("tests/test_testing.py::test_the_comparison_gives_complex_inputs_tangents",)),
    Mutant("the oracle runs RNNs on oneDNN", "fgkernels/testing.py",
           "{name: _on_composite_kernels(getattr(torch._VF, name)) for",
           "{name: getattr(torch._VF, name) for",
           ("tests/test_testing.py", "tests/rules/test_layer_configs.py")),
    Mutant("masked_fill keeps x's tangent where it fills", "fgkernels/rules/pointwise.py",
           "(xo, xt, lambda t: t.masked_fill(mask, 0))", "(xo, xt, lambda t: t)", OPS),
    Mutant("log1p's slope 1/x", "fgkernels/rules/pointwise.py",
           "lambda t, x: t / _like(x + 1, t))", "lambda t, x: t / _like(x, t))", OPS),
    Mutant("expm1's slope without its 1", "fgkernels/rules/pointwise.py",
           "lambda t, x: t * _like(y + 1, t))", "lambda t, x: t * _like(y, t))", OPS),
    Mutant("exp2's slope without ln 2", "fgkernels/rules/pointwise.py",
           "t * _like(y, t) * math.log(2)", "t * _like(y, t)", OPS),
    Mutant("a step function (sign, floor, ...) passes its tangent", "fgkernels/rules/pointwise.py",
           "lambda t, x: torch.zeros_like(t), selects=True)", "lambda t, x: t, selects=True)",
           OPS),
    Mutant("tan's slope without the square", "fgkernels/rules/pointwise.py",
           "t * _like(1 + y * y, t)", "t * _like(1 + y, t)", OPS),
    Mutant("arctangent's slope 1/(1 + x)", "fgkernels/rules/pointwise.py",
           "t / _like(x * x + 1, t)", "t / _like(x + 1, t)", OPS),
    Mutant("take reads the slots in the transposed order", "fgkernels/rules/pointwise.py",
           "return t.reshape(t.shape[0], -1)[:, index]",
           "return t.transpose(-1, -2).reshape(t.shape[0], -1)[:, index]", OPS),
    Mutant("gather takes the fallback", "fgkernels/rules/pointwise.py",
           "torch.Tensor.gather, torch.gather, ", "", OPS),
    Mutant("channel dropout drawn elementwise", "fgkernels/rules/layers.py",
           "mask = draw(torch.ones_like(d.primal), p, True)",
           "mask = F.dropout(torch.ones_like(d.primal), p, True)",
           ("tests/rules/test_layer_configs.py",)),
    Mutant("adaptive max pool's tangent gathered along the width alone",
           "fgkernels/rules/layers.py",
           "(F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices, 2)",
           "(F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices, 1)", OPS),
    Mutant("binary cross-entropy's target slope of the wrong sign", "fgkernels/rules/losses.py",
           "slope_y = -torch.logit(xp) if w is None", "slope_y = torch.logit(xp) if w is None",
           OPS),
    Mutant("var_mean's mean tangent a sum", "fgkernels/rules/reductions.py",
           "mt = t.mean(_slot_dims(", "mt = t.sum(_slot_dims(", OPS),
    Mutant("RMS norm's ẋ term left unscaled by r", "fgkernels/rules/norms.py",
           "xt_hat = torch.mul(xt, r, out=out) if mean is None",
           "xt_hat = xt.clone() if mean is None", OPS),
    Mutant("a traced layer norm writes its tangent through out=", "fgkernels/rules/norms.py",
           "out = None if torch.compiler.is_dynamo_compiling() else buffer", "out = buffer",
           ("tests/nn/test_compile.py",)),
    Mutant("RMS norm's default eps taken as layer norm's", "fgkernels/rules/norms.py",
           "torch.finfo(acc).eps if eps is None else eps", "1e-5 if eps is None else eps", OPS),
    Mutant("PReLU's tie at 0 given the negative slope", "fgkernels/rules/pointwise.py",
           "out = where(x.primal >= 0, x, mul(a, x))", "out = where(x.primal > 0, x, mul(a, x))",
           OPS),
    Mutant("amax's ties each given the whole tangent", "fgkernels/rules/reductions.py",
           "yt = torch.where(ties, t, 0).sum(_slot_dims(dims, x.dim()), keepdim) / \\\n"
           "        _like(ties.sum(dims, keepdim), t)",
           "yt = torch.where(ties, t, 0).sum(_slot_dims(dims, x.dim()), keepdim) * \\\n"
           "        _like(ties.sum(dims, keepdim) > 0, t)", OPS),
    Mutant("var's correction left out of its tangent", "fgkernels/rules/reductions.py",
           "* (2.0 / (n - correction))", "* (2.0 / n)", OPS),
    Mutant("std's tangent NaN where std is 0", "fgkernels/rules/reductions.py",
           "return (yt / _like(2 * y, yt)).masked_fill_(y == 0, 0)",
           "return yt / _like(2 * y, yt)", SEMANTICS),
    Mutant("nll_loss's tangent without the class weights", "fgkernels/rules/losses.py",
           "return F.nll_loss(v, target, weight, ignore_index=ignore_index, reduction=reduction)",
           "return F.nll_loss(v, target, None if v is not d.primal else weight,\n"
           "                          ignore_index=ignore_index, reduction=reduction)", OPS),
    Mutant("smooth L1's slope taken from Huber's kernel", "fgkernels/rules/losses.py",
           "lambda t, d: _aten.smooth_l1_loss_backward(",
           "lambda t, d: _aten.huber_loss_backward(", OPS),
    Mutant("smooth L1 with β = 0 left to its kernel (0/0 at a tie)", "fgkernels/rules/losses.py",
           "slope = _sign_slope if beta == 0 else", "slope = _sign_slope if False else",
           ("tests/rules/test_hostile_inputs.py",)),
    Mutant("Huber's slope taken with δ = 1", "fgkernels/rules/losses.py",
           "t, d, d.new_zeros(()), _NO_REDUCTION, delta), weight, delta=delta)",
           "t, d, d.new_zeros(()), _NO_REDUCTION, 1.0), weight, delta=delta)", OPS),
    Mutant("CELU's slope scaled by alpha, not 1/alpha", "fgkernels/rules/pointwise.py",
           "t, alpha, 1, input_scale, False, x)", "t, alpha, 1, alpha, False, x)", OPS),
    Mutant("embedding picks its tangent's rows in another order", "fgkernels/rules/layers.py",
           "w.tangents[:, input])", "w.tangents[:, input.flip(0)])", OPS),
    Mutant("maximum gives a tie to the second operand", "fgkernels/rules/pointwise.py",
           "w = torch.where(a == b, 0.5, wins(a, b).to(y.dtype))", "w = wins(a, b).to(y.dtype)",
           OPS),
    Mutant("addmm drops beta from the input's tangent", "fgkernels/rules/products.py",
           "return lift(stack, 2) * beta", "return lift(stack, 2)", OPS),
    Mutant("norm adds the covariance term", "fgkernels/rules/norms.py",
           "xt_hat.addcmul_(xhat, m2r, value=-1)", "xt_hat.addcmul_(xhat, m2r, value=1)", OPS),
    Mutant("norm drops the bias tangent beside the weight's", "fgkernels/rules/norms.py",
           "p_part = torch.addcmul(as_slots(bt), as_slots(wt), xhat)",
           "p_part = as_slots(wt) * xhat", ("tests/rules/test_layer_configs.py",)),
    Mutant("attention's primal from the written-out products", "fgkernels/rules/attention.py",
           "return matmul(p, v) if primal is None else matmul_tangents(p, v, primal)",
           "return matmul(p, v)",
           ("tests/rules/test_properties.py::test_scaled_dot_product_attention",)),
    Mutant("softmax drops the mean term", "fgkernels/rules/attention.py",
           "in_primal_layout(c.sub_(_along(y * c, y, dim)).mul_(y)",
           "in_primal_layout(c.mul_(y)", OPS),
    Mutant("cross-entropy ignores label smoothing's uniform part", "fgkernels/rules/losses.py",
           "p = p * (1 - label_smoothing) + label_smoothing / z.shape[1]",
           "p = p * (1 - label_smoothing)", OPS),
    Mutant("cross-entropy averages over ignored samples too", "fgkernels/rules/losses.py",
           "lt = per_sample.sum(-1) / keep.sum()", "lt = per_sample.sum(-1) / z.shape[0]", OPS),
    # slots and the tangent store
    Mutant("owned parts subtracted when placed", "fgkernels/dual/slots.py",
           "            base.add_(t)\n        return base",
           "            base.sub_(t)\n        return base", OPS),
    Mutant("directions lined up as first met, not in order", "fgkernels/dual/slots.py",
           "union = sorted(set().union(*(o.directions for o in live)))",
           "union = list(dict.fromkeys(d for o in live for d in o.directions))", OPS),
    Mutant("a fallback op run slot by slot draws anew in each", "fgkernels/rules/fallback.py",
           "            _set_random_state(state)\n", "", SEMANTICS),
    Mutant("an output forward AD leaves without tangent takes a zero one",
           "fgkernels/rules/fallback.py",
           "    if undefined:\n        _refuse_undefined_tangents(",
           "    if False:\n        _refuse_undefined_tangents(", UNDEFINED_TANGENT),
    Mutant("a non-differentiable output without tangent is refused",
           "fgkernels/rules/fallback.py", "    if name in _NO_FORWARD_FORMULA:", "    if True:",
           UNDEFINED_TANGENT),
    Mutant("a pass leaves its first substituted parameter a Dual", "fgkernels/dual/tangents.py",
           "for holder, name, t in reversed(self.swaps):",
           "for holder, name, t in reversed(self.swaps[1:]):", STORE),
    Mutant("a module's OrderedDict of parameters holds no Dual", "fgkernels/dual/tangents.py",
           "if isinstance(v, _CONTAINERS) and k not in _MODULE_STATE]",
           "if type(v) in _CONTAINERS and k not in _MODULE_STATE]", OWN_CLASS),
    Mutant("a named tuple of parameters comes back a plain tuple", "fgkernels/dual/tangents.py",
           'new = v._make(entries) if hasattr(v, "_make") else type(v)(entries)',
           "new = tuple(entries)", OWN_CLASS),
    Mutant("a container gets back only the first Dual the pass put into it",
           "fgkernels/dual/tangents.py", "                if id(e) in before:",
           "                if id(e) in before and e is swap.during:", STORE),
    Mutant("cdist at p < 1 takes an infinite slope where a coordinate coincides",
           "fgkernels/rules/distances.py", "    if p < 1:  #", "    if False:  #",
           ("tests/rules/test_functional.py",)),
    Mutant("cdist by products cancels in the tangents' dtype", "fgkernels/rules/distances.py",
           "return _euclidean_term(i, stack.to(d.dtype), a, b, d).to(stack.dtype)",
           "return _euclidean_term(i, stack, a.to(stack.dtype), b.to(stack.dtype), "
           "d.to(stack.dtype))",
           ("tests/rules/test_functional.py",)),
    Mutant("a max bag finds its maxima in the tangents' dtype", "fgkernels/rules/layers.py",
           "at, empty = _embedding_bag_argmax(input, w, offsets,",
           "at, empty = _embedding_bag_argmax(input, w.to(stack.dtype), offsets,",
           ("tests/rules/test_functional.py",)),
    Mutant("CTC's gradient taken inside inference mode", "fgkernels/rules/losses.py",
           "with torch.inference_mode(False), torch.enable_grad():",
           "with torch.enable_grad():", ("tests/rules/test_functional.py",)),
    Mutant("the oracle breaks a pending backward", "fgkernels/testing.py",
           "with torch.autograd.grad_mode._unsafe_preserve_version_counter(params[n]):",
           "with contextlib.nullcontext():", ("tests/test_testing.py",)),
    Mutant("grid_sample drops the input's term", "fgkernels/rules/sampling.py",
           "return y.unflatten(0, (slots, n)).to(stack.dtype)",
           "return y.unflatten(0, (slots, n)).to(stack.dtype) * 0", OPS),
    Mutant("grid_sample drops the grid's term", "fgkernels/rules/sampling.py",
           "stack.to(wide)).to(stack.dtype)", "stack.to(wide)).to(stack.dtype) * 0", OPS),
    Mutant("grid_sample's grid derivative from one channel for all", "fgkernels/rules/sampling.py",
           "return d_grid.view(n, c, *g.shape[1:])",
           "return d_grid.view(n, c, *g.shape[1:])[:, :1].expand(n, c, *g.shape[1:])",
           ("tests/rules/test_functional.py",)),
    Mutant("grid_sample differentiates every padding mode as zeros",
           "fgkernels/rules/sampling.py", "flags = (_MODES[mode], _PADDING_MODES[padding_mode],",
           "flags = (_MODES[mode], 0,", ("tests/rules/test_functional.py",)),
    Mutant("CTC's tangent takes torch's gradient for the paths' occupancy",
           "fgkernels/rules/losses.py", "occupancy = lp.exp() * counted.unsqueeze(-1) - grad",
           "occupancy = -grad", OPS),
    Mutant("a sample zero_infinity zeroes keeps its CTC tangent", "fgkernels/rules/losses.py",
           "counted = counted & loss(lp, \"none\", False).isfinite()", "counted = counted",
           ("tests/rules/test_functional.py",)),
    Mutant("CTC's mean leaves out the target lengths", "fgkernels/rules/losses.py",
           "each = (each / lengths.clamp_min(1)).mean(-1)", "each = each.mean(-1)", OPS),
    Mutant("an empty max bag takes row 0's tangent", "fgkernels/rules/layers.py",
           "return picked.masked_fill(empty.unsqueeze(-1), 0)", "return picked", OPS),
    Mutant("embedding_bag reads its slots' columns in the wrong order",
           "fgkernels/rules/layers.py", ".unflatten(-1, (slots, width)).movedim(-2, 0)",
           ".unflatten(-1, (width, slots)).movedim(-1, 0)", OPS),
    Mutant("embedding_bag drops the sample weights' tangent", "fgkernels/rules/layers.py",
           "return torch.stack([bag(w.to(stack.dtype), s) for s in stack])",
           "return torch.stack([bag(w.to(stack.dtype), s) * 0 for s in stack])", OPS),
    Mutant("cdist's tangent divides by a distance of 0", "fgkernels/rules/distances.py",
           "return torch.where(d == 0, 0, (slope * rate).sum(-1) / d.pow(p - 1))",
           "return (slope * rate).sum(-1) / d.pow(p - 1)", OPS),
    Mutant("cdist by products adds the cross term it subtracts", "fgkernels/rules/distances.py",
           "- stack @ b.transpose(-1, -2)", "+ stack @ b.transpose(-1, -2)",
           ("tests/rules/test_properties.py::test_cdist",)),
    Mutant("cdist at p = inf gives each tied coordinate the whole tangent",
           "fgkernels/rules/distances.py", " / peak.sum(-1).clamp_min(1)", "", OPS),
    Mutant("cdist's second operand moves its distances the first's way",
           "fgkernels/rules/distances.py", "else -stack.unsqueeze(-3)", "else stack.unsqueeze(-3)",
           OPS),
    Mutant("a parameter in a module's list is read without its tangent",
           "fgkernels/dual/tangents.py",
           "                self._put_duals(attributes, key, m, (key,), _CONTAINER_DEPTH)",
           "                pass", STORE),
    Mutant("a parameter in a module's tuple is read without its tangent",
           "fgkernels/dual/tangents.py", "            if all(map(operator.is_, entries, v)):",
           "            if True:",
           OWN_CLASS),
    Mutant("a module's list keeps the pass's Duals", "fgkernels/dual/tangents.py",
           "for k, e in (enumerate(holder) if isinstance(holder, list) else",
           "for k, e in ([] if isinstance(holder, list) else", STORE),
    Mutant("the oracle swaps parameters into their modules", "fgkernels/testing.py",
           "                params[n].copy_(v)\n        return model(*call_args)",
           "                pass\n        return torch.func.functional_call(model, "
           "dict(zip(names, values[len(tensor_args):])), tuple(call_args), tie_weights=True)",
           ("tests/test_testing.py", "tests/dual/test_tangent_store.py")),
    Mutant("what a forward stores on its module outlives the pass", "fgkernels/dual/tangents.py",
           "            self.attributes.append(_Attributes.of(m))", "            pass", STORE),
    Mutant("a parameter read under the compiled pass's mode takes the op rules",
           "fgkernels/dual/tangents.py",
           "if name is not None and args and isinstance(args[0], Dual):",
           "if False:", STORE),
    Mutant("len(p) or repr(p) under the compiled pass's mode takes the fallback",
           "fgkernels/dual/tangents.py", "if name in _DUAL_PROTOCOLS:", "if False:",
           ("tests/dual/test_tangent_store.py",)),
    Mutant("the compiled pass's mode misses a tangent inside a list",
           "fgkernels/dual/tangents.py",
           "            if any(_is_dual(leaf) for leaf in pytree.tree_leaves(v)):",
           "            if False:", STORE),
    Mutant("the extension loads inside a plain torch.compile's trace",
           "fgkernels/backends/__init__.py", "\nwhen_dynamo_loads(_load_before_tracing)\n", "\n",
           ("tests/backends/test_native_loading.py",)),
    Mutant("Dynamo traces a converted Sequential through a cache", "fgkernels/nn/modules.py",
           "return _defines_call(cls) if torch.compiler.is_dynamo_compiling() else "
           "_defines_call_cached(cls)", "return _defines_call_cached(cls)",
           ("tests/nn/test_compile.py",)),
    Mutant("the compiled pass's mode calls an op on Duals alone as it is",
           "fgkernels/dual/tangents.py", "return isinstance(v, Dual) or tangent_of(v) is not None",
           "return tangent_of(v) is not None", ("tests/nn/test_compile.py",)),
    Mutant("every compiled model enters at the twins' one __call__", "fgkernels/nn/compiled.py",
           "torch.compile(_entry_point(module, guard_filter), **options)",
           "torch.compile(module, **options)",
           ("tests/nn/test_compile.py::test_each_compiled_model_keeps_its_graphs_apart",
            "tests/nn/test_compile.py::test_models_compiled_without_module_guards_run_their_own_graphs")),
    Mutant("a model compiled again compiles anew", "fgkernels/nn/compiled.py",
           "    code = _entry_codes.get(key)\n", "    code = None\n",
           ("tests/nn/test_compile.py::test_compiling_a_model_again_reuses_its_graphs",)),
    Mutant("compiled models share Dynamo's record of input sizes", "fgkernels/nn/compiled.py",
           "call.__code__.replace(co_name=name, co_qualname=name)", "call.__code__.replace()",
           ("tests/nn/test_compile.py::"
            "test_a_model_compiled_after_another_keeps_its_batch_size_static",)),
    Mutant("compiled models that compare equal share an entry", "fgkernels/nn/compiled.py",
           "    key = (id(module), guard_filter)\n", "    key = (hash(module), guard_filter)\n",
           ("tests/nn/test_compile.py::test_models_equal_by_value_compile_apart",)),
    Mutant("a graph compiled under a guard filter is taken without it",
           "fgkernels/nn/compiled.py", "    key = (id(module), guard_filter)\n",
           "    key = (id(module), None)\n",
           ("tests/nn/test_compile.py::"
            "test_a_graph_compiled_without_module_guards_is_not_taken_with_them",)),
    Mutant("torch.compile empties the caller's options", "fgkernels/nn/compiled.py",
           "    settings = dict(given or {})\n",
           "    settings = given or {}\n",
           ("tests/nn/test_compile.py::"
            "test_a_graph_compiled_without_module_guards_is_not_taken_with_them",)),
    Mutant("a cumulative average's batch statistics are not blended in",
           "fgkernels/nn/modules.py", "        if self._cumulative_average():\n            factor",
           "        if False:\n            factor",
           ("tests/nn/test_modules.py::test_fused_batch_norm_cumulative_average_follows_torch",
            COMPILE + "test_a_cumulative_average_batch_norm_follows_torchs_running_statistics")),
    Mutant("a cumulative average's factor counts this call twice", "fgkernels/nn/modules.py",
           "factor = 1.0 / (self.num_batches_tracked + 1).double()",
           "factor = 1.0 / (self.num_batches_tracked + 2).double()",
           ("tests/nn/test_modules.py::test_fused_batch_norm_cumulative_average_follows_torch",
            COMPILE + "test_a_cumulative_average_batch_norm_follows_torchs_running_statistics")),
    # reuse_conv_outputs
    Mutant("a kept output survives a change of mode", "fgkernels/nn/modules.py",
           "or k.output.dtype != input.primal.dtype or k.training != self.training",
           "or k.output.dtype != input.primal.dtype", REUSE),
    Mutant("a kept output survives a parameter write", "fgkernels/nn/modules.py",
           "                or k.versions != _versions(k.output, params)):", "                ):",
           REUSE),
    Mutant("kept outputs taken newest first", "fgkernels/nn/modules.py",
           "k = kept.pop(0)", "k = kept.pop()", REUSE),
    # the estimators
    Mutant("random guesses scaled twice", "fgkernels/train/estimators.py",
           'scale = deriv if guess == "random" else', 'scale = deriv * 2 if guess == "random" else',
           ESTIMATORS),
    Mutant("the last block's derivative halved", "fgkernels/train/estimators.py",
           "float((carried[k].to(dl_dh.dtype) * dl_dh).sum())",
           "float((carried[k].to(dl_dh.dtype) * dl_dh).sum()) * 0.5", ESTIMATORS),
    Mutant("activity direction added with the wrong sign", "fgkernels/train/estimators.py",
           "d = DF.add_direction(d, j, _as_tangent(g))",
           "d = DF.add_direction(d, j, _as_tangent(-g))", ESTIMATORS),
    Mutant("rademacher noise of 0 and 1", "fgkernels/train/estimators.py",
           "return (bits * 2 - 1).to(like.dtype)", "return bits.to(like.dtype)", ESTIMATORS),
    Mutant("a weight guess's norm from its first tensor", "fgkernels/train/estimators.py",
           "_norm2(*g.values())", "_norm2(next(iter(g.values())))", ESTIMATORS),
    Mutant("a local backward differentiates the head in bfloat16 too",
           "fgkernels/train/estimators.py", "reduced_weights=reduced,",
           "reduced_weights=params_b + params_h,", ESTIMATORS),
    Mutant("a bfloat16 weight-space guess computed in full", "fgkernels/train/estimators.py",
           "block_dtype=_guess_dtype(list(params.values())))", "block_dtype=None)",
           ESTIMATORS),
    Mutant("a weight-space basis is the guess unrounded", "fgkernels/train/estimators.py",
           "        g = {n: _rounded_to_tangent(v) for n, v in g.items()}\n", "",
           ESTIMATORS),
    Mutant("an activity-space basis is the guess unrounded", "fgkernels/train/estimators.py",
           "return _rounded_to_tangent(local.activity)", "return local.activity",
           ESTIMATORS),
    Mutant("a random activity-space basis is the noise unrounded",
           "fgkernels/train/estimators.py",
           "return _rounded_to_tangent(_noise(a.shape, a, run.noise, run.generator))",
           "return _noise(a.shape, a, run.noise, run.generator)", ESTIMATORS),
    Mutant("a block weight the head reads too differentiated in bfloat16",
           "fgkernels/train/estimators.py",
           "reduced = [p for p in params_b if all(p is not q for q in params_h)]",
           "reduced = params_b", ESTIMATORS),
    Mutant("the 'above' target's derivative negated", "fgkernels/train/estimators.py",
           "run.derivs[j - 1] = _head_derivative(",
           "run.derivs[j - 1] = -_head_derivative(", ESTIMATORS),
    Mutant("local backward updates the running statistics", "fgkernels/train/estimators.py",
           "keep = contextlib.nullcontext() if update_stats else preserved_buffers(block, head)",
           "keep = contextlib.nullcontext()", ESTIMATORS),
    # the trainer
    Mutant("a resumed run loses the optimizer's momentum", "fgkernels/train/loop.py",
           '        opt.load_state_dict(state["optimizer"])\n', "", TRAINER),
    Mutant("a resumed run restarts the schedule", "fgkernels/train/loop.py",
           '        sched.load_state_dict(state["scheduler"])\n', "", TRAINER),
    Mutant("a resumed run repeats its last epoch", "fgkernels/train/loop.py",
           'start = state["epoch"] + 1', 'start = state["epoch"]', TRAINER),
    Mutant("the schedule's decay is not the paper's", "fgkernels/train/loop.py",
           "MultiStepLR(opt, milestones, gamma=0.2)", "MultiStepLR(opt, milestones, gamma=0.1)",
           TRAINER),
    # the oracle's comparison
    Mutant("the comparison calls the model instead of the run it is given", "fgkernels/testing.py",
           "out = (run or model)(*[x if", "out = model(*[x if",
           ("tests/test_testing.py::test_run_is_what_the_comparison_calls",)),
    Mutant("the oracle takes torch's hardsigmoid slope when asked for the exact one",
           "fgkernels/testing.py", "    if exact_hardsigmoid:\n", "    if False:\n",
           ("tests/nn/test_compile.py::test_inductors_pass_is_exact_in_float64",)),
    Mutant("a compiled dropout draws the tangents' mask apart", "fgkernels/rules/layers.py",
           "    return d.with_tangents(y, None if t is None else t * mask.to(t.dtype))\n\n",
           "    return d.with_tangents(y, None if t is None else\n"
           "                           t * F.dropout(torch.ones_like(d.primal), p, True))\n\n",
           ("tests/nn/test_compile.py::"
            "test_inductors_dropout_draws_one_mask_for_the_primal_and_every_slot",)),
    Mutant("a compiled graph's own calls meet the dual pass's torch function mode",
           "fgkernels/nn/compiled.py", "            with in_rule():\n", "            if True:\n",
           ("tests/nn/test_compile.py::test_compiled_graphs_take_parameters_as_the_tensors_"
            "they_are",)),
    Mutant("the hooks a compile kept stay after the compiled call", "fgkernels/nn/compiled.py",
           "            _hooks.sync()  # (one the collector",
           "            pass  # (one the collector",
           ("tests/nn/test_compile.py::"
            "test_a_tangent_freed_while_a_model_compiles_leaves_its_trace_valid",)),
    Mutant("a compiled pass writes only the primal into a tensor of its forward",
           "fgkernels/dual/tangents.py",
           "return _compiled_pass.temporaries if _compiled_pass.running else running_pass()",
           "return running_pass()", COMPILED_TEMPORARY),
    Mutant("a compiled pass takes a module's state as a tensor of its forward",
           "fgkernels/dual/tangents.py", "        return any(v is t or v is base for m in",
           "        return False and any(v is t or v is base for m in", COMPILED_TEMPORARY),
    Mutant("a compiled pass takes a view as a tensor of its forward", "fgkernels/dual/tangents.py",
           "return type(t) is Tensor and t._base is None and not self.holds_as_state(t)",
           "return type(t) is Tensor and not self.holds_as_state(t)", COMPILED_TEMPORARY),
    Mutant("a compiled pass's ops read a view taken before a write made its tensor a Dual",
           "fgkernels/dual/tangents.py", "            temporaries.refuse_views_taken_before(",
           "            (lambda values: None)(", COMPILED_TEMPORARY),
    Mutant("a compiled pass returns a view taken before a write made its tensor a Dual",
           "fgkernels/dual/tangents.py", "        self.refuse_views_taken_before(output)\n", "",
           COMPILED_TEMPORARY),
    Mutant("a compiled pass's tensors keep their tangents after it", "fgkernels/dual/tangents.py",
           "            self.temporaries.drop()\n", "", COMPILED_TEMPORARY),
    Mutant("a compiled pass leaves what its forward stored on its module",
           "fgkernels/nn/compiled.py", "                    stores_put_back(module):\n",
           "                    contextlib.nullcontext():\n",
           (COMPILE + "test_a_compiled_pass_puts_back_what_the_forward_stores_on_its_module",)),
    Mutant("a compiled pass leaves a buffer rebound to a Dual", "fgkernels/dual/tangents.py",
           "        _strip_dual_buffers(modules)\n", "",
           (COMPILE + "test_a_compiled_pass_puts_back_what_the_forward_stores_on_its_module",)),
    Mutant("a tangent freed while compiling takes the module hooks the trace read",
           "fgkernels/dual/tangents.py", "            _hooks.sync_unless_compiling()\n",
           "            _hooks.sync()\n",
           ("tests/nn/test_compile.py::"
            "test_a_tangent_freed_while_a_model_compiles_leaves_its_trace_valid",)),
    Mutant("fgkernels.compile takes Inductor whatever torch's default backend",
           "fgkernels/nn/compiled.py",
           '    backend = options.pop("backend", None) or _default_backend()\n',
           '    backend = options.pop("backend", None) or "inductor"\n',
           ("tests/nn/test_compile.py::test_fgkernels_compile_takes_torchs_default_backend",)),
    Mutant("fgkernels.compile takes a mode with empty options", "fgkernels/nn/compiled.py",
           "    if mode is not None and given is not None:\n",
           "    if mode is not None and given:\n",
           ("tests/nn/test_compile.py::"
            "test_fgkernels_compile_refuses_a_mode_and_options_together",)),
    Mutant("a compiled dual pass breaks its graph at a recurrent layer",
           "fgkernels/nn/compiled.py",
           "    recurrent = any(isinstance(m, nn.RNNBase) for m in module.modules())\n",
           "    recurrent = False\n",
           (COMPILE + "test_recurrent_layers_compile_in_one_graph",)),
    Mutant("one rule depth for every thread", "fgkernels/dual/value.py",
           "class _RuleDepth(threading.local):", "class _RuleDepth:",
           (COMPILE + "test_a_rule_in_another_thread_leaves_a_compiled_pass_its_parameters",)),
    Mutant("one compiled-pass flag for every thread", "fgkernels/dual/tangents.py",
           "class _CompiledPass(threading.local):", "class _CompiledPass:",
           (COMPILE + "test_a_compiled_pass_in_another_thread_leaves_an_eager_pass_its_"
            "parameters",)),
    Mutant("the module hooks take another thread's compile for their own",
           "fgkernels/dual/tangents.py",
           "        if torch.compiler.is_dynamo_compiling():\n            if _holds_dual(args) or",
           "        if torch.compiler.is_compiling():\n            if _holds_dual(args) or",
           (COMPILE + "test_a_compiled_pass_in_another_thread_leaves_an_eager_pass_its_"
            "parameters",)),
    Mutant("fgkernels.compile reports no compiler config", "fgkernels/nn/compiled.py",
           "        return config() if config is not None else None\n",
           "        return None\n",
           (COMPILE + "test_fgkernels_compile_reports_its_backends_config",)),
    Mutant("Dynamo is not told how to trace @ between two Duals", "fgkernels/dual/dynamo.py",
           "    if isinstance(table, dict):\n        table.setdefault(operator.matmul,",
           "    if False:\n        table.setdefault(operator.matmul,",
           (COMPILE + "test_operators_between_duals_compile_as_written",)),
    Mutant("Dynamo traces a parameter's .T past the compiled pass's mode",
           "fgkernels/dual/dynamo.py", "    setattr(variable, method, var_getattr)\n", "    pass\n",
           (COMPILE + "test_a_parameter_read_past_the_mode_keeps_its_tangent_compiled",)),
    Mutant("Dynamo unpacks a parameter's rows past the compiled pass's mode",
           "fgkernels/dual/dynamo.py", "    variable.unpack_var_sequence = unpack_var_sequence\n",
           "    pass\n",
           (COMPILE + "test_a_parameter_read_past_the_mode_keeps_its_tangent_compiled",)),
    Mutant("Dynamo traces abs(parameter) past the compiled pass's mode",
           "fgkernels/dual/dynamo.py", "    builtin.call_abs = call_abs\n", "    pass\n",
           (COMPILE + "test_a_parameter_read_past_the_mode_keeps_its_tangent_compiled",)),
    Mutant("a view the forward-AD fallback made is not linked to its operand",
           "fgkernels/rules/fallback.py", "        flat[i] = d.as_view(v)\n",
           "        flat[i] = v\n",
           ("tests/dual/test_dual_semantics.py::test_in_place_op_on_a_view_writes_into_the_dual",
            "tests/dual/test_dual_semantics.py::test_in_place_op_on_a_complex_view_writes_into_"
            "the_dual")),
    Mutant("a fallback view of an operand without tangent keeps jvp's zeros",
           "fgkernels/rules/fallback.py",
           "        if d.tangents is None and v.tangents is not None:\n", "        if False:\n",
           ("tests/dual/test_dual_semantics.py::test_a_fallback_view_of_an_operand_without_"
            "tangent_writes_into_it",)),
    Mutant("a parameter's .data set during a pass stays on its Dual", "fgkernels/dual/value.py",
           "            parameter.data = value\n", "            pass\n",
           ("tests/dual/test_tangent_store.py::test_a_parameters_data_set_during_a_pass_is_set",)),
    Mutant("a fallback view of narrower tangents is a copy", "fgkernels/rules/fallback.py",
           "            return torch.func.vmap(take)(d.tangents)\n", "            return None\n",
           ("tests/dual/test_mixed_precision.py::test_a_write_through_a_fallback_view_of_"
            "narrower_tangents_reaches_the_dual",)),
    Mutant("a container changed in place keeps the Duals put into it",
           "fgkernels/dual/tangents.py",
           "    if snapshot.entries is not None:\n        _strip(",
           "    if False:\n        _strip(",
           ("tests/dual/test_tangent_store.py::test_a_dual_inside_a_container_a_forward_stores_"
            "does_not_outlive_the_pass",)),
    Mutant("moveaxis moves the stack's slot axis", POINTWISE,
           "    return t.movedim(_slot_dims(source, n), _slot_dims(destination, n))\n",
           "    return t.movedim(source, destination)\n",
           ("tests/dual/test_dual_semantics.py::test_op_matches_forward_ad",)),
    Mutant("a narrow tangent's slope rounded before its product", POINTWISE,
           "            tangents = torch.mul(t, slope, out=torch.empty_like(t))\n",
           "            tangents = t * slope.to(t.dtype)\n",
           ("tests/dual/test_mixed_precision.py::test_a_slope_past_the_tangents_range_is_not_"
            "rounded_alone",)),
    Mutant("a narrow tangent's product written by out= under autograd", POINTWISE,
           "                torch.is_grad_enabled() and (slope.requires_grad or t.requires_grad)):",
           "                False):",
           ("tests/dual/test_mixed_precision.py::test_a_narrower_tangent_of_a_primal_that_"
            "requires_grad",)),
    Mutant("linear takes a broadcast bias for one per output feature", LAYERS,
           "    if w.dim() == 1 or (w.dim() == 2 and b is not None and tuple(b.shape) != "
           "(w.shape[0],)):",
           "    if w.dim() == 1:",
           ("tests/rules/test_ops.py::test_float64_is_forward_ads",)),
    Mutant("batch norm takes parameters of another dtype than its input",
           "fgkernels/backends/contracts.py",
           "    if dtype is not None:\n        given =", "    if False:\n        given =",
           ("tests/rules/test_hostile_inputs.py::test_bad_input_gets_an_error_naming_it",)),
    Mutant("a Dual inside a container a forward stores outlives the pass",
           "fgkernels/dual/tangents.py",
           "            changed = [k for k, v in d.items() if _holds_dual((v,))\n",
           "            changed = [k for k, v in d.items() if isinstance(v, Dual)\n",
           ("tests/dual/test_tangent_store.py::test_a_dual_inside_a_container_a_forward_stores_"
            "does_not_outlive_the_pass",)),
    Mutant("a converted conv and batch norm fuse an unbatched input", "fgkernels/nn/modules.py",
           "_fusable(nxt) \\\n                    and input.dim() == 4:",
           "_fusable(nxt):", ("tests/rules/test_hostile_inputs.py::test_bad_input_gets_an_"
                              "error_naming_it",)),
    Mutant("dual_pass starts no pass", "fgkernels/dual/tangents.py",
           "        if _holds_dual(args) or (self.roots and is_dual_pass_root(module)):\n"
           "            active = self.local.active",
           "        if _holds_dual(args):\n            active = self.local.active",
           ("tests/dual/test_tangent_store.py::test_dual_pass_runs_a_model_of_token_ids",)),
    Mutant("dual_pass starts a pass only where some tensor has a tangent",
           "fgkernels/dual/tangents.py",
           "        if _holds_dual(args) or (self.roots and is_dual_pass_root(module)):\n"
           "            active = self.local.active",
           "        if _holds_dual(args) or (_LIVE and self.roots and is_dual_pass_root("
           "module)):\n            active = self.local.active",
           ("tests/dual/test_tangent_store.py::test_dual_pass_runs_a_pass_for_a_dual_by_keyword_"
            "alone",)),
    Mutant("a pass starts only where some tensor has a tangent", "fgkernels/dual/tangents.py",
           "        if _holds_dual(args) or (self.roots and is_dual_pass_root(module)):\n"
           "            active = self.local.active",
           "        if _LIVE and (_holds_dual(args) or (self.roots and is_dual_pass_root("
           "module))):\n            active = self.local.active",
           ("tests/rules/test_hostile_inputs.py::test_a_temporary_filled_from_duals_becomes_a_"
            "dual",
            "tests/dual/test_tangent_store.py::test_the_hooks_stay_while_a_dual_exists_and_go_"
            "with_the_last")),
    Mutant("the Duals the ops make are not counted", "fgkernels/dual/value.py",
           "        d._source, d._counted = None, census.count()\n",
           "        d._source, d._counted = None, True\n",
           ("tests/dual/test_tangent_store.py::test_the_hooks_stay_while_a_dual_exists_and_go_"
            "with_the_last",)),
    Mutant("the module hooks come back registered anew", "fgkernels/dual/tangents.py",
           "    def put_in(self) -> None:\n        if not self.handles:\n",
           "    def put_in(self) -> None:\n        if True:\n",
           (COMPILE + "test_the_module_hooks_going_and_coming_back_compile_nothing_anew",)),
    Mutant("a pass's end takes None in its output for a temporary", "fgkernels/dual/tangents.py",
           "        if not isinstance(v, Tensor) or temporaries.get(id(v)) is not v:\n",
           "        if temporaries.get(id(v)) is not v:\n",
           ("tests/rules/test_hostile_inputs.py::test_the_ways_a_forward_writes_duals_into_its_"
            "own_tensors",)),
    Mutant("a baseline runs beside fgkernels' hooks", "fgkernels/dual/tangents.py",
           "        _hooks.take_out()\n", "",
           ("tests/dual/test_tangent_store.py::test_hooks_set_aside_leaves_a_baseline_torchs_"
            "own_call_path",)),
    Mutant("a copy of a Dual is not counted as made", "fgkernels/dual/value.py",
           "        self._counted = census.count()\n\n    def __del__",
           "        self._counted = True\n\n    def __del__",
           ("tests/dual/test_tangent_store.py::test_the_hooks_stay_while_a_dual_exists_and_go_"
            "with_the_last",)),
    Mutant("a freed Dual is not counted", "fgkernels/dual/value.py",
           "            next(_freed)\n", "            pass\n",
           ("tests/dual/test_tangent_store.py::test_the_hooks_stay_while_a_dual_exists_and_go_"
            "with_the_last",)),
    Mutant("the hooks outlive the last Dual", "fgkernels/dual/tangents.py",
           "        elif not _LIVE and census.alive() == 0:\n", "        elif False:\n",
           ("tests/dual/test_tangent_store.py::test_the_hooks_stay_while_a_dual_exists_and_go_"
            "with_the_last",)),
    Mutant("a tangent of its primal's dtype keeps it in a wider op", "fgkernels/dual/slots.py",
           "        if self.narrow and tangent_dtype_fits(primal, self.dtype):\n",
           "        if tangent_dtype_fits(primal, self.dtype):\n", PROMOTION),
    Mutant("a narrow tangent widens in a wider op", "fgkernels/dual/slots.py",
           "        if self.narrow and tangent_dtype_fits(primal, self.dtype):\n",
           "        if False:\n", PROMOTION),
    Mutant("a Dual's tangent is never narrow to the plan", "fgkernels/dual/value.py",
           "self._stack.dtype, self._stack.dtype != self.primal.dtype)",
           "self._stack.dtype, False)",
           ("tests/dual/test_mixed_precision.py::test_bfloat16_tangents_of_a_float32_op",)),
    Mutant("a plan forgets its operands' narrowness", "fgkernels/dual/slots.py",
           "    narrow = any(o.narrow for o in live)\n", "    narrow = False\n", PROMOTION),
    Mutant("fgkernels.compile runs a dual_pass call plainly", "fgkernels/nn/compiled.py",
           "        if not (_holds_dual(args) or is_dual_pass_root(module)):\n",
           "        if not _holds_dual(args):\n",
           (COMPILE + "test_fgkernels_compile_runs_a_model_of_token_ids_inside_dual_pass",)),
    Mutant("a Dual's requires_grad set on nothing", "fgkernels/dual/value.py",
           "        self._requires_grad_holder().requires_grad = requires_grad\n",
           "        pass\n",
           ("tests/dual/test_dual_semantics.py::test_requires_grad_reaches_the_primal",)),
    Mutant("a parameter's Dual sets requires_grad on its detached primal",
           "fgkernels/dual/value.py",
           "        return self.primal if parameter is None else parameter\n",
           "        return self.primal\n",
           ("tests/dual/test_tangent_store.py::test_a_parameters_requires_grad_during_a_pass_is_"
            "the_parameters",)),
    Mutant("the oracle's slots share what a module cached", "fgkernels/testing.py",
           "        caches.restore()\n        torch.set_rng_state", "        torch.set_rng_state",
           ("tests/test_testing.py::test_the_oracle_runs_each_slot_from_the_caches_the_call_"
            "found",)),
    Mutant("the oracle keeps a cache its first slot made", "fgkernels/testing.py",
           "                del m.__dict__[k]\n", "                pass\n",
           ("tests/test_testing.py::test_the_oracle_runs_each_slot_from_the_caches_the_call_"
            "found",)),
    Mutant("triton BN+ReLU passes the tangent at the kink", TRITON_BN,
           "drop = out <= 0.0", "drop = out < 0.0", TRITON),
    # the C++ kernels (--native)
    Mutant("BN coefficients lose a factor r", BN_PER_CHANNEL,
           "t_xscale[x_pos[s] * C + c] += -a * r * r * in.tcov(s, c);",
           "t_xscale[x_pos[s] * C + c] += -a * r * in.tcov(s, c);", NATIVE),
    Mutant("BN coefficients drop the bias tangent", BN_PER_CHANNEL,
           "    if (in.has_bias_t) t_shift[p_pos[p] * C + c] += in.bias_t(p, c);\n", "", NATIVE),
    Mutant("BN tangent covariance not centred", BN_PER_CHANNEL,
           "tcov[t * C + c] = static_cast<acc_t>(t_cov - d1 * t_mean);",
           "tcov[t * C + c] = static_cast<acc_t>(t_cov);", NATIVE),
    Mutant("BN variance of the shifted values not recentred", BN_PER_CHANNEL,
           "/ n - d1 * d1;", "/ n;", NATIVE),
    Mutant("hardtanh passes the tangent at its upper bound", "csrc/select_ops.h",
           "return !(wide(x) <= lo_wide || wide(x) >= hi_wide);",
           "return !(wide(x) <= lo_wide || wide(x) > hi_wide);", NATIVE),
    Mutant("hardtanh compares a 16-bit primal with its bounds rounded to its type",
           "csrc/select_ops.h", "return !(wide(x) <= lo_wide || wide(x) >= hi_wide);",
           "return !(wide(x) <= wide(lo) || wide(x) >= wide(hi));", HARDTANH_16),
    Mutant("running variance not unbiased", BN_PER_CHANNEL,
           "momentum * (var * unbias)", "momentum * var", NATIVE),
    Mutant("linear drops the bias tangent of summed terms", "csrc/composite.cpp",
           "if (present(bt)) x_part.add_(bt->view(bias_shape));\n    return {y, x_part, empty()};",
           "return {y, x_part, empty()};", NATIVE),
    Mutant("linear returns one empty tensor for both absent parts", "csrc/composite.cpp",
           "  const auto empty = [&] { return at::empty({0}, x.options().dtype(type)); };",
           "  const auto none = at::empty({0}, x.options().dtype(type));\n"
           "  const auto empty = [&] { return none; };", NATIVE),
    Mutant("conv's input part laid out contiguous whatever the primal's layout",
           "csrc/composite.cpp",
           "            .unflatten(0, {xt->size(0), x.size(0)}),\n        fmt);",
           "            .unflatten(0, {xt->size(0), x.size(0)}),\n"
           "        at::MemoryFormat::Contiguous);", ("tests/backends/test_native.py",)),
    Mutant("a tiny map's NCHW GEMM reads the output pixels transposed", "csrc/composite.cpp",
           "      .view({N, h_out, w_out, K})\n      .permute({0, 3, 1, 2});",
           "      .view({N, h_out, w_out, K})\n      .permute({0, 3, 2, 1});", TINY_MAP,
           needs_amx=True),
    Mutant("a tiny map's GEMM returns its output channels_last whatever the input's layout",
           "csrc/composite.cpp",
           "  return y.contiguous(x_cl || w_cl ? at::MemoryFormat::ChannelsLast\n"
           "                                   : at::MemoryFormat::Contiguous);",
           "  return y;", TINY_MAP, needs_amx=True),
    Mutant("a tiny map's channels_last GEMM reads the output pixels transposed",
           "csrc/composite.cpp",
           "  return y.view({N, h_out, w_out, K}).permute({0, 3, 1, 2});",
           "  return y.view({N, h_out, w_out, K}).permute({0, 3, 2, 1});", TINY_MAP),
    Mutant("a tiny map's channels_last GEMM ignores the dilation", "csrc/composite.cpp",
           "       xh.stride(1) * dilation[0], xh.stride(2) * dilation[1], xh.stride(3)},",
           "       xh.stride(1), xh.stride(2), xh.stride(3)},", TINY_MAP),
    Mutant("a tiny map's channels_last GEMM swaps the strides", "csrc/composite.cpp",
           "      {xh.stride(0), xh.stride(1) * stride[0], xh.stride(2) * stride[1],",
           "      {xh.stride(0), xh.stride(1) * stride[1], xh.stride(2) * stride[0],", TINY_MAP),
    Mutant("a tiny map's channels_last GEMM pads rows as columns", "csrc/composite.cpp",
           "{0, 0, padding[1], padding[1], padding[0], padding[0]}",
           "{0, 0, padding[0], padding[0], padding[1], padding[1]}", TINY_MAP),
    Mutant("a tiny map's channels_last GEMM reads its input as dense", "csrc/composite.cpp",
           "      {xh.stride(0), xh.stride(1) * stride[0], xh.stride(2) * stride[1],",
           "      {xh.size(1) * xh.size(2) * xh.size(3), xh.stride(1) * stride[0],"
           " xh.stride(2) * stride[1],", TINY_MAP),
    Mutant("a tiny map's channels_last GEMM swaps the dilations", "csrc/composite.cpp",
           "       xh.stride(1) * dilation[0], xh.stride(2) * dilation[1], xh.stride(3)},",
           "       xh.stride(1) * dilation[1], xh.stride(2) * dilation[0], xh.stride(3)},",
           TINY_MAP),
    Mutant("a tiny map's channels_last GEMM drops the bias", "csrc/composite.cpp",
           "  const auto y = b.defined() ? at::addmm(b, cols, w2.t()) : at::mm(cols, w2.t());",
           "  const auto y = at::mm(cols, w2.t());", TINY_MAP),
    Mutant("a tiny map's bfloat16 GEMM takes a bias", "csrc/composite.cpp",
           "!b.defined() || (type == at::kFloat && b.scalar_type() == type);",
           "!b.defined() || b.scalar_type() == type;", TINY_MAP),
    Mutant("conv subtracts the bias tangent", "csrc/composite.cpp",
           "      p_part.add_(bias);", "      p_part.sub_(bias);", NATIVE),
    Mutant("ReLU passes the tangent at 0", "csrc/select_ops.h",
           "return !(wide(x) <= 0); }", "return !(wide(x) < 0); }", NATIVE),
    Mutant("layer norm kernel drops the tangent's mean", "csrc/cpu/dual_layer_norm.cpp",
           "const acc_t m1 = static_cast<acc_t>(s1 * inv_d);", "const acc_t m1 = 0;", NATIVE),
    Mutant("the reference layer norm scales the tangent before taking its mean out",
           "fgkernels/rules/norms.py",
           "torch.sub(xt, m1, out=out).mul_(r)",
           "torch.addcmul(m1.mul(r).neg_(), xt, r, out=out)",
           ("tests/rules/test_hostile_inputs.py::test_layer_norm_of_rows_without_spread_is_as_"
            "precise_as_torch",)),
    Mutant("layer norm kernel drops the bias tangent beside the weight's",
           "csrc/cpu/dual_layer_norm.cpp",
           "pt[i] = static_cast<acc_t>(gt[i]) * xh[i] + static_cast<acc_t>(bt[i]);",
           "pt[i] = static_cast<acc_t>(gt[i]) * xh[i];", NATIVE),
    Mutant("layer norm kernel leaves the parameters' own slots unwritten",
           "csrc/cpu/dual_layer_norm.cpp",
           "if (!sum_terms) row_store(pt.data(), D, po + s * slot + base);", "", NATIVE),
    Mutant("layer norm kernel scales the input term without the weight",
           "csrc/cpu/dual_layer_norm.cpp",
           "gamma[i] = static_cast<acc_t>(wp[i]);", "gamma[i] = acc_t(1);", NATIVE),
    Mutant("bfloat16 rounding takes a NaN by its bits", "csrc/dual_types.h",
           "v != v ? uint16_t(0x7FC0) : rounded", "rounded", BF16_ROUNDING),
    Mutant("bfloat16 rounding takes ties away from zero", "csrc/dual_types.h",
           "(u + 0x7FFFu + ((u >> 16) & 1u)) >> 16", "(u + 0x8000u) >> 16", BF16_ROUNDING),
    Mutant("layer norm reference drops the parameters' summed term", "fgkernels/rules/norms.py",
           "return (y, x_part.add_(p_part), None) if sum_terms",
           "return (y, x_part, None) if sum_terms", OPS),
    Mutant("max pool skips a NaN", "csrc/cpu/dual_max_pool2d.cpp",
           "return v > m || v != v;", "return v > m;", NATIVE),
    Mutant("max pool takes the last of equal values", "csrc/cpu/dual_max_pool2d.cpp",
           "return v > m || v != v;", "return v >= m || v != v;", NATIVE),
    Mutant("a closure's parameter is not lifted", "fgkernels/dual/tangents.py",
           "t.__class__ = _LIFTED[type(t)]\n        entry[1] += 1",
           "t.__class__ = type(t)\n        entry[1] += 1",
           ("tests/dual/test_tangent_store.py",
            "tests/rules/test_properties.py::test_models_reading_parameters_every_way")),
    Mutant("a lifted tensor stays lifted after the pass", "fgkernels/dual/tangents.py",
           "            t.__class__ = _UNLIFTED.get(type(t), type(t))", "            pass", STORE),
    Mutant("a lifted parameter's description is read through its Dual",
           "fgkernels/dual/tangents.py",
           'or (kind == "__get__" and _tensor_attribute(func) not in _VALUE_PROPERTIES):',
           "or False:", STORE),
    Mutant("a lifted parameter's transpose is its plain one", "fgkernels/dual/tangents.py",
           '_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})',
           '_VALUE_PROPERTIES = frozenset({"mT", "H", "mH", "real", "imag"})', STORE),
    Mutant("a copy of a lifted tensor is lifted", "fgkernels/dual/tangents.py",
           "    def __deepcopy__(self, memo):", "    def _not_deepcopy(self, memo):", STORE),
    Mutant("a temporary filled from Duals is refused", "fgkernels/rules/fallback.py",
           "    taken = pass_ is not None and pass_.can_take_as_dual(target)", "    taken = False",
           HOSTILE),
    Mutant("a view of a temporary that other tensors view becomes a Dual",
           "fgkernels/dual/tangents.py",
           "and torch._C._storage_Use_Count(v.untyped_storage()._cdata) <= 3", "and True",
           HOSTILE),
    Mutant("a view of a temporary written from a Dual is read without its tangent",
           "fgkernels/dual/tangents.py",
           "        _put(v, ParameterTangent(d.tangents, directions, single))", "        pass",
           HOSTILE),
    Mutant("a view of a strided temporary becomes a Dual", "fgkernels/dual/tangents.py",
           "and base.is_contiguous(memory_format=kernel_format(base))", "and True", HOSTILE),
    Mutant("a tensor viewed before a Dual is written into it becomes a Dual",
           "fgkernels/dual/tangents.py",
           "and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2",
           "and True", HOSTILE),
    Mutant("a view of a temporary takes the primal under no_grad", "fgkernels/rules/fallback.py",
           "    if pass_ is not None and not pass_.holds_as_state(target):",
           "    if False:", HOSTILE),
    Mutant("a Dual without tangent written into a plain tensor is refused",
           "fgkernels/rules/fallback.py",
           "    if _carries_tangent(written) and differentiable(target.dtype):",
           "    if differentiable(target.dtype):", HOSTILE),
    Mutant("a Dual written into an integer tensor with grad is refused",
           "fgkernels/rules/fallback.py",
           "    if _carries_tangent(written) and differentiable(target.dtype):",
           "    if _carries_tangent(written):", HOSTILE),
    Mutant("an in-place op's target given by name is not read", "fgkernels/rules/fallback.py",
           'key = None if out is not None or args else next((k for k in kwargs if k != "out")',
           'key = None if True else next((k for k in kwargs if k != "out")', IN_PLACE_COPY),
    Mutant("an in-place op without out-of-place form is not run on a copy",
           "fgkernels/rules/fallback.py", "if outplace is None or key is not None:",
           "if key is not None:", IN_PLACE_COPY),
    Mutant("an in-place op's target given by name takes its namesake out of place",
           "fgkernels/rules/fallback.py", "if outplace is None or key is not None:",
           "if outplace is None:", IN_PLACE_COPY),
    Mutant("out= counts only the operands after the first", "fgkernels/rules/fallback.py",
           "    written = (args if out is not None else args[1:],", "    written = (args[1:],",
           HOSTILE),
    Mutant("the pass returns its temporary as a plain tensor", "fgkernels/dual/tangents.py",
           "output = active.with_duals(output) if active.temporaries else None",
           "output = None", HOSTILE),
    Mutant("a temporary in a dataclass comes out plain", "fgkernels/dual/tangents.py",
           "        if _is_dataclass(v):  # (a container pytree may not know)",
           "        if False:", HOSTILE),
    Mutant("a temporary keeps its tangent after the pass", "fgkernels/dual/tangents.py",
           "                _drop(t)\n        self.lifted, self.temporaries, self.state",
           "                pass\n        self.lifted, self.temporaries, self.state", HOSTILE),
    Mutant("index_add's source term drops alpha", "fgkernels/rules/indexing.py",
           "return out.index_add_(at, index, flat, alpha=alpha)",
           "return out.index_add_(at, index, flat)", OPS),
    Mutant("Tensor.where swaps its operands", "fgkernels/rules/pointwise.py",
           "    return where(condition, input, other)", "    return where(condition, other, input)",
           OPS),
    Mutant("a compiled call inside an eager pass traces lifted tensors",
           "fgkernels/nn/compiled.py", "                    lifted_set_aside(), _autograd",
           "                    contextlib.nullcontext(), _autograd",
           ("tests/nn/test_compile.py::test_an_eager_pass_calls_a_compiled_model_it_does_not_hold",
            )),
    Mutant("a frozen parameter written from Duals is refused", "fgkernels/dual/tangents.py",
           "                *m._parameters.values(), *m._buffers.values(), *m.__dict__.values())",
           "                *m._buffers.values(), *m.__dict__.values())", HOSTILE),
    Mutant("complex sigmoid's slope conjugated, as a gradient's", POINTWISE,
           "lambda t, x: t * (y * (1 - y)))", "lambda t, x: t * (y * (1 - y)).conj())", COMPLEX),
    Mutant("complex tanh's slope conjugated, as a gradient's", POINTWISE,
           "lambda t, x: t * (1 - y * y))", "lambda t, x: t * (1 - y * y).conj())", COMPLEX),
    Mutant("complex SiLU's slope conjugated, as torch's forward mode has it", POINTWISE,
           "F.silu(input.primal), _aten.silu_backward, inplace)",
           "F.silu(input.primal), lambda t, x: _aten.silu_backward(t.conj(), x).conj(), inplace)",
           ("tests/dual/test_dual_semantics.py::test_complex_silu_is_its_derivative",)),
    Mutant("complex L1 loss's tangent the sign times ḋ", "fgkernels/rules/losses.py",
           "if weight is None and (x.primal.is_complex()",
           "if False and (x.primal.is_complex()", COMPLEX),
    Mutant("CELU's 1/alpha taken of alpha itself, not torch's float32 rounding", POINTWISE,
           'input_scale = 1 / struct.unpack("f", struct.pack("f", alpha))[0]',
           "input_scale = 1 / alpha", ("tests/rules/test_ops.py",)),
    Mutant("the reference hardtanh compares a 16-bit primal in its own type", POINTWISE,
           "xw = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x", "xw = x",
           HARDTANH_16),
    Mutant("a buffer a forward rebinds to a Dual keeps it after the pass",
           "fgkernels/dual/tangents.py",
           "        _strip_dual_buffers(_tree(self.root) if self.light else self.modules)\n", "",
           ("tests/dual/test_tangent_store.py::test_a_buffer_a_forward_rebinds_keeps_its_value_"
            "without_the_tangent",)),
    Mutant("a light pass leaves the Duals of its buffers", "fgkernels/dual/tangents.py",
           "_strip_dual_buffers(_tree(self.root) if self.light else self.modules)",
           "_strip_dual_buffers(self.modules)",
           ("tests/dual/test_tangent_store.py::test_a_buffer_a_forward_rebinds_keeps_its_value_"
            "without_the_tangent",)),
    Mutant("the reference select lays its slots out as a broadcast mask's masked_fill does",
           "fgkernels/backends/reference.py", "return xt.clone().masked_fill_(zero, 0)",
           "return xt.masked_fill(zero, 0)", CHANNELS_LAST),
    Mutant("the reference max pool's slots left as the gather lays them out", LAYERS,
           "return y, in_primal_layout(xt.flatten(-2).gather(-1, flat_idx).view(xt.shape[0], "
           "*y.shape), y)",
           "return y, xt.flatten(-2).gather(-1, flat_idx).view(xt.shape[0], *y.shape)",
           CHANNELS_LAST),
    Mutant("the Triton epilogue's primal sum uncentred in its second factor",
           "fgkernels/backends/triton/conv_kernel.py",
           "co_moment = tl.sum(y_centred * y_centred, axis=0)",
           "co_moment = tl.sum(y_centred * v, axis=0)", TRITON_STATS),
    Mutant("the Triton epilogue's tangent sum uncentred in its second factor",
           "fgkernels/backends/triton/conv_kernel.py",
           "                         - (v_sum / rows) * tl.sum(y_centred, axis=0))",
           "                         - 0.0)", TRITON_STATS),
    Mutant("complex softsign's tangent divided by its real slope", POINTWISE,
           "    if input.primal.is_complex():\n        return input / (torch.abs(input) + 1)",
           "    if False:\n        return input / (torch.abs(input) + 1)", COMPLEX),
    Mutant("the KL divergence's tangent in its input's dtype", "fgkernels/rules/losses.py",
           'else F.kl_div(xp, yp, reduction="none"',
           'else F.kl_div(xp, yp.to(xp.dtype), reduction="none"', LOSS_DTYPES),
    Mutant("a regression loss's difference taken before its operands are broadcast",
           "fgkernels/rules/losses.py", "    if x.shape != y.shape:\n        shape = torch.",
           "    if False:\n        shape = torch.", LOSS_DTYPES),
    Mutant("cosine similarity's floating operands cast to the unbroadcast common dtype",
           "fgkernels/rules/norms.py",
           "(v if v.primal.is_floating_point() or v.primal.is_complex() else v.to(dtype))",
           "v.to(dtype)", LOSS_DTYPES),
    Mutant("a rounded quotient's tangent the plain quotient's", POINTWISE,
           "    if rounding_mode is not None:\n        y = torch.div(a, b, rounding_mode",
           "    if False:\n        y = torch.div(a, b, rounding_mode", SEMANTICS),
    Mutant("Dynamo hands torch's private functions to no mode", "fgkernels/dual/dynamo.py",
           'return getattr(func, "__name__", "").startswith("_") and func not in ignored',
           'return False and func not in ignored', COMPUTED_APART),
    Mutant("a parametrization read inside a twin's rule stays inside it",
           "fgkernels/dual/value.py",
           "    _rule_depth.set_aside.append(_rule_depth.depth)\n    _rule_depth.depth = 0",
           "    _rule_depth.set_aside.append(_rule_depth.depth)", COMPUTED_APART),
    Mutant("a checkpointed block traced as Dynamo's higher-order op", "fgkernels/dual/dynamo.py",
           "if not (_mode_asks(tx) and args):", "if True:", COMPUTED_APART),
    Mutant("index_fill's value tangent everywhere", POINTWISE,
           "(vo, vt, lambda t: torch.where(filled, t, 0))", "(vo, vt, lambda t: t)", OPS),
    Mutant("a 0-d roll's slots vmapped", POINTWISE,
           "if input.primal.dim() == 0 and func in _COPIES_OF_A_NUMBER:",
           "if False:", OPS),
    Mutant("a constant pad's slots left contiguous", LAYERS,
           "in_primal_layout(F.pad(d.tangents, pad, mode, 0.0), y)",
           "F.pad(d.tangents, pad, mode, 0.0)", CHANNELS_LAST),
    Mutant("a float64 batch into a float32 convolution named by a later check",
           "fgkernels/backends/contracts.py", '    _check_one_dtype("conv2d", x, w)\n', "\n",
           HOSTILE),
    Mutant("batch norm's dtypes listed under other names", "fgkernels/backends/contracts.py",
           '", ".join(f"{name} {t.dtype}" for name, t in given)',
           '", ".join(f"{t.dtype}" for name, t in given)', HOSTILE),
    Mutant("instance norm hands Dual statistics back to itself", "fgkernels/rules/norms.py",
           "        if t is not None and not isinstance(t, Tensor):  # a Dual included, as batch",
           "        if False:  # a Dual included, as batch", HOSTILE),
    Mutant("a 0-d Dual's transpose shifted past the slot axis", POINTWISE,
           "    if n == 0:  # a 0-d primal's dim 0 (or -1)",
           "    if False:  # a 0-d primal's dim 0 (or -1)",
           ("tests/dual/test_dual_semantics.py::test_a_0_d_dual_moves_its_one_dim_as_torch",)),
    Mutant("a failed compiled pass leaves forward AD's level open", "fgkernels/nn/compiled.py",
           "        if caller_level == -1:", "        if False:",
           ("tests/nn/test_compile.py::test_a_compiled_pass_that_fails_inside_forward_mode_"
            "leaves_it_usable",)),
    Mutant("a converted lazy layer becomes torch's class", "fgkernels/nn/modules.py",
           '                body["cls_to_become"] = _class_twin(become) or become',
           "                pass",
           ("tests/nn/test_modules.py::test_converted_lazy_layers_become_twins",)),
    Mutant("torch.fx traces into a converted layer", "fgkernels/nn/modules.py",
           "        if isinstance(input, torch.fx.Proxy) and _fx_leaf(type(self)):",
           "        if False:",
           ("tests/nn/test_modules.py::test_a_converted_model_traces_with_torch_fx_as_the_"
            "torch_nn_model",)),
    Mutant("an in-place op that writes no values runs on a copy", "fgkernels/rules/fallback.py",
           "        if outplace is None and key is None and name not in _WRITES_ON_A_COPY:",
           "        if False:",
           ("tests/dual/test_dual_semantics.py::test_an_in_place_op_without_out_of_place_form_"
            "that_is_no_write_is_refused",)),
    Mutant("a batch of NumPy memory cloned copy-on-write", "fgkernels/train/estimators.py",
           "    except RuntimeError:\n        return x.clone()\n", "    finally:\n        pass\n",
           ("tests/train/test_estimators.py::test_a_batch_of_numpy_memory_is_estimated_as_a_"
            "torch_one",)),
    Mutant("one slot's fallback tangent mapped by vmap", "fgkernels/rules/fallback.py",
           "    if stacks[0].shape[0] == 1:\n", "    if False:\n",
           (COMPILE + "test_a_fallback_op_vmap_cannot_batch_compiles_with_one_slot",)),
    Mutant("a failed compiled pass leaves grad mode off", "fgkernels/nn/compiled.py",
           "        torch.set_grad_enabled(grad_enabled)\n", "",
           ("tests/nn/test_compile.py::test_a_compiled_pass_that_fails_inside_forward_mode_"
            "leaves_it_usable",)),
    Mutant("group norm's groups sized by -1", "fgkernels/rules/norms.py",
           "num_groups, c // num_groups * hw)", "num_groups, -1)",
           HOSTILE),
    Mutant("permute's dims= not read", POINTWISE,
           '        return tuple(dims_by_name["dims"])', "        return ()", SEMANTICS),
    Mutant("a shape by keyword taken for no shape", LAYERS,
           "        return by_name[name]", "        return ()", SEMANTICS),
    Mutant("a pool's float size left to the op's schema", LAYERS,
           "    if not all(isinstance(v, tuple) and all(type(e) is int for e in v) for v in pool)",
           "    if False and not all(isinstance(v, tuple) for v in pool)", HOSTILE),
    Mutant("a 3-d map's slots left contiguous by contiguous() and to()",
           "fgkernels/dual/layout.py",
           "    if fmt in (torch.channels_last, torch.channels_last_3d):\n        n = xt.dim() - 1",
           "    if fmt == torch.channels_last:\n        n = xt.dim() - 1", CHANNELS_LAST),
    Mutant("a norm's mean(x̂·ẋ) of the uncentred tangent", "fgkernels/rules/norms.py",
           "m2 = m2.sub_(m1 * xhat.mean(dims, keepdim=True))", "m2 = m2", FAR_FROM_ZERO),
    Mutant("layer norm's kernel leaves Σx̂ out of Σx̂·(ẋ − m1)", "csrc/cpu/dual_layer_norm.cpp",
           "((s2 - s1 * inv_d * xh_sum) * inv_d)", "(s2 * inv_d)", FAR_FROM_ZERO),
    Mutant("softmax's tangent not centred first", "fgkernels/rules/attention.py",
           "return t - t.mean(dim + 1, keepdim=True) if y.dim()", "return t if y.dim()",
           FAR_FROM_ZERO),
    Mutant("cross-entropy's tangent not centred first", "fgkernels/rules/losses.py",
           "(zt - zt.mean(-1, keepdim=True))", "zt", FAR_FROM_ZERO),
    Mutant("a layer's slots in the parameters' wider dtype", "fgkernels/rules/operands.py",
           "return plan if dtype == plan.dtype else plan._replace(dtype=dtype)", "return plan",
           ("tests/dual/test_mixed_precision.py",)),
    Mutant("a Dual under autocast runs", "fgkernels/dual/value.py",
           "if torch._C._is_any_autocast_enabled():", "if False:", HOSTILE),
    Mutant("another library's op without forward formula given zero tangents",
           "fgkernels/rules/fallback.py", '    if "::" in name:', "    if False:",
           ("tests/dual/test_dual_semantics.py::test_another_library_s_op_without_forward_"
            "formula_is_refused",)),
    Mutant("a write of a Dual into a plain tensor refused as a TypeError (+= then adds out of "
           "place)", "fgkernels/rules/fallback.py",
           "        raise RuntimeError(\n            f\"fgkernels.Dual: {what} would write a Dual "
           "into a plain tensor",
           "        raise TypeError(\n            f\"fgkernels.Dual: {what} would write a Dual "
           "into a plain tensor",
           ("tests/rules/test_hostile_inputs.py::test_augmented_assignment_into_a_temporary_is_"
            "in_place",)),
    Mutant("the batch-norm sums' shift an Inf", BN_PER_CHANNEL,
           "return std::isfinite(mean) ? mean : 0.0;", "return mean;", HOSTILE),
    Mutant("the batch-norm sums' shift from each channel's first values", BN_PER_CHANNEL,
           "const int64_t position = j * total / n;", "const int64_t position = j + 0 * total / n;",
           ("tests/rules/test_hostile_inputs.py::test_batch_norm_does_not_hang_on_a_channel_s_"
            "first_values",)),
    Mutant("the coefficients' fake takes weight_t without weight",
           "fgkernels/backends/native/fakes.py",
           "torch._check(weight_t is None or weight is not None,", "torch._check(True,",
           HOSTILE),
    Mutant("a block's dual pass draws its own dropout masks", "fgkernels/train/estimators.py",
           "    after = _RandomState.now(before.device)\n    before.restore()",
           "    after = _RandomState.now(before.device)", ESTIMATORS),
    Mutant("an aux head's dual pass draws its own dropout masks",
           "fgkernels/train/estimators.py",
           "with preserved_buffers(head), _replaying_draws(draws):",
           "with preserved_buffers(head):",
           ("tests/train/test_estimators.py::test_an_aux_head_with_dropout_draws_one_mask_a_step",)),
    Mutant("a block's autograd forward writes into the pass's activation",
           "fgkernels/train/estimators.py", "else block(_writable(h))", "else block(h)",
           IN_PLACE),
    Mutant("a head's autograd forward writes into the activation it is given",
           "fgkernels/train/estimators.py", "():\n            logits = head(_writable(a))",
           "():\n            logits = head(a)", IN_PLACE),
    Mutant("an activity-space block's autograd forward writes into the pass's activation",
           "fgkernels/train/estimators.py", "out = block(_writable(h.detach()))",
           "out = block(h.detach())", IN_PLACE),
    Mutant("a head's dual pass rebinds the Dual that goes on",
           "fgkernels/train/estimators.py", "head(_own_dual(d.select_directions([direction])))",
           "head(d.select_directions([direction]))", IN_PLACE),
    Mutant("the local baseline's head writes into the activation that goes on",
           "fgkernels/train/estimators.py", "                logits = head(_writable(a))",
           "                logits = head(a)",
           ("tests/train/test_estimators.py::test_local_baseline_equals_autograd_of_each_aux_"
            "loss",)),
    Mutant("a parameter of two blocks passes the estimator's check",
           "fgkernels/train/estimators.py",
           "    check_parameters_unshared(net)\n    run = _Pass(", "    run = _Pass(", SHARED),
    Mutant("a parameter shared by two parts looked up under its first name only",
           "fgkernels/train/estimators.py",
           "net.named_parameters(remove_duplicate=False)", "net.named_parameters()", SHARED),
    Mutant("a tangent_dtype block applied to parameters of the other kind",
           "fgkernels/dual/precision.py",
           "if dtype is None and block is not None and block.is_complex == primal.is_complex:",
           "if dtype is None and block is not None:",
           ("tests/dual/test_mixed_precision.py::test_complex_parameters_draw_complex_tangents_"
            "of_their_kind",)),
    Mutant("a GRU's tangent in the narrow form at the primal's precision",
           "fgkernels/rules/recurrent.py",
           "    if dtype == ip.dtype:  # torch's composition",
           "    if False:  # torch's composition",
           ("tests/rules/test_hostile_inputs.py::test_a_gru_with_an_infinite_new_gate_tangent_"
            "is_nan_as_forward_ad",)),
    Mutant("a compiled pass skips the eager pass's parameter checks", "fgkernels/nn/compiled.py",
           "        check_tangents_still_fit(module, bound)  #", "        #",
           (COMPILE + "test_a_compiled_pass_refuses_a_parameter_changed_after_its_tangent",)),
    Mutant("a tangent broadcast from a smaller operand left expanded", POINTWISE,
           "    if 0 in stack.stride():\n", "    if False:\n",
           ("tests/dual/test_dual_semantics.py::test_a_tangent_broadcast_from_a_smaller_operand_takes_writes_"
            "through_views",)),
    Mutant("a Dual viewed by an expanded view not told so", "fgkernels/dual/value.py",
           "if self._source is not None or (_writable(self.primal) and _writable(self._stack)):",
           "if self._source is not None or (_writable(out._stack) and _writable(self._stack)):",
           ("tests/dual/test_dual_semantics.py::test_an_expanded_view_sees_writes_into_the_dual_it_views",)),
    Mutant("a tangent on the primal's memory kept there", "fgkernels/dual/value.py",
           "        if shares_memory(stack, primal):", "        if False:",
           ("tests/dual/test_dual_semantics.py::test_a_tangent_on_the_primal_s_memory_is_the_dual_s_own",)),
    Mutant("NumPy left to take a Dual as an array", "fgkernels/dual/value.py",
           "    __array_ufunc__ = None\n", "\n",
           ("tests/dual/test_dual_semantics.py::test_numpy_scalars_are_numbers_on_either_side",)),
    Mutant("a NumPy scalar operand refused", POINTWISE,
           "        if numpy is None or not isinstance(v, numpy.generic):",
           "        if True:",
           ("tests/dual/test_dual_semantics.py::test_numpy_scalars_are_numbers_on_either_side",)),
    Mutant("a parameter moved under another name kept on record", "fgkernels/dual/tangents.py",
           "        for leaf in [leaf for leaf in bound or () if leaf not in m._parameters]:",
           "        for leaf in []:",
           ("tests/dual/test_tangent_store.py::test_a_parameter_moved_part_way_through_"
            "training_takes_fresh_tangents",)),
    Mutant("a TorchScript module's parameters given tangents", "fgkernels/dual/tangents.py",
           "        if isinstance(owner, torch.jit.ScriptModule):",
           "        if False:",
           ("tests/dual/test_tangent_store.py::test_a_torchscript_module_is_refused_before_"
            "any_tangent_is_set",)),
    Mutant("the old spectral_norm hook refused in eval mode too", "fgkernels/dual/tangents.py",
           'if type(hook).__name__ == "SpectralNorm" and m.training',
           'if type(hook).__name__ == "SpectralNorm"',
           ("tests/dual/test_tangent_store.py::test_the_old_spectral_norm_hook_in_eval_mode_is_exact",)),
    Mutant("the Triton conv op runs unchecked", "fgkernels/backends/triton/ops.py",
           "                 bn_stats):\n    _check_conv_operands(",
           "                 bn_stats):\n    (lambda *a: None)(",
           ("tests/backends/test_triton.py::test_conv_op_checks_its_operands_eager_and_fake",)),
    Mutant("the Triton apply runs unchecked", "fgkernels/backends/triton/ops.py",
           "def _dual_bn_apply_(x, xt, center, scale, shift, t_xscale, t_shift, relu) -> None:\n"
           "    _check_apply_operands(",
           "def _dual_bn_apply_(x, xt, center, scale, shift, t_xscale, t_shift, relu) -> None:\n"
           "    (lambda *a: None)(",
           ("tests/backends/test_triton.py::test_apply_op_checks_its_operands",)),
    Mutant("a Dual without tangent given a zero tangent in the fallback",
           "fgkernels/rules/fallback.py",
           "    if any(d.tangents is not None for d in operands):",
           "    if False:", ("tests/dual/test_dual_semantics.py::test_a_dual_without_tangent_is_a_"
                             "constant_of_a_fallback_op",)),
    Mutant("a block with nothing to differentiate differentiated", "fgkernels/train/estimators.py",
           "    if not wrt:\n        return []\n", "",
           ("tests/train/test_estimators.py::test_estimate_equals_autograd_projection",)),
    Mutant("a direction that never reached the loss looked up", "fgkernels/train/estimators.py",
           "    if loss.tangents is None or direction not in loss.directions:\n"
           "        return 0.0\n",
           "", ("tests/train/test_estimators.py::test_estimate_equals_autograd_projection",)),
    Mutant("torch.cat's channels_last slots left as the join lays them out", LAYERS,
           "    if kernel_format(y) != torch.channels_last:", "    if True:",
           ("tests/dual/test_channels_last.py::test_an_op_lays_out_each_slot_as_its_primal",)),
    Mutant("group norm's slots left as the groups' reshape lays them out",
           "fgkernels/rules/norms.py", "d.with_tangents(y, in_primal_layout(d.tangents, y))",
           "d", ("tests/dual/test_channels_last.py::test_an_op_lays_out_each_slot_as_its_primal",)),
    Mutant("softsign's tangent without the NaN of torch's quotient rule", POINTWISE,
           "                       + (t * _like(sign_y, t)) * 0)", "                       )",
           ("tests/rules/test_properties.py::test_activations_at_every_kink",)),
    Mutant("a demo with --overwrite clears each run's files only as it begins",
           "fgkernels/train/cli.py", "            if args.overwrite:  # every run's old files",
           "            if False:  # every run's old files",
           ("tests/train/test_train_robustness.py::test_the_demo_with_overwrite_clears_every_run_s_files_before_the_first_"
            "run",)),
    Mutant("--overwrite leaves the plots", "fgkernels/train/checkpoint.py",
           "(CHECKPOINT_NAME, METRICS_NAME, *PLOT_NAMES)", "(CHECKPOINT_NAME, METRICS_NAME)",
           ("tests/train/test_train_robustness.py::test_a_plot_of_an_earlier_run_does_not_outlive_it",)),
    Mutant("the demo loads its data before it checks its configurations",
           "fgkernels/train/cli.py",
           "            for cfg in configs:\n                cfg.validate()\n", "",
           ("tests/train/test_train_robustness.py::test_a_demo_seed_out_of_range_is_refused_"
            "by_name",)),
    Mutant("a table of backprop alone relative to itself", "fgkernels/train/report.py",
           "rel = base is not None and len(results) > 1", "rel = base is not None",
           ("tests/train/test_demo_costs.py::test_a_table_of_backprop_alone_gives_its_own_time_"
            "and_memory",)),
    Mutant("--data-dir taken without --data cifar10", "fgkernels/train/cli.py",
           "    if args.data != \"cifar10\" and args.data_dir:", "    if False:",
           ("tests/train/test_train.py::test_bad_flags_name_the_valid_choices",)),
    Mutant("an in-place op's result taken in its own layout", "fgkernels/dual/value.py",
           "result = self._in_own_layout(self._keeping_slots(result))",
           "result = self._keeping_slots(result)",
           ("tests/dual/test_channels_last.py::test_an_in_place_op_keeps_the_dual_s_layout",
            "tests/dual/test_dual_semantics.py::test_an_in_place_op_keeps_a_transposed_dual_s_"
            "strides")),
    Mutant("a write of values without tangent drops the Dual's slots", "fgkernels/dual/value.py",
           "        if result._stack is not None or self._stack is None:\n",
           "        if True:\n",
           ("tests/dual/test_dual_semantics.py::test_a_write_of_values_without_tangent_keeps_the_"
            "dual_s_slots_zeroed",)),
    Mutant("contiguous() of a contiguous Dual copies it", POINTWISE,
           "    if input.primal.is_contiguous(memory_format=memory_format):\n        return input",
           "    if False:\n        return input",
           ("tests/dual/test_dual_semantics.py::test_contiguous_of_a_contiguous_dual_is_the_dual_"
            "itself",)),
    Mutant("an overlapping view written back whole", "fgkernels/dual/value.py",
           "        if self._writes_into_overlap():\n            # The result",
           "        if False:\n            # The result",
           ("tests/dual/test_dual_semantics.py::test_an_in_place_op_on_an_overlapping_view_is_"
            "refused",)),
    Mutant("u[i] = v into an overlapping view writes all of it", "fgkernels/dual/value.py",
           "        if self._writes_into_overlap():\n            part = self[index]",
           "        if False:\n            part = self[index]",
           ("tests/dual/test_dual_semantics.py::test_a_write_into_a_part_of_an_overlapping_view_"
            "writes_that_part",)),
    Mutant("an unfolded view taken for one that does not overlap", "fgkernels/dual/layout.py",
           "        if stride <= reach:\n            return True",
           "        if stride < reach:\n            return True",
           ("tests/dual/test_dual_semantics.py::test_an_in_place_op_on_an_overlapping_view_is_"
            "refused",)),
    Mutant("a view of an expanded view not linked", "fgkernels/dual/value.py",
           "if self._source is not None or (_writable(self.primal) and _writable(self._stack)):",
           "if _writable(self.primal) and _writable(self._stack):",
           ("tests/dual/test_dual_semantics.py::test_a_view_of_an_expanded_view_writes_into_the_"
            "dual",)),
    Mutant("a pass's temporary keeps its shape under an in-place view op",
           "fgkernels/dual/value.py", "            _restride(target, result.primal)\n",
           "            pass\n",
           ("tests/dual/test_tangent_store.py::test_a_tensor_a_pass_filled_from_a_dual_takes_in_"
            "place_view_ops",)),
    Mutant("a parameter reshaped in place on the dual pass", "fgkernels/dual/value.py",
           "        parameter = isinstance(target, torch.nn.Parameter)\n",
           "        parameter = False\n",
           ("tests/dual/test_dual_semantics.py::test_a_parameter_keeps_its_shape_on_the_dual_"
            "pass",)),
    Mutant("an in-place op's slots left in the result's layout", "fgkernels/dual/value.py",
           "        if relay_stack:\n", "        if False:\n",
           ("tests/dual/test_dual_semantics.py::test_an_in_place_op_keeps_a_transposed_dual_s_"
            "strides",)),
    Mutant("an in-place op's result laid out as a primal with gaps", "fgkernels/dual/layout.py",
           "        if stride != expected:\n            return False", "        if False:\n"
           "            return False",
           ("tests/dual/test_dual_semantics.py::test_an_in_place_op_on_an_expanded_dual_takes_"
            "the_result_s_layout",)),
    Mutant("the Triton apply takes what the native convolution computed",
           "fgkernels/backends/triton/backend.py",
           "if h.device.type != \"cuda\" and not INTERPRETED or h.dtype not in DTYPES:",
           "if h.device.type != \"cuda\" and not INTERPRETED:",
           ("tests/backends/test_triton.py::test_a_conv_bn_the_kernel_does_not_serve_is_the_"
            "native_one_whole",)),
    Mutant("an operand without a direction given a zero tangent for it in the fallback",
           "fgkernels/rules/fallback.py", "    if len(groups) == 1:\n", "    if True:\n",
           ("tests/dual/test_dual_semantics.py::test_labelled_directions_an_operand_lacks_"
            "leave_it_constant_in_a_fallback_op",)),
    Mutant("the Triton conv serves an empty output", "fgkernels/backends/triton/ops.py",
           "            and min(_output_shape(x, w, stride, padding, dilation)[2:]) >= 1\n", "",
           ("tests/backends/test_triton.py::test_a_kernel_wider_than_the_padded_input_is_refused_as_torch_refuses_it",)),
]


def _copy_checkout(dest: Path, with_build: bool) -> None:
    """The checkout's tracked files and its built extension into dest; its build folder too
    ``with_build`` (for the C++ mutants' incremental rebuilds)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    for built in (ROOT / "fgkernels").glob("_C*"):
        shutil.copy2(built, dest / "fgkernels" / built.name)
    if with_build and (ROOT / "build").is_dir():
        shutil.copytree(ROOT / "build", dest / "build", symlinks=True)


def _env(copy: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(copy), "FGKERNELS_REQUIRE_NATIVE": "1",
            "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}


def _build(copy: Path) -> None:
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                       env=_env(copy), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the extension did not build in the copy:\n{r.stderr[-3000:]}")


def _pytest(copy: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=copy, env=_env(copy), capture_output=True, text=True)


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
    return lines[-1] if lines else ""


def run(mutants: list[Mutant]) -> int:
    with tempfile.TemporaryDirectory(prefix="fgkernels-mutants-") as tmp:
        copy = Path(tmp)
        _copy_checkout(copy, with_build=any(m.native for m in mutants))
        where = subprocess.run(
            [sys.executable, "-c", "import fgkernels; print(fgkernels.__file__)"], cwd=copy,
            env=_env(copy), capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the copy's tests would import another fgkernels: {where.stdout}"
                             f"{where.stderr}")
        selected = sorted({t for m in mutants for t in m.tests})
        base = _pytest(copy, tuple(selected))
        if base.returncode:
            raise SystemExit(f"the tests fail without any mutant: {_last_line(base)}")
        print(f"unmutated: {_last_line(base)}\n")
        survived = 0
        # The Python mutants first: the C++ ones leave the copy's extension rebuilt.
        for m in sorted(mutants, key=lambda m: m.native):
            file = copy / m.path
            source = file.read_text()
            if source.count(m.old) != 1:
                raise SystemExit(f"{m.name}: the line to mutate is not in {m.path} exactly once "
                                 "(the code changed: update the mutant)")
            file.write_text(source.replace(m.old, m.new))
            try:
                if m.native:
                    _build(copy)
                start = time.perf_counter()
                r = _pytest(copy, m.tests)
            finally:
                file.write_text(source)
            verdict = {0: "SURVIVED", 1: "killed"}.get(r.returncode, f"error {r.returncode}")
            survived += r.returncode != 1
            print(f"{verdict:9s} {m.name} ({m.path}; {time.perf_counter() - start:.0f} s: "
                  f"{_last_line(r)})", flush=True)
    print(f"\n{len(mutants) - survived} of {len(mutants)} mutants killed")
    return 1 if survived else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", action="store_true", help="add the C++ kernels' mutants")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="the mutants whose names contain one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.native or not m.native]
    if args.only:
        mutants = [m for m in mutants if any(w in m.name for w in args.only)]
    import torch  # (imported here: the tests import this module for its mutants alone)
    if not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        for m in mutants:
            if m.needs_amx:
                print(f"left out: {m.name} (its code runs only on a CPU with AMX)")
        mutants = [m for m in mutants if not m.needs_amx]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.path} -> {', '.join(m.tests)}")
        return 0
    if not mutants:
        raise SystemExit("no mutant selected")
    return run(mutants)


if __name__ == "__main__":
    sys.exit(main())
