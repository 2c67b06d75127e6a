"""galore-torch's optimizer and projector, imported once with one bitsandbytes warning quieted.

galore-torch imports bitsandbytes (for its 8-bit AdamW, which convpeft does not use). On a CPU
with AVX512-BF16, bitsandbytes (0.49+) logs a warning while it is imported: its optional 4-bit
CPU matmul kernel needs the ``kernels`` package. No convpeft path runs a 4-bit matmul, yet the
line would land on the stderr of every command that touches GaLore, on some CPUs and not on
others. So that one logger is raised to ERROR for the duration of the import, then restored;
any other warning, and every error, still shows.
"""

from __future__ import annotations

import logging

__all__ = ["GaLoreAdamW", "GaLoreProjector"]

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _import_quietly():
    log = logging.getLogger(_BNB_CPU_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from galore_torch import GaLoreAdamW
        from galore_torch.galore_projector import GaLoreProjector
    finally:
        log.setLevel(level)
    return GaLoreAdamW, GaLoreProjector


GaLoreAdamW, GaLoreProjector = _import_quietly()
