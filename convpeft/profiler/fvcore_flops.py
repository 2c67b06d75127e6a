"""fvcore's forward FLOP count, converted to our convention, as an independent cross-check.

fvcore's ``FlopCountAnalysis`` traces the model with ``torch.jit`` and counts **one FLOP per
multiply-accumulate** for conv, linear and matmul (its docs call them "flops"; they are MACs).
It gets grouped and depthwise convs right in the forward pass (its conv handle reads the weight
shape ``(C_out, C_in/g, k_h, k_w)``), but counts no backward pass and no optimizer. We use it to
confirm our forward figure: ``2 * fvcore MACs == UpdateProfile.flops_forward`` for
conv/linear/matmul, minus the loss.

fvcore also counts batch norm and pooling in the same total; we keep only the MAC-type operators
so the comparison is like for like (our elementwise work is a separate figure).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from convpeft.core.flops import FLOPS_PER_MAC

# fvcore operator names whose count is multiply-accumulates.
_MAC_OPERATORS = ("conv", "linear", "matmul", "addmm", "bmm", "einsum", "baddbmm_")


def _baddbmm_macs(inputs, outputs) -> int:
    """fvcore handle for ``baddbmm_(self, batch1 (b, n, k), batch2 (b, k, m))``: ``b n k m``
    MACs (fvcore has none for it; LoRA's ``conv_B`` accumulates with it, see
    :func:`convpeft.adapters.lora.add_low_rank_`)."""
    from fvcore.nn.jit_handles import get_shape

    b, n, k = get_shape(inputs[1])
    return b * n * k * get_shape(inputs[2])[-1]


def fvcore_forward_flops(model: nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs of ``model(inputs)`` as fvcore counts them, in our 2-FLOPs-per-MAC units.

    Args:
        model: any traceable module (it is run once in its current train/eval mode, no grad).
        inputs: ``(N, C, H, W)`` batch.

    Returns:
        ``{"total": ..., <operator>: ...}`` with only conv/linear/matmul-type operators, each
        already multiplied by :data:`convpeft.core.flops.FLOPS_PER_MAC`.
    """
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings(), torch.no_grad():
        # fvcore traces with torch.jit, which newer torch releases flag as deprecated.
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, (inputs,)).set_op_handle(
            "aten::baddbmm_", _baddbmm_macs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    out = {op: FLOPS_PER_MAC * int(n) for op, n in by_op.items() if op in _MAC_OPERATORS}
    out["total"] = sum(out.values())
    return out
