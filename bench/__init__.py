"""Benchmarks a user can trust: one command, a real lab, the references measured in the same run.

Design notes
- `overlayctl bench WHICH` (or `python -m bench WHICH`) runs throughput, latency, convergence,
  scale, cni or all. Each benchmark builds its own lab (`Lab("b" + 3 random characters)`, so it
  never meets a lab somebody else is running), measures, and tears the lab down in a `finally`.
- Nothing is hard-coded or typed by hand: every figure comes from a run, goes to
  `bench/results/<name>.json` with the machine it ran on and the parameters it used, and the
  table (`bench/results/README.md`) and the plots (`<name>*.png`) are regenerated from those JSON
  files by the same command (`bench report` redraws them without measuring).
- These machines are noisy (2 cores, shared). So every figure is a median of repeated runs with
  its spread (p5/p95 or min/max, and n), the runs of the things being compared are interleaved
  round by round, and every comparison is a ratio taken within one round, then summarised.
- A smoke profile (tiny sizes, 1 s runs) exercises every code path in `make test`
  (tests/integration/test_bench_smoke.py) so the benchmarks cannot rot; it asserts structure,
  never timing.
- Modules: common (stats, progress, results, lab handle), paths (the three data paths and the
  hand-built VXLAN), throughput, latency (+ rr, the request/response tool), convergence, scale
  (+ etcdbulk, the bulk lease writer), report (table and plots), cli.
"""
