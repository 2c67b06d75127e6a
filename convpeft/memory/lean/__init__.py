"""Memory-lean activations: frozen layers save only what their backward pass needs.

Autograd saves what an op's backward *could* need, not what this update needs. Once most of a
CNN is frozen (head-only, BitFit, LoRA/DoRA, BN frozen) that is most of the activation memory:

* a conv whose weight and bias are frozen still saves its whole input, though the input
  gradient needs only the weight: ``grad_x = conv_transpose(grad_y, W)``;
* a BatchNorm in eval mode with a frozen (or no) affine saves its input, though it is the
  per-channel affine map ``y = x * s + t`` whose input gradient is ``grad_y * s``;
* ReLU, ReLU6, LeakyReLU and Hardtanh save a full fp32 tensor where one bit per element
  (where the gradient passes, or which slope applies) carries the same information;
* MaxPool2d saves its input and int64 argmax indices, though backward reads only the indices,
  and the argmax's offset inside its window fits one byte (:mod:`.pool`).

:func:`lean_activations` swaps, in place, the ``forward`` of such modules for one that runs
through a small autograd Function saving only that: the (already resident) frozen weight, the
per-channel scale, a packed 1-bit mask (32x smaller than fp32), or a byte per pooled output.
A ReLU / ReLU6 / Hardtanh whose output the next layer saves anyway (an adapted or trainable
conv keeps its input) keeps that output instead of a mask, which would only add 1/32 of it;
one forward of a meta copy finds them (:mod:`.probe`), and checkpointed blocks keep masks.
Outputs and every gradient are those of the plain model (the same kernels run, in the same
order). Nothing is re-parameterised: ``state_dict`` keys and values are unchanged, and
:meth:`LeanReport.undo` (or :func:`restore_activations`) puts the plain ``forward`` back.

What stays plain, and why:

* a conv that is the ``base_layer`` of an adapter: the adapter's ``A`` needs the input for its
  own gradient, and the wrapper computes both from the one saved tensor (never saved twice);
* a subclass of ``nn.BatchNorm2d``/``nn.ReLU``/... (its ``forward`` may do more than the op
  we replace), an ``nn.Conv2d`` subclass with its own ``forward`` that
  :mod:`convpeft.core.conv_variants` does not describe or with a parametrised weight (a row says
  so), a BN with a trainable scale (its gradient needs the normalised input; a trainable
  *bias* alone, as in BitFit, is lean: its gradient is a sum of ``grad_y``), and a BN while it
  is in train mode (batch statistics need the input; checked on every call, so
  ``model.train()``/``eval()`` after this works as expected);
* a layer made lean and *unfrozen later*: its lean forward checks ``requires_grad`` on every
  call, warns once and runs the plain forward, so a gradient is never silently wrong.

Registered conv variants (timm's TF-"SAME" ``Conv2dSame``, the weight-standardised
``StdConv2d``/``ScaledStdConv2d`` and their "Same" forms) are lean too, padded and standardised
as their own forward does; a standardised conv saves its effective weight (weight-sized) for
the input gradient instead of its input. Any conv geometry is lean: groups, dilation, stride,
``padding='same'``/``'valid'`` and every ``padding_mode`` (torch's reflect/replicate pad saves
its input too; :func:`pad2d` does not).
In-place activations stay in place. Functional calls inside a ``forward`` (``F.relu(x)``) are
not seen, only modules: torchvision's ResNets, MobileNetV2/V3, VGG, ShuffleNetV2, MNASNet and
RegNet use modules only; DenseNet's final ReLU and GoogLeNet/Inception's ``BasicConv2d`` call
``F.relu`` (those stay plain). MobileNetV3's Hardswish and EfficientNet's SiLU need their input for
the gradient and stay as they are (so does MobileNetV3's Hardsigmoid, which only sees pooled
``(N, C, 1, 1)`` tensors).

Layout: :mod:`.functions` (conv, pad and norm Functions), :mod:`.masks` (1-bit masks and the
activation Functions), :mod:`.pool` (max pooling), :mod:`.probe` (which activations' outputs
are saved downstream), :mod:`.model`
(:func:`lean_activations`, :class:`LeanReport`, :func:`restore_activations`), :mod:`.saved`
(:func:`saved_bytes_by_layer`).

Works on the ``meta`` device (no data-dependent Python), so the profiler's analytic mode
predicts the memory of lean updates.
"""

from convpeft.memory.lean.model import LeanReport, LeanRow, lean_activations, restore_activations
from convpeft.memory.lean.saved import saved_bytes_by_layer
from convpeft.ops.conv import frozen_conv2d, pad2d
from convpeft.ops.masks import pack_mask, unpack_mask
from convpeft.ops.pool import max_pool2d_lean

__all__ = ["LeanReport", "LeanRow", "frozen_conv2d", "lean_activations", "max_pool2d_lean",
           "pack_mask", "pad2d", "restore_activations", "saved_bytes_by_layer", "unpack_mask"]
