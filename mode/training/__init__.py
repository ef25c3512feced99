"""Training: a run's objects built from its config (`session.setup`), the loop (`loop.fit`), the loss,
optimizers, checkpoints and exact resume, preemption, multi-process batching, throughput options and
learning-curve scheduling. May import `mode.adapters`, `mode.data`, `mode.models`, `mode.run`,
`mode.errors`; never evaluation or reporting (the loop receives its curve evaluator as a function).
"""
