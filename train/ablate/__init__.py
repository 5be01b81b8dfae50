"""`observe-r1 ablate MATRIX --out DIR`: every cell of an ablation matrix, trained and evaluated over seeds.

spec.py (the matrix file and its checks), plan.py (the cell-seeds and their folders), cell.py (one
cell-seed: `observe-r1 train`, then `observe-r1 serve` and `observe-r1 eval` on its export), stats.py
(the confidence intervals and mean curves), report.py (results.json, results.md, curves.png), cli.py
(the command, its progress lines and the order of it all). Every stage runs as the subcommand a user
would type, in a subprocess, so this package imports neither the server nor the eval stage.
"""
