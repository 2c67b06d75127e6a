"""The rank-sweep application: its command line (:mod:`benchmarks.sweep.cli`), grid
(:mod:`benchmarks.sweep.grid`), one configuration's run (:mod:`benchmarks.sweep.config`), where
configurations run (:mod:`benchmarks.sweep.executor`), the runner (:mod:`benchmarks.sweep.runner`,
``python -m benchmarks.rank_sweep``), results files (:mod:`benchmarks.sweep.results`), intervals
over seeds (:mod:`benchmarks.sweep.stats`), findings.md (:mod:`benchmarks.sweep.findings`,
:mod:`benchmarks.sweep.study_findings`) and the rerun check (:mod:`benchmarks.sweep.compare_runs`,
``python -m benchmarks.compare_runs``). Its figures are :mod:`benchmarks.plots`.
"""
