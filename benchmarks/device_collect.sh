#!/usr/bin/env bash
# Waits on a lent GPU machine for a batch started in the background (benchmarks/run_quality_*_gpu.sh
# with OUT=RUN_DIR) and packs what it has written so far into $OUT/results.tgz (the device tool brings
# back at most 8 files from $OUT): the step times, logs, FID and pair JSONs, kept recipe summaries and
# sample settings, not the images.
#   bash benchmarks/device_collect.sh RUN_DIR SECONDS
# Returns after SECONDS, or as soon as RUN_DIR/times.tsv says JOB-DONE; prints the step times and the
# table of benchmarks/quality_summary.py so far, so a call's output shows the state even when nothing
# comes back.
set -u
run=$1; limit=$2; t0=$(date +%s)
until grep -qs JOB-DONE "$run/times.tsv" || [ $(( $(date +%s) - t0 )) -ge "$limit" ]; do sleep 5; done
echo "== times ($(date -u +%H:%M:%S))"; cat "$run/times.tsv" 2>/dev/null
echo "== running"; pgrep -af '[d]tq.tools' | sed 's/ --.*--out / -> /' | cut -c1-160
echo "== FID and held-out SQNR so far"
python "$(dirname "$0")/quality_summary.py" "$run"
[ -n "${OUT:-}" ] || exit 0
cd "$run" && tar czf "$OUT/results.tgz" --ignore-failed-read times.tsv log $(ls -d fid fid_s8.json keep pairs.json s/*/sample_config.json r/*/recipe.json r/*/sensitivity.json 2>/dev/null)
ls -la "$OUT"
