#!/usr/bin/env bash
# Regenerate every table and figure: set up if needed, then run notebooks 01..05 headlessly.
#   ./run_all.sh [profile] [--dry-run]   profile = smoke | cpu (default) | paper   (configs/<profile>.yaml)
#   --dry-run: validate the profile and print the planned calls, tokens and GPU-hours; run nothing.
# Executed notebooks land in runs/<run>/notebooks/; a rerun reuses every cached call and adapter.
set -euo pipefail
cd "$(dirname "$0")"
profile=${1:-cpu}
config=configs/$profile.yaml
[ -f "$config" ] || { echo "run_all.sh: no profile '$profile' (expected $config)" >&2; exit 2; }
./setup.sh
# A typo in a profile would be silently ignored by papermill: check every key and name first.
if [ "${2:-}" = "--dry-run" ]; then exec .venv/bin/python -m wowlib.config "$config"; fi
.venv/bin/python -m wowlib.config "$config" --check
# Every file the profile's tasks read must be in the data directory (present and with its sha256).
.venv/bin/python -m wowlib.data check "$config" || { echo "run_all.sh: data missing or corrupt for profile '$profile' (see above)" >&2; exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
export PYTHONHASHSEED=0
run=${WOW_RUN:-$(sed -n 's/^run: *//p' "$config")}
out=${WOW_RUNS_DIR:-runs}/$run/notebooks
# Each notebook reads its settings from the profile itself (wowlib.config.stage); WOW_RUN renames the run.
overrides=()
[ -n "${WOW_RUN:-}" ] && overrides=(-y "overrides: {run: '$WOW_RUN'}")
mkdir -p "$out"
n_cells() { .venv/bin/python -c "import json, sys; print(len(json.load(open(sys.argv[1]))['cells']) + 1)" "$1"; }
# papermill --log-output marks each cell's end with "Ending Cell <n>---": print it with the elapsed time
cell_progress() {
  local line
  while IFS= read -r line; do
    if [[ $line =~ ^Ending\ Cell\ ([0-9]+)- ]]; then
      echo "      cell ${BASH_REMATCH[1]}/$2 done, $(( $(date +%s) - $1 )) s"
    fi
  done
}
stages=(01_sample_wrong 02_elicit 03_align 04_evaluate 05_figures)
total_start=$(date +%s)
for i in "${!stages[@]}"; do
  nb=${stages[$i]}
  [ -f "notebooks/$nb.ipynb" ] || { echo "[$((i + 1))/${#stages[@]}] $nb: not built yet, skipped"; continue; }
  echo "[$((i + 1))/${#stages[@]}] $nb ..."
  start=$(date +%s)
  # The cells' output goes to $out/$nb.log; the terminal gets one line per finished cell.
  if ! .venv/bin/papermill "notebooks/$nb.ipynb" "$out/$nb.ipynb" -p profile "$profile" "${overrides[@]}" \
        --cwd notebooks -k python3 --log-level INFO --log-output --no-progress-bar 2>&1 \
        | tee "$out/$nb.log" | cell_progress "$start" "$(n_cells "notebooks/$nb.ipynb")"; then
    tail -n 25 "$out/$nb.log" >&2
    echo "run_all.sh: FAILED in notebooks/$nb.ipynb (executed copy with the error: $out/$nb.ipynb; log: $out/$nb.log)" >&2
    exit 1
  fi
  echo "[$((i + 1))/${#stages[@]}] $nb done in $(( $(date +%s) - start )) s"
done
echo "profile $profile (run $run) finished in $(( $(date +%s) - total_start )) s; outputs in runs/$run/"
