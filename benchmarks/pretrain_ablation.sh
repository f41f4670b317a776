#!/bin/bash
# Issue 23's ablation table (results/pretrain_ablation.md): what pretraining adds over a random
# encoder under the default preset, and the changes to pretraining tried to make it add more.
#
#   bash benchmarks/pretrain_ablation.sh          # the table, from the runs' CSVs in results/
#   bash benchmarks/pretrain_ablation.sh --run    # first the selection.py runs (hours on 2 cores)
#
# Each selection.py run was started twice side by side (its processes share the cells).
set -euo pipefail
cd "$(dirname "$0")/.."
S="python benchmarks/selection.py --preset default --threads 1"
H="--epochs-scale 0.5"  # half the preset's 100 pretraining epochs, as the earlier ablation rows
X4="--epochs-scale 2 --set train.batch_size=32 --set train.pretrain_max_steps=0"
RUNS=(
  "$S $H --seeds 5 --protocols br --no-minirocket --datasets gesture ArticularyWordRecognition --name pretrain_b128"
  "$S $H --seeds 5 --protocols br --datasets JapaneseVowels FingerMovements --name pretrain_b128_short"
  "$S $H --seeds 5 --protocols br --datasets PenDigits --name pretrain_b128_pendigits"
  "$S $H --seeds 5 --protocols r --datasets gesture ArticularyWordRecognition --name pretrain_minirocket"
  "$S $H --seeds 5 --protocols br --no-minirocket --datasets gesture ArticularyWordRecognition --set train.batch_size=32 --name pretrain_b32"
  "$S $H --seeds 5 --protocols b --no-minirocket --datasets gesture ArticularyWordRecognition --set train.pretrain_augment=0.1 --name pretrain_aug"
  "$S $X4 --seeds 5 --protocols b --no-minirocket --datasets gesture ArticularyWordRecognition --name pretrain_b32_x4"
  "$S $X4 --seeds 2 --protocols b --no-minirocket --datasets JapaneseVowels --name pretrain_b32_x4_short"
  "$S $H --seeds 5 --protocols b --no-minirocket --datasets JapaneseVowels FingerMovements --set model.mask_ratio=0.5 --name pretrain_mask50_short"
)
if [[ "${1:-}" == "--run" ]]; then
  for cmd in "${RUNS[@]}"; do $cmd; done
fi
COMMANDS=()
for cmd in "${RUNS[@]}"; do COMMANDS+=(--command "$cmd"); done
VARIANTS=(--variant "default preset=pretrain_b128" --variant "default preset=pretrain_b128_short")
[[ -f results/pretrain_b128_pendigits.csv ]] && VARIANTS+=(--variant "default preset=pretrain_b128_pendigits")
python benchmarks/token_rate.py --name pretrain_ablation \
  --title "What pretraining adds over a random encoder, and what was tried to make it add more (issue 23)" \
  "${VARIANTS[@]}" \
  --variant "batch 32=pretrain_b32" \
  --variant "pretraining augmentation 0.1 (train.pretrain_augment)=pretrain_aug" \
  --variant "batch 32, 4x the epochs, no step ceiling=pretrain_b32_x4" \
  --variant "batch 32, 4x the epochs, no step ceiling=pretrain_b32_x4_short" \
  --variant "mask ratio 0.5 (the preset's 0.75 leaves 2 of 5-8 tokens visible; 0.5 leaves 3-4)=pretrain_mask50_short" \
  --minirocket pretrain_minirocket \
  "${COMMANDS[@]}" --command "bash benchmarks/pretrain_ablation.sh (this table)" \
  --note "- machine: AMD EPYC, 2 cores, shared: the runs went two at a time beside a search and other benchmarks (load average 5-8), so the times are inflated and uneven; torch threads 1" \
  --note "- CV + refit (5 folds, protocol (b)); 'half budget' = 50 of the preset's 100 pretraining epochs (\`--epochs-scale 0.5\`), the 4x rows 200 at batch 32 (\`--epochs-scale 2\`); readout: the preset's ridge; accuracies are test %, mean ± sample std over seeds" \
  --note "- random encoder: protocol (r), the same configuration with \`train.pretrain_epochs=0\` (same seed, initialisation, folds, readout); a change to pretraining alone (batch, augmentation, budget) leaves it as it is, so those rows are paired with the default row's (r); gain = pretrained − random, paired by seed" \
  --note "- MiniRocket: aeon, fit on all training series (series shorter than 9 steps edge-padded), same seeds" \
  --note "- stopped early to free the machine: the 4x rows on JapaneseVowels have 2 seeds and on FingerMovements none (1 seed finished, not tabled)"
