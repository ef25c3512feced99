"""Run machinery at the bottom of the stack: where configs live and how they compose (`config`), the run
directory's life (`run_dir`), whether a command's config is the run's own (`resume`), crash-safe files
(`fileio`), what a finished evaluation writes (`results`), what produced a run (`provenance`) and the
experiment logger (`loggers`), and the paper tables' declarations (`tables`). Imports only `mode.errors` and libraries: everything else may import it.
"""
