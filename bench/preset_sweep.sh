#!/bin/bash
# Preset sweep behind the lgffem_cpu / demo settings (issue 14): bench/preset_quality.py for a grid of settings x
# datasets x seeds, in parallel (a GPU machine: each run ~10 s). Settings are chosen on `val` (mean over seeds);
# `test` is read only for the chosen setting and the shipped default. Usage:
#   bench/preset_sweep.sh SAMPLES_DIR OUT.jsonl [PARALLEL]
set -u
SAMPLES=$1; OUT=$2; P=${3:-12}
CACHE=${CACHE:-/tmp/lgff-sweep-cache}
PY=${PYTHON:-python3}
jobs=$(mktemp)
add() {  # tag config dataset seed epochs sets...
  local tag=$1 config=$2 data=$3 seed=$4 epochs=$5; shift 5
  echo "$PY bench/preset_quality.py --config $config --data $SAMPLES/$data --cache $CACHE --splits val,test \
--tag $tag --set seed=$seed --set train.epochs=$epochs $*" >> "$jobs"
}
declare -A L=(
  [base]=""
  [m17]="--set loss.margin_deg=17.2"
  [wu1]="--set train.warmup_epochs=1"
  [m17wu1]="--set loss.margin_deg=17.2 --set train.warmup_epochs=1"
  [k1]="--set loss.num_subcenters=1"
  [s30]="--set loss.scale=30"
  [lnorm]="--set model.head_level_norm=true"
  [lr1e3]="--set train.lr=1e-3"
  [drop3]="--set model.dropout=0.3"
  [m17wu1ln]="--set loss.margin_deg=17.2 --set train.warmup_epochs=1 --set model.head_level_norm=true"
  [m17wu1k1]="--set loss.margin_deg=17.2 --set train.warmup_epochs=1 --set loss.num_subcenters=1"
)
declare -A D=(
  [base]=""
  [k1]="--set loss.num_subcenters=1"
  [s30]="--set loss.scale=30"
  [lnorm]="--set model.head_level_norm=true"
  [m28]="--set loss.margin_deg=28.6"
  [wu1]="--set train.warmup_epochs=1"
)
# phase 1: one run per (preset, dataset) builds the shared feature caches
for data in histolytics-nuclei histolytics-tissue; do
  add "cpu-base" lgffem_cpu $data 0 10
  add "demo-base" demo $data 0 10
done
head -4 "$jobs" | xargs -P 4 -I{} bash -c "{}" >> "$OUT" 2>>"$OUT.err"
tail -n +5 "$jobs" > "$jobs.rest"; : > "$jobs"
for data in histolytics-nuclei histolytics-tissue; do
  for t in "${!L[@]}"; do
    for seed in 0 1; do [ "$t" = base ] && [ $seed = 0 ] || add "cpu-$t" lgffem_cpu $data $seed 10 ${L[$t]}; done
    add "cpu-$t-e4" lgffem_cpu $data 0 4 ${L[$t]}
  done
  for t in "${!D[@]}"; do
    for seed in 0 1; do [ "$t" = base ] && [ $seed = 0 ] || add "demo-$t" demo $data $seed 10 ${D[$t]}; done
  done
done
xargs -P "$P" -I{} bash -c "{}" < "$jobs" >> "$OUT" 2>>"$OUT.err"
rm -f "$jobs" "$jobs.rest"
