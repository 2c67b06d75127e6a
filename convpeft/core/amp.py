"""Mixed precision (``torch.autocast``): the ``--amp`` choice, its context and GradScaler, and
the casting rule every custom autograd Function of convpeft follows.

``amp`` is ``"off"`` (fp32), ``"bf16"`` or ``"fp16"``. bf16 runs on CPU and CUDA; fp16 only on
CUDA (CPU autocast has no useful fp16 kernels for convs), where it needs a
:class:`torch.amp.GradScaler` against gradient underflow (:func:`grad_scaler`).

Custom Functions and autocast. Autocast casts at the *op* level, so a custom
``torch.autograd.Function`` sees its inputs in their stored dtypes (fp32 parameters, a bf16
activation), and its backward runs with autocast off. ``torch.amp.custom_fwd`` fixes this but
is bound to one ``device_type`` at decoration time, while our Functions run on CPU, CUDA and
the ``meta`` device (analytic profiler). They therefore cast explicitly:

* forward: :func:`autocast_dtype` gives the dtype autocast would run a conv in on the input's
  device (``None`` outside autocast); every floating input is cast to it with :func:`cast`,
  and the body runs with autocast off, so each op runs once, in that dtype;
* backward: computes in the same dtype and returns each gradient in the dtype its input had
  (fp32 parameters get fp32 gradients, exactly as autocast's own casts would give them).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_MODES", "amp_dtype", "autocast", "autocast_dtype", "cast", "check_amp",
           "grad_scaler", "no_autocast"]

AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")
_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST_DEVICES = ("cpu", "cuda")


def amp_dtype(amp: str) -> torch.dtype | None:
    """The compute dtype of ``amp`` (``None`` for ``"off"``)."""
    if amp not in _DTYPES:
        raise ValueError(f"amp={amp!r}: choose one of {', '.join(AMP_MODES)}")
    return _DTYPES[amp]


def check_amp(amp: str, device: torch.device | str) -> None:
    """Refuse an ``amp`` the device cannot run, with what to use instead."""
    dtype = amp_dtype(amp)
    dev = torch.device(device).type
    if dtype is None:
        return
    if dev not in _AUTOCAST_DEVICES:
        raise ValueError(f"amp={amp!r} on device {dev!r}: autocast runs on cpu and cuda only; "
                         "use amp='off'")
    if dev == "cpu" and dtype == torch.float16:
        raise ValueError("amp='fp16' is not supported on the CPU (no fp16 conv kernels there, "
                         "and CPU autocast does not scale losses); use amp='bf16' on the CPU, "
                         "or fp16 on a CUDA device")
    if dev == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ValueError("amp='bf16': this CUDA device has no bf16 support; use amp='fp16'")


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` on ``device`` (a no-op context for ``"off"``); checked
    with :func:`check_amp` first."""
    check_amp(amp, device)
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, amp: str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16 on CUDA (fp16 gradients underflow without loss scaling);
    ``None`` otherwise (fp32 and bf16 have fp32's exponent range)."""
    check_amp(amp, device)
    if amp == "fp16":
        return torch.amp.GradScaler(torch.device(device).type)
    return None


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a conv/matmul on ``x``'s device in, or ``None`` when autocast is
    off there, ``x`` is not a float32/16 tensor (autocast leaves float64 alone), or the device
    has no autocast (``meta``)."""
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICES or x.dtype == torch.float64 or not x.is_floating_point():
        return None
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` in ``dtype`` (``None`` and non-float tensors pass through; ``dtype=None``: as is)."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device for the body of a Function that has cast its inputs."""
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(dev, enabled=False)
