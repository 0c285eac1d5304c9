#!/usr/bin/env bash
# Unpack the stage tarballs of run_gpu_suite.sh (the <stage>.tar.gz files, copied into FOLDER)
# and merge them into benchmarks/results/<device>/: results.json/csv, summary.md, plots, and
# each stage's log and raw folder under stages/. Results already there are kept unless a stage
# measured the same row again.
#   bash benchmarks/collect_gpu_results.sh FOLDER
set -euo pipefail
src=${1:?usage: collect_gpu_results.sh FOLDER}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
for t in "$src"/*.tar.gz; do
    tar -xzf "$t" -C "$tmp"
done
jsons=()
for j in "$tmp"/*/results.json; do
    [ -e "$j" ] && jsons+=("$j")
done
if [ ${#jsons[@]} -eq 0 ]; then
    echo "no results.json in $src" >&2
    exit 1
fi
device=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['environment']['device'].replace(' ', '_').replace('/', '_'))" "${jsons[0]}")
dest="$here/results/$device"
mkdir -p "$dest/stages"
cp -r "$tmp"/* "$dest/stages/"
existing=()
[ -e "$dest/results.json" ] && existing+=("$dest/results.json")
python3 "$here/plot.py" "${existing[@]}" "${jsons[@]}" -o "$dest"
echo "merged ${#jsons[@]} stage(s) into $dest"
