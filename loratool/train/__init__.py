"""`loratool train` and what surrounds it: the run itself (run.py), one trainer builder per method
(sft.py, dpo.py), preflight checks, resume and checkpoints, the divergence guard, progress, and the
commands that plan or repeat runs (plan.py, sweep.py). memory/ holds the patches that make training
lighter without changing what it learns."""
