#!/usr/bin/env bash
# (Re)start the case-study sweep of results/cpu/ in the background, first thing in every work session.
#
# It runs from a git worktree pinned at the commit in results/cpu/SWEEP_COMMIT, so work on main cannot
# change a running sweep. Safe to rerun at any time: jobs finished here or recorded under
# results/cpu/runs/ with the same config are skipped, an interrupted job resumes from its checkpoint.
# Each finished job's light record lands in results/cpu/runs/<preset>/seed<k>/ of this checkout: commit it.
#   scripts/case_study_sweep.sh          start (or report that it runs)
#   tail -f ../sweep-cpu/sweep.log       follow it
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(cat "$repo/results/cpu/SWEEP_COMMIT")
tree=${SWEEP_TREE:-$(dirname "$repo")/sweep-cpu}
tables=${SWEEP_TABLES:-table6,lr_3e-3,lr_3e-4,table6_seeds,long}
python=${PYTHON:-$repo/.venv/bin/python}

if pgrep -f "experiments/reproduce.py cpu" >/dev/null; then
    echo "the case-study sweep is already running: tail -f $tree/sweep.log"; exit 0
fi
if [ ! -d "$tree" ]; then
    git -C "$repo" worktree prune
    git -C "$repo" worktree add --detach "$tree" "$commit" >/dev/null
fi
if [ "$(git -C "$tree" rev-parse HEAD)" != "$(git -C "$repo" rev-parse "$commit")" ]; then
    echo "$tree is not at the pinned commit $commit; remove it (git worktree remove $tree) and rerun" >&2; exit 1
fi
cd "$tree"
# PYTHONPATH: the pinned tree's code, not the editable install of the main checkout.
PYTHONPATH="$tree" nohup "$python" experiments/reproduce.py cpu --records "$repo/results/cpu/runs" \
    --tables "$tables" --no-aggregate >> "$tree/sweep.log" 2>&1 &
echo "started the case-study sweep (pid $!) at $(git rev-parse --short HEAD): tail -f $tree/sweep.log"
