"""FLOP counting keyed on aten ops, right for grouped/depthwise convs and frozen layers.

The counter sees every aten op of a training update below autograd (through a
``TorchDispatchMode``), so it counts exactly the products autograd really runs:

* ``aten.convolution`` -- forward, ``2 * out.numel() * (C_in/g) * k_h * k_w`` (2 FLOPs per MAC,
  :mod:`convpeft.core.flops`). Transposed convs: ``2 * in.numel() * (C_out/g) * k_h * k_w``.
* ``aten.convolution_backward`` -- its ``output_mask`` says which gradients autograd asked for:
  ``mask[0]`` the input gradient (False for the first layer or after a frozen prefix), ``mask[1]``
  the weight gradient (False for a frozen weight). Each costs as much as the forward, *including*
  the ``1/g`` factor of grouped convs. torch's ``FlopCounterMode`` charges the weight gradient of
  a grouped conv as if it were dense, which is why its figure for depthwise nets is ~30x off.
* ``mm``/``addmm``/``bmm``/``baddbmm(_)``/``mv``/``addmv``/``dot`` -- ``2 * m * k * n``; the bias
  add of ``addmm`` goes to the elementwise figure (torch's counter leaves it out, other counters
  add it to the matmul). ``matmul``/``linear``/``einsum`` decompose into these before we see them.
  In the backward pass a product with a parameter as an operand (``grad_y @ W``) is an *input*
  gradient, a product without one (``grad_y^T @ x``) is a *weight* gradient.
* ``linalg_svd``/``_linalg_svd`` -- :func:`convpeft.core.flops.svd_flops` (GaLore's projection
refresh).

Conv subclasses need no special case: timm's TF-"SAME" ``Conv2dSame`` pads with
``constant_pad_nd`` (free) and the conv that follows is counted on the padded input, as it runs;
weight standardisation (``StdConv2d``/``ScaledStdConv2d``) is a batch norm over the weight, so
it lands in the elementwise figure (``6 * weight.numel()`` forward, ``8 *`` backward where the
weight trains).

A checkpointed block (:mod:`convpeft.memory.checkpoint`) re-runs its forward during backward; those
ops are booked as forward work (``flops_forward``, elementwise ``forward``), so a checkpointed
update's forward figure is the plain one plus the recomputed blocks' forward.

Elementwise work is tallied separately and never added to the figures above (see
:data:`BN_FORWARD_PER_ELEMENT` and :func:`elementwise_flops` for the per-op rules): one FLOP per
output element of each pointwise op (in-place optimizer updates included), one per *input* element
of reductions and pooling, a documented constant per element for batch norm and softmax, nothing
for views, copies and tensor creation.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry as _TORCH_FLOP_REGISTRY

from convpeft.core.flops import FLOPS_PER_MAC, svd_flops
from convpeft.memory.checkpoint import recomputing
from convpeft.profiler.memory import storage_key

aten = torch.ops.aten

PHASES = ("forward", "backward", "optimizer")

BN_FORWARD_PER_ELEMENT = 6
"""Training-mode batch norm forward: 2 for the mean/variance reductions, 4 for
``(x - mean) * invstd * gamma + beta``."""
BN_BACKWARD_PER_ELEMENT = 8
"""Batch norm backward: 3 for the reductions (sum g, sum g*xhat, xhat), 5 for
``(g - mean_g - xhat * mean_gxhat) * invstd * gamma``."""
SOFTMAX_PER_ELEMENT = 3
"""(log-)softmax forward or backward: max/sum reductions plus one exp/sub per element."""

_MATMUL_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.baddbmm_.default,  # LoRA's conv_B accumulating into the base output (adapters.lora)
    aten.mv.default,
    aten.addmv.default,
    aten.dot.default,
}
_SVD_OPS = {aten._linalg_svd.default, aten.linalg_svd.default}
_FREE_OPS = {
    # data movement, creation and bookkeeping: no arithmetic
    aten.clone.default, aten.copy_.default, aten._to_copy.default, aten.detach.default,
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.zeros.default, aten.zeros_like.default, aten.ones.default, aten.ones_like.default,
    aten.full.default, aten.full_like.default, aten.fill_.Scalar, aten.fill_.Tensor,
    aten.zero_.default, aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_full.default, aten.new_empty_strided.default, aten.lift_fresh.default,
    aten.lift_fresh_copy.default, aten.cat.default, aten.stack.default,
    aten._local_scalar_dense.default, aten.scalar_tensor.default, aten.index_select.default,
    aten.constant_pad_nd.default, aten.alias.default,
    aten.set_.source_Storage, aten.resize_.default, aten.randn.default, aten.rand.default,
    aten.bernoulli_.float, aten.randint.low, aten.arange.default, aten.arange.start,
    aten.slice_scatter.default, aten.select_scatter.default,
}
_REDUCTION_OPS = {
    aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim,
    aten.var.correction, aten.var_mean.correction, aten.amax.default, aten.amin.default,
    aten.max.default, aten.min.default, aten.norm.Scalar, aten.norm.ScalarOpt_dim,
    aten.linalg_vector_norm.default, aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d_backward.default, aten.avg_pool2d.default,
    aten.avg_pool2d_backward.default, aten.max_pool2d_with_indices.default,
    aten.max_pool2d_with_indices_backward.default, aten.nll_loss_forward.default,
    aten.nll_loss_backward.default,
}
_BN_FORWARD_OPS = {
    aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats, aten._native_batch_norm_legit_functional.default,
    aten._batch_norm_with_update.default, aten._native_batch_norm_legit_no_training.default,
    aten._batch_norm_no_update.default,
}
_BN_BACKWARD_OPS = {aten.native_batch_norm_backward.default, aten.batch_norm_backward.default}
_SOFTMAX_OPS = {
    aten._softmax.default, aten._log_softmax.default, aten._softmax_backward_data.default,
    aten._log_softmax_backward_data.default,
}


def _numel(x: object) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _tensors(x: object) -> list[torch.Tensor]:
    """Tensors in an op's output (a tensor, or a tuple/list nesting them)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) or t is None for t in x):
        return [t for t in x if t is not None]
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def conv_forward_flops(x_shape: Iterable[int], w_shape: Iterable[int], out_shape: Iterable[int],
                       transposed: bool) -> int:
    """FLOPs of one ``aten.convolution`` from shapes: ``2 * out.numel() * (C_in/g) * prod(k)``.

    ``w_shape`` is ``(C_out, C_in/g, *k)`` (``(C_in, C_out/g, *k)`` when transposed), so the
    group count never needs to be passed: it is already in the weight's second dimension.
    """
    w = list(w_shape)
    per_out = w[1] * math.prod(w[2:])
    # a transposed conv scatters each *input* element over (C_out/g) * prod(k) outputs
    n = math.prod(x_shape) if transposed else math.prod(out_shape)
    return FLOPS_PER_MAC * n * per_out


def matmul_op_flops(func: object, args: tuple) -> int:
    """FLOPs of the product in one matmul-family op (2 FLOPs/MAC; bias adds excluded)."""
    if func in (aten.mm.default,):
        a, b = args[0], args[1]
        return FLOPS_PER_MAC * a.shape[0] * a.shape[1] * b.shape[1]
    if func in (aten.addmm.default,):
        a, b = args[1], args[2]
        return FLOPS_PER_MAC * a.shape[0] * a.shape[1] * b.shape[1]
    if func in (aten.bmm.default,):
        a, b = args[0], args[1]
        return FLOPS_PER_MAC * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if func in (aten.baddbmm.default, aten.baddbmm_.default):
        a, b = args[1], args[2]
        return FLOPS_PER_MAC * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if func in (aten.mv.default,):
        return FLOPS_PER_MAC * args[0].numel()
    if func in (aten.addmv.default,):
        return FLOPS_PER_MAC * args[1].numel()
    if func in (aten.dot.default,):
        return FLOPS_PER_MAC * args[0].numel()
    raise KeyError(func)


def _foreach_rule(args: tuple, out: object) -> int:
    # one FLOP per element of the tensor list being updated (optimizer arithmetic)
    first = args[0] if args else []
    return sum(_numel(t) for t in first) if isinstance(first, (list, tuple)) else 0


def _pointwise_rule(args: tuple, out: object) -> int:
    outs = _tensors(out)
    if not outs or not any(t.is_floating_point() for t in outs):
        return 0  # integer/bool bookkeeping (indices, masks)
    return max(t.numel() for t in outs)


def _elementwise_rule(func: object):
    """The rule :func:`elementwise_flops` applies to ``func``: a callable ``(args, out) -> int``,
    or None for an op without arithmetic (views, copies, creation)."""
    if func in _FREE_OPS or getattr(func, "is_view", False):
        return None
    if getattr(func, "__name__", "").startswith("_foreach_"):
        return _foreach_rule
    if func in _BN_FORWARD_OPS:
        return lambda args, out: BN_FORWARD_PER_ELEMENT * _numel(args[0])
    if func in _BN_BACKWARD_OPS:
        return lambda args, out: BN_BACKWARD_PER_ELEMENT * _numel(args[1])
    if func in _SOFTMAX_OPS:
        return lambda args, out: SOFTMAX_PER_ELEMENT * _numel(args[0])
    if func in _REDUCTION_OPS:
        return lambda args, out: _numel(args[0])
    return _pointwise_rule


def elementwise_flops(func: object, args: tuple, kwargs: dict, out: object) -> int:
    """The elementwise FLOPs we tally for one op that is not a conv/matmul/SVD (see module doc)."""
    rule = _op_info(func).rule
    return 0 if rule is None else rule(args, out)


# What record() needs to know about an op, worked out once per op: the profiler sees thousands
# of ops per update but only a few dozen distinct ones, and an OpOverload hashes in Python.
_CONV, _CONV_BACKWARD, _MATMUL, _SVD, _OTHER = range(5)


@dataclass(frozen=True)
class _OpInfo:
    func: object  # kept so the id() this is cached under cannot be reused
    kind: int
    rule: object  # elementwise rule (see _elementwise_rule), None: no arithmetic
    name: str
    torch_formula: object  # torch FlopCounterMode's formula (see _torch_formula), or None
    accumulates: bool  # addmm/baddbmm/addmv: an elementwise add on top of the product


_OP_INFO: dict[int, _OpInfo] = {}


def _shapes(x: object) -> object:
    """``x`` with every tensor replaced by its shape (what torch's flop formulas take)."""
    if isinstance(x, torch.Tensor):
        return x.shape
    if isinstance(x, (list, tuple)):
        return type(x)(_shapes(e) for e in x)
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return x


def _torch_formula(func: object):
    """torch FlopCounterMode's formula for ``func`` as ``(args, kwargs, out) -> flops``, or None.
    The registry's entries map tensors to shapes through pytree on every call; calling the
    function they wrap (``__wrapped__``) with shapes mapped here gives the same figure cheaper."""
    formula = _TORCH_FLOP_REGISTRY.get(getattr(func, "overloadpacket", None))
    if formula is None:
        return None
    raw = getattr(formula, "__wrapped__", None)
    if raw is None:
        return lambda args, kwargs, out: formula(*args, **kwargs, out_val=out)
    return lambda args, kwargs, out: raw(*_shapes(args), out_shape=_shapes(out),
                                         **_shapes(kwargs))


def _op_info(func: object) -> _OpInfo:
    info = _OP_INFO.get(id(func))
    if info is None:
        kind = (_CONV if func is aten.convolution.default
                else _CONV_BACKWARD if func is aten.convolution_backward.default
                else _MATMUL if func in _MATMUL_OPS else _SVD if func in _SVD_OPS else _OTHER)
        info = _OP_INFO[id(func)] = _OpInfo(
            func, kind, _elementwise_rule(func) if kind == _OTHER else None, str(func),
            _torch_formula(func),
            func in (aten.addmm.default, aten.baddbmm.default, aten.baddbmm_.default,
                     aten.addmv.default))
    return info


@dataclass
class FlopTally:
    """FLOPs of one update by pass. ``elementwise`` maps phase -> elementwise FLOPs."""

    forward: int = 0
    backward_input: int = 0
    backward_weight: int = 0
    optimizer: int = 0  # matmuls run by the optimizer (GaLore projections)
    optimizer_svd: int = 0  # SVDs run by the optimizer (GaLore refresh), measured
    torch: int = 0  # torch FlopCounterMode's formulas over the same ops (if asked for)
    elementwise: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    elementwise_by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)
    layer_kinds: dict[str, str | None] = field(default_factory=dict)

    @property
    def backward(self) -> int:
        return self.backward_input + self.backward_weight

    def _layer(self, name: str) -> dict[str, int]:
        row = self.per_layer.get(name)
        if row is None:
            row = self.per_layer[name] = dict.fromkeys(
                ("forward", "backward_input", "backward_weight", "elementwise"), 0)
        return row


class FlopCounter:
    """Accumulates :class:`FlopTally` from ``(func, args, kwargs, out)`` of dispatched aten ops.

    Not a mode itself so the profiler can drive FLOP counting and memory tracking from a single
    dispatch mode (one Python call per op instead of two). Use :class:`CountFlops` for a
    stand-alone context manager. ``phase`` is set by the driver ("forward", "backward",
    "optimizer"). ``param_keys`` are storage ids (:func:`.memory.storage_key`) of the model's
    parameters, used to tell input-gradient from weight-gradient products in the backward pass;
    under autocast the low-precision copies of parameters (``aten._to_copy`` of one) count as
    them while they live, so the split does not change with the compute dtype.
    ``layer_of`` (optional) returns the layer an op belongs to, for per-layer figures.
    """

    def __init__(self, param_keys: set[int] | None = None, layer_of=None,
                 torch_flops: bool = False) -> None:
        self.tally = FlopTally()
        self.phase = "forward"
        self.param_keys = set(param_keys or ())
        self._copy_refs: list[weakref.ref] = []
        self.layer_of = layer_of
        # also sum what torch's FlopCounterMode would report, by calling its per-op formulas
        # (``flop_registry``) here instead of running a second dispatch mode + module tracker
        self.torch_flops = torch_flops

    def _is_param(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and storage_key(t) in self.param_keys

    def _add_param_copy(self, t: torch.Tensor) -> None:
        """A dtype copy of a parameter (autocast's bf16/fp16 weight) stands for it in the
        backward products; its key is dropped when the copy is freed (a later storage may get
        the same address)."""
        key = storage_key(t)
        if key in self.param_keys:
            return
        self.param_keys.add(key)
        self._copy_refs.append(weakref.ref(t.untyped_storage(),
                                           lambda _r, k=key: self.param_keys.discard(k)))

    def record(self, func: object, args: tuple, kwargs: dict, out: object) -> None:
        """Add the FLOPs of one dispatched op to the tally."""
        t = self.tally
        info = _op_info(func)
        kind = info.kind
        phase = self.phase
        if phase == "backward" and recomputing():
            phase = "forward"  # a checkpointed block re-running its forward: forward work
        if self.torch_flops and info.torch_formula is not None:
            t.torch += int(info.torch_formula(args, kwargs, out))
        layer = self.layer_of() if self.layer_of is not None else None
        fw = bi = bw = ew = 0
        if kind == _OTHER:
            if func is aten._to_copy.default and self._is_param(args[0]):
                self._add_param_copy(out)
            rule = info.rule
            if rule is None:  # views, copies, creation: nothing to add anywhere
                return
            ew = rule(args, out)
            if ew:
                t.elementwise_by_op[info.name] += ew
        elif kind == _CONV:
            x, w, bias = args[0], args[1], args[2]
            transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get("transposed", False))
            fw = conv_forward_flops(x.shape, w.shape, out.shape, transposed)
            if bias is not None:
                ew = out.numel()  # bias add
        elif kind == _CONV_BACKWARD:
            grad_out, x, w = args[0], args[1], args[2]
            transposed = bool(args[7])
            mask = args[10]
            f = conv_forward_flops(x.shape, w.shape, grad_out.shape, transposed)
            bi = f if mask[0] else 0
            bw = f if mask[1] else 0
            if mask[2]:
                ew = grad_out.numel()  # bias gradient is a reduction over grad_out
        elif kind == _MATMUL:
            f = matmul_op_flops(func, args)
            if info.accumulates:
                ew = _numel(out)  # the bias/accumulator add
            if phase == "backward":
                operands = args[1:3] if info.accumulates else args[0:2]
                if any(self._is_param(o) for o in operands):
                    bi = f
                else:
                    bw = f
            else:
                fw = f
        else:  # _SVD
            a = args[0]
            m, n = a.shape[-2], a.shape[-1]
            f = svd_flops(m, n) * math.prod(a.shape[:-2])
            if phase == "optimizer":
                t.optimizer_svd += f
            else:
                fw = f
        if phase == "optimizer":
            # anything the optimizer multiplies (GaLore projections) is optimizer work
            t.optimizer += fw + bi + bw
        else:
            t.forward += fw
            t.backward_input += bi
            t.backward_weight += bw
        t.elementwise[phase] += ew
        if layer is not None and phase != "optimizer" and (fw or bi or bw or ew):
            row = t._layer(layer)
            row["forward"] += fw
            row["backward_input"] += bi
            row["backward_weight"] += bw
            row["elementwise"] += ew


class CountFlops(TorchDispatchMode):
    """Stand-alone FLOP counting context: ``with CountFlops(model) as c: ...; c.tally``.

    Set ``c.phase`` to ``"backward"``/``"optimizer"`` around those parts to split the figures
    (the profiler does this for you).
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        keys = set()
        if model is not None:
            keys = {storage_key(p) for p in model.parameters()}
        self.counter = FlopCounter(keys)

    @property
    def tally(self) -> FlopTally:
        return self.counter.tally

    @property
    def phase(self) -> str:
        return self.counter.phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {value!r}")
        self.counter.phase = value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter.record(func, args, kwargs, out)
        return out
