"""The rank sweep's figures: grouping, file names and the command line
(:mod:`benchmarks.plots.make`, ``python -m benchmarks.plot``), one module per figure kind
(:mod:`benchmarks.plots.flops`, :mod:`benchmarks.plots.memory`, :mod:`benchmarks.plots.accuracy`)
and what they share (:mod:`benchmarks.plots.common`).
"""
