#!/usr/bin/env bash
# The paper's two claims at the `omniglot` preset (30 teachers, 600 meta-iterations), for a machine
# with one CUDA GPU - what a 2-core CPU cannot run (docs/RESULTS.md §6 says what is left for it).
# Rows in order of what matters most, each under its own time limit so a short lease still brings
# back the first ones; results (JSON + PNG) go to $OUT (default benchmarks/results/gpu).
#
#   OUT=/some/dir bash benchmarks/gpu-claims.sh          # from the project root, venv built (make setup)
#
# Measured on an H100 before (README "Results"): a FREE iteration 0.23 s, a from-scratch one 2.9 s;
# the authors' update adds its replay (second-order MAML, up to 30 batches of 10 tasks).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
FREE=${FREE:-.venv/bin/free}
LIMIT=${LIMIT:-240}   # seconds per row
mkdir -p "$OUT"
common=(experiment=omniglot device=cuda threads=null "paths.artifacts_dir=$OUT/work")

row() {  # row NAME COMMAND...: run one benchmark under the time limit, say how it ended
  local name=$1; shift
  echo "== $name: $*"
  timeout --signal=INT "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name ended with $? ($(tail -n 1 "$OUT/$name.log"))"
}

# Claim 1: recovery speed-up on held-out teachers, as a curve over meta-training.
row recovery "$FREE" bench recovery "${common[@]}" --snapshots 0,50,150,300,600 --seeds 3 --heldout 5 \
  --max-steps 1000 --no-downstream --out "$OUT/recovery-omniglot.json"
# Claim 2: FREE (ours and the authors' update) against the best data-free baseline, 1-shot learners.
row accuracy-free "$FREE" bench accuracy "${common[@]}" --mixed-archs '' --seeds 3 \
  --rows free,free_noalign,pixels,random_init,oracle --out "$OUT/accuracy-omniglot.json"
row accuracy-official "$FREE" bench accuracy "${common[@]}" --mixed-archs '' --seeds 1 \
  --rows free_official,free_official_noalign --out "$OUT/accuracy-omniglot-official.json"
row accuracy-scratch "$FREE" bench accuracy "${common[@]}" --mixed-archs '' --seeds 1 \
  --rows scratch_equal_time --out "$OUT/accuracy-omniglot-scratch.json"
