#!/usr/bin/env bash
# Same-lease A/B on the lent GPU: a copy of the package at an older revision, to time next to the
# working tree in one device call (the GPU's speed drifts a few percent between leases).
#   bash bench/ab_old.sh REV          # writes bench/_old/{sparsek_ops,lowering} at REV (git-ignored)
# Then one device call with carry ["bench/_old"] (ignored paths travel only when named), e.g.
#   PYTHONPATH=$PWD/bench/_old python3 bench/profile_step.py --S 32768 > $OUT/before.log
#   PYTHONPATH=$PWD python3 bench/profile_step.py --S 32768 > $OUT/after.log
# (a script's own folder, bench/, comes first on sys.path, and it holds no sparsek_ops, so the
# PYTHONPATH entry decides which copy is imported).
set -euo pipefail
rev="${1:?usage: bash bench/ab_old.sh REV}"
cd "$(dirname "$0")/.."
rm -rf bench/_old
mkdir -p bench/_old
git archive "$rev" sparsek_ops lowering | tar -x -C bench/_old
echo "bench/_old: sparsek_ops and lowering at $(git rev-parse --short "$rev")"
