"""Kernels: every custom autograd Function of convpeft, above :mod:`convpeft.core` only.

* :mod:`.conv`: frozen convs, pads and per-channel affines that save only what their backward
  needs, and the batch-chunked conv input gradient (``CHUNK_BYTES``);
* :mod:`.masks`: 1-bit masks and the masked activations (ReLU, ReLU6, LeakyReLU, Hardtanh);
* :mod:`.pool`: max pooling that saves one byte per output.

The memory techniques (:mod:`convpeft.memory`) and the adapters (:mod:`convpeft.adapters`) both
call them; keeping them here means a change to a kernel touches one package.
"""
