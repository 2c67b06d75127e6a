"""Kernel scratch per op, modelled from shapes: how the analytic profiler predicts a device peak.

A device holds more than the tensors an op returns. On the CPU, oneDNN (PyTorch's conv backend)
reorders a conv's operands into a channel-blocked layout (``nChw16c`` on AVX-512 machines,
``nChw8c`` on AVX2), computes there and reorders back; the blocked copies live only inside the
op, so no tensor shows them, yet they set the peak of a memory-lean update (measured on
MobileNetV2 LoRA lean + checkpointing: the largest depthwise conv's backward held its
grad-output and grad-input in blocked form beside the tensors, 1.41x the tensor-level peak).
On CUDA the same role is played by cuDNN/cuBLAS workspaces.

The model gives each op an *excess* (bytes held at its own peak beyond what it returns), so the
device peak is ``max over ops of (tensors live after the op + its excess)``. Ops are described
from shapes only (:func:`op_features`, also on meta tensors); a conv is keyed by pass, layer kind
(:mod:`convpeft.core.layer_kinds`), whether it is strided and its input's layout
(:func:`_layout`: NCHW, channels-last, or another stride pattern such as a lean backward's shape
stub), and its features are the byte sizes of its operands with channels padded to the layout's
block ``B``:

============  ==============================================================================
pass          features (bytes; ``~`` = channel-padded to ``B``)
============  ==============================================================================
forward       ``max(~in + ~out - out, ~out)``, ``~weight``, ``~in``, ``~out``
backward      ``~grad_out``, ``~grad_in`` (if asked), ``~in`` (if the weight grad is), ``~weight``
other ops     bytes of the inputs, bytes of the outputs
============  ==============================================================================

Each key's coefficients are non-negative least squares over measured excesses
(:func:`fit_scratch`); ``B`` is the one among 1, 8, 16 that fits best. The model also lists every
key it measured; an op of any other kind is predicted from the nearest measured key plus a stated
margin (:data:`UNMEASURED_MARGIN`) and reported as unmeasured, never given zero scratch. The
measurements come from :mod:`.cpu_trace` (every op of a few real updates);
:func:`convpeft.calibrate` runs them on the device at hand and caches the model per (device name,
torch version). A model ships for the CPU
(fitted on the machine named in it); for CUDA no GPU measurement exists yet, so the default
CUDA model predicts no workspace and says so (``source``) until ``calibrate(device="cuda")``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

BLOCKS = (1, 8, 16)
_FAMILY = {"conv_fwd": 4, "conv_bwd": 4}  # features per conv pass; other ops have 2
MAX_COEF = 1e6
"""Largest coefficient a model may hold: a coefficient is scratch bytes per operand byte (the
fitted ones are below 10); anything near this is a damaged file, not a kernel."""


@dataclass(frozen=True)
class OpShape:
    """Shapes of one op, enough for its scratch: ``key`` (e.g. ``conv_bwd/depthwise/s2`` or an
    aten op name), ``elem`` (bytes per element) and, for convs, ``n`` (batch), ``c_in``,
    ``hw_in`` (H*W), ``c_out``, ``hw_out``, ``w`` (weight elements per output channel),
    ``mask`` (backward's output mask: grad input, grad weight); other ops put their input and
    output bytes in ``io``."""

    key: str
    elem: int = 4
    n: int = 0
    c_in: int = 0
    hw_in: int = 0
    c_out: int = 0
    hw_out: int = 0
    w: int = 0
    mask: tuple[bool, bool] = (True, True)
    io: tuple[int, int] = (0, 0)

    @property
    def family(self) -> str:
        return self.key.split("/", 1)[0]


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _conv_kind(c_in: int, groups: int, kernel: tuple[int, ...]) -> str:
    # the vocabulary of convpeft.core.layer_kinds, from the op's arguments instead of a module
    if groups == 1:
        return "pointwise" if all(k == 1 for k in kernel) else "standard"
    return "depthwise" if groups == c_in else "grouped"


def _layout(x: torch.Tensor, kind: str, kernel: tuple[int, ...]) -> str:
    """The key's layout suffix: "" for a contiguous (NCHW) input, ``/cl`` for a channels-last
    one (ConvNeXt's convs after its permuted LayerNorm blocks), ``/cl-k5+`` for a channels-last
    depthwise conv wider than 3x3 and ``/strided`` for any other strides (the zero-stride shape
    stub a memory-lean backward passes, which the kernel first copies to a dense tensor).
    Why: the kernels differ (measured on the AVX-512 CPU: a channels-last 7x7 depthwise
    backward with a weight gradient holds 257x its weight in scratch, whatever the batch;
    the 3x3 one 2x; the NCHW ones about 2x their output gradient), so one fit cannot serve all."""
    if x.is_contiguous():
        return ""
    if x.is_contiguous(memory_format=torch.channels_last):
        return "/cl-k5+" if kind == "depthwise" and max(kernel, default=1) > 3 else "/cl"
    return "/strided"


def op_features(func: object, args: tuple, kwargs: dict, out: object) -> OpShape | None:
    """The :class:`OpShape` of aten op ``func`` called with ``args`` and returning ``out``, or
    None for an op that returns nothing new."""
    name = getattr(func, "__name__", str(func))
    if name in ("convolution.default", "convolution_backward.default"):
        bwd = name.startswith("convolution_backward")
        if bwd:
            gout, x, weight = args[0], args[1], args[2]
            stride, transposed, groups, mask = args[4], args[7], args[9], args[10]
        else:
            x, weight = args[0], args[1]
            stride, transposed, groups = args[3], args[6], args[8]
            gout = out
            mask = (True, True)
        if transposed or x.dim() != 4 or not isinstance(gout, torch.Tensor):
            return OpShape(key=name, io=(sum(_nbytes(a) for a in args), _nbytes(out)))
        kind = _conv_kind(x.shape[1], groups, tuple(weight.shape[2:]))
        strided = "s2" if any(s > 1 for s in stride) else "s1"
        layout = _layout(x, kind, tuple(weight.shape[2:]))
        return OpShape(key=f"{'conv_bwd' if bwd else 'conv_fwd'}/{kind}/{strided}{layout}",
                       elem=x.element_size(), n=x.shape[0], c_in=x.shape[1],
                       hw_in=x.shape[2] * x.shape[3], c_out=gout.shape[1],
                       hw_out=gout.shape[2] * gout.shape[3],
                       w=weight[0].numel(), mask=(bool(mask[0]), bool(mask[1])))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ins = list(args) + list(kwargs.values())
    return OpShape(key=name, io=(sum(_nbytes(a) for a in ins if isinstance(a, torch.Tensor)),
                                 sum(_nbytes(o) for o in outs)))


def features(s: OpShape, block: int) -> list[float]:
    """The model's features of ``s`` with channels padded to ``block`` (module docstring)."""
    if s.family not in _FAMILY:
        return [float(s.io[0]), float(s.io[1])]

    def pad(c: int) -> int:
        return -(-c // block) * block

    per = s.n * s.elem
    xb = per * pad(s.c_in) * s.hw_in
    y, yb = per * s.c_out * s.hw_out, per * pad(s.c_out) * s.hw_out
    wb = pad(s.c_out) * s.w * s.elem
    if s.family == "conv_fwd":
        return [float(max(xb + yb - y, yb)), float(wb), float(xb), float(yb)]
    return [float(yb), float(xb if s.mask[0] else 0), float(xb if s.mask[1] else 0), float(wb)]


UNMEASURED_MARGIN = 1.0
"""Scratch added, in units of an op's largest operand (conv: output gradient, input or weight,
channel-padded; other ops: all inputs or all outputs), for an op kind the device model never
measured. Why 1x: what the unmeasured kinds met so far hold (LayerNorm's backward: 1x its
output; a stride-2 grouped conv's backward: 2x its input, of which the conv family's fit covers
about 1.3x); a kernel far outside that (a workspace per weight) needs a calibration."""


def _fallbacks(key: str) -> list[str]:
    """``key``, then it without its layout suffix, then its family (conv keys)."""
    parts = key.split("/")
    out = [key]
    if len(parts) > 3:
        out.append("/".join(parts[:3]))
    if len(parts) > 1:
        out.append(parts[0])
    return out


def largest_operand(s: OpShape, block: int) -> int:
    """Bytes of ``s``'s largest operand (see :data:`UNMEASURED_MARGIN`)."""
    if s.family not in _FAMILY:
        return max(s.io)
    f = features(s, block)
    if s.family == "conv_fwd":  # [max(..), weight, input, output]
        return int(max(f[1:]))
    per = s.n * s.elem
    xb = per * (-(-s.c_in // block) * block) * s.hw_in
    return int(max(f[0], xb, f[3]))


@dataclass
class ScratchModel:
    """Predicted excess bytes per op (see the module docstring). ``coef`` maps a key (or a
    family, the fallback) to its feature coefficients; ``source`` says where the fit comes from
    (device name, torch version, or that it is an uncalibrated default). ``measured``: every
    key the calibration saw, whatever its excess (None: not recorded, as in calibrations from
    before it was; then no op counts as unmeasured). An op whose key is not in it is predicted
    from the nearest measured key (without the layout suffix, then the conv family) plus
    :data:`UNMEASURED_MARGIN` of its largest operand, and :meth:`unmeasured` says so."""

    device: str
    block: int = 1
    coef: dict[str, list[float]] = field(default_factory=dict)
    source: str = "uncalibrated: no kernel scratch modelled"
    measured: list[str] | None = None

    def unmeasured(self, s: OpShape | None) -> bool:
        """Whether ``s``'s op kind is one the calibration never measured. An aten op and its
        in-place twin (``relu.default``, ``relu_.default``) count as one kind: the same kernel,
        writing into a fresh output or into its input."""
        if s is None or self.measured is None or s.key in self.measured:
            return False
        name, dot, overload = s.key.partition(".")
        if "/" in s.key or not dot:
            return True
        twin = (name[:-1] if name.endswith("_") else name + "_") + dot + overload
        return twin not in self.measured

    def __post_init__(self) -> None:
        # a model that cannot predict a finite, non-negative byte count is refused here, so a
        # damaged cache fails where it is read (and is skipped there), not inside a plan
        if not isinstance(self.device, str) or not isinstance(self.source, str):
            raise ValueError("device and source must be strings")
        if isinstance(self.block, bool) or self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(map(str, BLOCKS))} "
                             f"(got {self.block!r})")
        if not isinstance(self.coef, dict):
            raise ValueError(f"coef must be a dict, got {type(self.coef).__name__}")
        for key, c in self.coef.items():
            want = _FAMILY.get(key.split("/", 1)[0], 2)
            if not isinstance(c, (list, tuple)) or len(c) != want:
                raise ValueError(f"coef[{key!r}] must be a list of {want} numbers (got {c!r})")
            for x in c:
                if isinstance(x, bool) or not isinstance(x, (int, float)) \
                        or not 0.0 <= x <= MAX_COEF:  # NaN fails every comparison
                    raise ValueError(f"coef[{key!r}] holds {x!r}; coefficients are finite "
                                     f"numbers in [0, {MAX_COEF:g}]")

    def predict(self, s: OpShape | None) -> int:
        """Predicted excess of one op in bytes: its key's fit (else the nearest measured key's;
        0 for an op measured without scratch), plus the margin when :meth:`unmeasured`."""
        if s is None:
            return 0
        c = next((self.coef[k] for k in _fallbacks(s.key) if self.coef.get(k)), None)
        base = int(sum(a * f for a, f in zip(c, features(s, self.block), strict=False))) if c \
            else 0
        if self.unmeasured(s):
            base += int(UNMEASURED_MARGIN * largest_operand(s, self.block))
        return base

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScratchModel:
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("coef"), dict):
            raise ValueError("not a scratch model: expected an object with a 'coef' object")
        block = d["block"]
        if isinstance(block, float) and block.is_integer():
            block = int(block)
        measured = d.get("measured")
        return cls(device=str(d["device"]), block=block,
                   coef={str(k): [float(x) for x in v] for k, v in d["coef"].items()},
                   source=str(d["source"]),
                   measured=None if measured is None else sorted(str(k) for k in measured))


def _nnls(rows: list[list[float]], ys: list[float]) -> list[float]:
    import numpy as np
    from scipy.optimize import nnls

    a = np.asarray(rows, dtype=float)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(a / scale, np.asarray(ys, dtype=float))
    return [float(v) for v in x / scale]


def fit_scratch(samples: list[tuple[OpShape, int]], *, device: str, source: str,
                min_excess: int = 0) -> ScratchModel:
    """Fit a :class:`ScratchModel` to measured ``(shape, excess)`` pairs: per key and, as the
    fallback for unseen keys, per conv family; the block from :data:`BLOCKS` with the least
    total absolute error. Ops whose measured excess never exceeds ``min_excess`` get no term."""
    best: tuple[float, ScratchModel] | None = None
    groups: dict[str, list[tuple[OpShape, int]]] = {}
    for s, e in samples:
        groups.setdefault(s.key, []).append((s, e))
        if s.family in _FAMILY:
            groups.setdefault(s.family, []).append((s, e))
    groups = {k: v for k, v in groups.items() if max(e for _, e in v) > min_excess}
    for block in BLOCKS:
        coef: dict[str, list[float]] = {}
        err = 0.0
        for key, rows in groups.items():
            xs = [features(s, block) for s, _ in rows]
            ys = [float(e) for _, e in rows]
            coef[key] = _nnls(xs, ys)
            if "/" in key or key not in _FAMILY:
                err += sum(abs(sum(a * f for a, f in zip(coef[key], x, strict=False)) - y)
                           for x, y in zip(xs, ys, strict=False))
        model = ScratchModel(device=device, block=block, coef=coef, source=source,
                             measured=sorted({s.key for s, _ in samples}))
        if best is None or err < best[0] - 1e-9 * max(1.0, best[0]):
            best = (err, model)
    assert best is not None
    return best[1]


# -- shipped defaults and the calibration cache ----------------------------------------------
_DEFAULTS = Path(__file__).with_name("scratch_defaults")


def device_name(device: torch.device | str) -> str:
    """A stable name of the device kind: the CPU model (``/proc/cpuinfo``) or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        import platform
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def _cache_file(device: torch.device | str) -> Path:
    from convpeft.core.paths import resolve_cache_dir

    slug = "".join(ch if ch.isalnum() else "_" for ch in device_name(device))[:80]
    return resolve_cache_dir() / "scratch" / f"{torch.device(device).type}-{slug}-" \
        f"torch{torch.__version__.split('+')[0]}.json"


def default_model(device: torch.device | str) -> ScratchModel:
    """The shipped model for ``device``'s type (see the module docstring)."""
    kind = torch.device(device).type
    path = _DEFAULTS / f"{kind}.json"
    if path.is_file():
        return ScratchModel.from_json(path.read_text())
    return ScratchModel(device=kind)


def scratch_model(device: torch.device | str = "cpu") -> ScratchModel:
    """The model the analytic profiler uses for ``device``: this device's calibration if
    :func:`convpeft.calibrate` cached one for it (same device name and torch version), else the
    shipped default for its type."""
    path = _cache_file(device)
    if path.is_file():
        try:
            return ScratchModel.from_json(path.read_text())
        except (ValueError, KeyError, TypeError, OverflowError, OSError,
                UnicodeDecodeError) as e:
            # a damaged cache entry is skipped, not fatal (one bad file would otherwise break
            # every plan on the machine), and said so: the plan then uses the shipped default
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"ignoring the damaged device-model cache {path} ({first[:200]}); "
                          "using the shipped default. Delete the file, or rerun "
                          "`python -m convpeft.plan --calibrate` to rebuild it",
                          RuntimeWarning, stacklevel=2)
    return default_model(device)


def save_calibration(model: ScratchModel, device: torch.device | str) -> Path:
    """Write ``model`` to the calibration cache for ``device`` and return the path: atomically
    and never through a link (the new file is written under a fresh temporary name and
    renamed over the entry, :func:`convpeft.adapters.files.write_files`), so a symlink planted
    in the cache cannot redirect the write to a file outside it."""
    from convpeft.adapters.files import write_files

    path = _cache_file(device)
    write_files(path.parent, {path.name: model.to_json().encode()})
    return path


def relative_error(predicted: float, measured: float) -> float:
    """``predicted / measured - 1`` (inf when nothing was measured)."""
    return predicted / measured - 1 if measured else math.inf
