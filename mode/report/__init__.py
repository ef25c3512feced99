"""Reporting, at the top of the stack: the paper's tables from finished runs or committed records
(`aggregate`, `mode-aggregate`), paired comparisons with significance tests (`compare`, `mode-compare`)
and trainable-parameter tables on the meta device (`params`, `python -m mode.report.params`).
May import every other package.
"""
