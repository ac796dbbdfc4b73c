#!/usr/bin/env bash
# The tests that train models or assert effects, once per perturbation of the numerics that another machine
# brings (docs/TESTING.md): torch threads, the seeds the tests train with, ATen's CPU kernels. A test that
# passes under one and fails under another asserts floating-point luck, not behaviour.
#
#   tools/perturb_tests.sh                         # the subset below under each setting
#   SETTINGS="CDKIT_TEST_SEED=3" tools/perturb_tests.sh tests/test_fusion.py
#
# Settings are separated by ';', each a list of VAR=value (tests/conftest.py reads CDKIT_TEST_*; torch reads
# ATEN_CPU_CAPABILITY). Prints one line per setting (passed/failed, seconds) and exits non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SETTINGS=${SETTINGS:-"CDKIT_TEST_THREADS=2; CDKIT_TEST_SEED=1; ATEN_CPU_CAPABILITY=default; ATEN_CPU_CAPABILITY=avx2 CDKIT_TEST_SEED=2"}
# The subset: every test file whose tests train a model (pipeline, fusion heads, pseudo-label fine-tune,
# TTA on a model, training, hierarchy heads) or assert an effect of fitted numbers (re-ranker margins,
# ensemble weights, top-k aggregation agreement). The rest (formats, guards, parsing) has no floating
# point to perturb.
SUBSET=("$@")
[ ${#SUBSET[@]} -gt 0 ] || SUBSET=(tests/test_pipeline.py tests/test_fusion.py tests/test_pseudo.py tests/test_predict.py
                                 tests/test_train.py tests/test_hierarchy.py tests/test_rerank.py tests/test_store.py
                                 tests/test_aggregate.py)
LOG=${LOG:-runs/perturb}
mkdir -p "$LOG"
status=0
IFS=';' read -ra LIST <<< "$SETTINGS"
t_all=$SECONDS
for setting in "${LIST[@]}"; do
  setting=$(echo "$setting" | xargs)
  [ -n "$setting" ] || continue
  name=$(echo "$setting" | tr ' =' '_-')
  t0=$SECONDS
  # OMP_NUM_THREADS=1 unless the setting says otherwise: the runs stay comparable on a shared machine
  if env OMP_NUM_THREADS=1 $setting "$PY" -m pytest -q -p no:cacheprovider "${SUBSET[@]}" > "$LOG/$name.log" 2>&1; then
    verdict=passed
  else
    verdict=FAILED; status=1
  fi
  line="$setting: $verdict in $((SECONDS - t0)) s ($(tail -n 1 "$LOG/$name.log"))"
  echo "$line"
done
echo "all settings: $((SECONDS - t_all)) s; logs in $LOG/"
exit $status
