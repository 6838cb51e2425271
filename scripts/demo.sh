#!/usr/bin/env bash
# The main job on the bundled sample data: fit -> apply -> evaluate -> check-invariance.
# Run through `make demo` (which builds .venv first); outputs go to demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=demo_out
rm -rf "$out"
mkdir -p "$out"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step segcal methods --classes 8

# 1. Fit on the validation split: a decision-preserving calibrator, and the shift-sensitive VS next to its TI twin.
step segcal fit sample_data/street_val.h5 --method cms-ap -o "$out/street_cms-ap.json" --json "$out/fit_cms-ap.json"
step segcal fit sample_data/street_val.h5 --method vs -o "$out/street_vs.json" --quiet
step segcal fit sample_data/street_val.h5 --method vs-ti -o "$out/street_vs-ti.json" --quiet
step segcal fit sample_data/brain_val.zarr --method ts -o "$out/brain_ts.json"

# 2. Calibrate the test split; the output is itself valid DATA.
step segcal apply "$out/street_cms-ap.json" sample_data/street_test.h5 -o "$out/street_test_calibrated.h5"
step segcal apply "$out/brain_ts.json" sample_data/brain_test.zarr -o "$out/brain_test_calibrated.zarr"

# 3. Evaluate: before/after, decision preservation, and a CI gate.
step segcal evaluate sample_data/street_test.h5 --calibrator "$out/street_cms-ap.json" \
    --json "$out/evaluate_street.json" --fail-if "flip_rate>0" --fail-if "calibrated.pooled.ece>0.05"
step segcal evaluate "$out/street_test_calibrated.h5" --input-kind probs --logits-key probabilities --quiet

# 4. Audit: VS drifts under a logit shift, its TI twin holds; every family's guarantees measured.
step segcal check-invariance "$out/street_vs-ti.json" sample_data/street_test.h5 --require ti
if segcal check-invariance "$out/street_vs.json" sample_data/street_test.h5 --require ti; then
  echo "unexpected: vs passed translation invariance" >&2; exit 1
else
  echo "(exit $? as expected: vs is not translation invariant)"
fi
step segcal check-invariance --all-methods
printf '\nDone: outputs in %s/\n' "$out"
