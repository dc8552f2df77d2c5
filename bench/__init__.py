"""gift_fast benchmark suite: every method timed side by side in one process.

Modules, one responsibility each:
  inputs.py   shapes, layouts (dense / RL groups with prompt tokens masked), random and peaked inputs
  methods.py  the registry of methods (engines x loss epilogues, fused losses, the bare GEMM)
  timing.py   median time and peak incremental memory (CUDA events, or clearly-labelled CPU smoke)
  audit.py    relative error of loss, dX, dW against a float64 reference on a small shape
  report.py   JSON, markdown table and PNG plots
  run_suite.py  the command line (``python -m bench.run_suite --smoke`` / ``--full``)
"""
