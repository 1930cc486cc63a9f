#!/usr/bin/env bash
# Make the training and check data of the default model v2 (kernel transfer), as it was made on 2026-12-01.
#
#   bash Training/make_kernel_transfer_data.sh [SHARED_REAL_CT_DIR] [OUT_DIR]
#
# Defaults: ../shared/data/real_ct and data/kernel_transfer (the paths Training/configs/kernel_transfer*.yaml
# name). About 6 minutes on a 2-core CPU, 3 GB of DICOM. Every series is simulated with all 15 kernels of the
# model from real anatomy (Training.simulate --anatomy): the simulator takes the FIRST --slices slices of
# each source series, so only slices 0-15 of the chest pair's smooth series (its fitting half; validation
# uses 32-63) and none of the Philips head phantom pair (held out) are used. The check set uses slices of
# the Big Bore series that no training set uses (its last 24; training uses its first 16).
set -euo pipefail
REAL=${1:-../shared/data/real_ct}
OUT=${2:-data/kernel_transfer}
PY=${PYTHON:-.venv/bin/python}
DOMAINS=SIEMENS_B30f,SIEMENS_B40f,SIEMENS_B50f,SIEMENS_B70f,SIEMENS_I30f_3,GE_SOFT,GE_STANDARD,GE_LUNG,GE_BONE
DOMAINS=$DOMAINS,GE_HISPEED_STDPLUS,PHILIPS_B,PHILIPS_C,PHILIPS_L,PHILIPS_UB_IDOSE,PHILIPS_YA

mkdir -p "$OUT"
anatomy() {  # anatomy DIR SERIES...: copies (the simulator does not follow links)
  local dir=$OUT/$1; shift
  mkdir -p "$dir"
  for s in "$@"; do cp -r "$REAL/$s" "$dir/"; done
}
chest_b() {  # the chest pair's smooth series with its licence, without the sharp one
  mkdir -p "$OUT/$1/chest_b/B_smooth"
  cp "$REAL"/philips_brilliance16_chest_l_b_pair/B_smooth/*.dcm "$OUT/$1/chest_b/B_smooth/"
  cp "$REAL"/philips_brilliance16_chest_l_b_pair/{README.md,LICENSE} "$OUT/$1/chest_b/"
}

chest_b anat_train
anatomy anat_train philips_bigbore_chest_abdomen_b_idose ge_hispeed_dual_head_std_plus
"$PY" -m Training.simulate --anatomy "$OUT/anat_train" --domains "$DOMAINS" --out "$OUT/sim_train" \
  --variants 5 --slices 16 --pixel-range 0.4,1.0 --dose-range 0.5,2.0 --seed 1

# Pixels of 0.4-0.6 mm: a head fits a 512 matrix, a chest needs 768.
anatomy anat_small_head ge_hispeed_dual_head_std_plus
"$PY" -m Training.simulate --anatomy "$OUT/anat_small_head" --domains "$DOMAINS" --out "$OUT/sim_small_head" \
  --variants 6 --slices 16 --pixel-range 0.4,0.55 --dose-range 0.5,2.0 --seed 11
chest_b anat_small_chest
anatomy anat_small_chest philips_bigbore_chest_abdomen_b_idose
"$PY" -m Training.simulate --anatomy "$OUT/anat_small_chest" --domains "$DOMAINS" --out "$OUT/sim_small_chest" \
  --size 768 --variants 3 --slices 12 --pixel-range 0.45,0.6 --dose-range 0.5,2.0 --seed 12

# Held-out check set: the last 24 slices of the Big Bore series (training used its first 16).
mkdir -p "$OUT/anat_test/bigbore_held_out_slices"
"$PY" - "$REAL" "$OUT" <<'EOF'
import shutil, sys
from pathlib import Path
from TextureStarGANCore.volume_io import read_volume
real, out = Path(sys.argv[1]), Path(sys.argv[2])
src = real / "philips_bigbore_chest_abdomen_b_idose"
vol = read_volume(src / "dicom")
dst = out / "anat_test" / "bigbore_held_out_slices"
for f in vol.dicom.files[-24:]:
    shutil.copy(f, dst / Path(f).name)
shutil.copy(src / "LICENSE", dst / "LICENSE")
EOF
"$PY" -m Training.simulate --anatomy "$OUT/anat_test" --domains "$DOMAINS" --out "$OUT/sim_test768" \
  --size 768 --variants 2 --slices 6 --pixel-range 0.6,1.0 --dose-range 0.5,2.0 --seed 8
echo "data ready in $OUT"
