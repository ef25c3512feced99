"""Evaluation: batched greedy generation (`generation`) and the official SNI metrics (`metrics`), put
together in `evaluate` / `score` (`scoring`). May import training and everything below it; never
`mode.report`.
"""

from mode.evaluation.generation import generate  # noqa: F401
from mode.evaluation.scoring import evaluate, score  # noqa: F401
