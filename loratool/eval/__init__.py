"""`loratool eval` (run.py): held-out loss, perplexity and generation metrics of a fine-tune next to its
base.

compare.py puts several TARGETs side by side (base -> SFT -> RL), metrics.py computes the numbers,
reward_metrics.py scores the answers with RL rewards, report.py writes report.md and the terminal summary,
and lm_harness.py runs lm-evaluation-harness tasks on the model eval already holds.
"""

from loratool.eval.compare import run_comparison
from loratool.eval.run import EVAL_DIR, GENERATIONS, METRICS, REPORT, run_eval

__all__ = ["EVAL_DIR", "GENERATIONS", "METRICS", "REPORT", "run_comparison", "run_eval"]
