#!/usr/bin/env bash
# make fuzz: run each libFuzzer harness for a set time and the message fuzzer
# for a number of messages; print the executions of each. Exit non-zero on
# any finding (crash files in build/fuzz/crashes/, message sessions in
# build/fuzz/message-findings/).
#
#   FUZZ_SECONDS           time of each decoder harness, split and packed (default 600)
#   FUZZ_DATAPATH_SECONDS  time of each data-path harness, net and blk (default: FUZZ_SECONDS / 2)
#   FUZZ_JOBS              processes per harness (default 1), sharing a corpus
#   FUZZ_MESSAGES          generated vhost-user messages (default 1000000)
#   FUZZ_SEED              seed of the message fuzzer (default: time)
#   PY                     the venv's python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SECONDS_DEC=${FUZZ_SECONDS:-600}
SECONDS_DP=${FUZZ_DATAPATH_SECONDS:-$((SECONDS_DEC / 2))}
JOBS=${FUZZ_JOBS:-1}
MESSAGES=${FUZZ_MESSAGES:-1000000}
SEED=${FUZZ_SEED:-$(date +%s)}
OUT=build/fuzz
mkdir -p "$OUT/crashes" "$OUT/corpus-decoder" "$OUT/corpus-decoder_packed" "$OUT/corpus-datapath" "$OUT/corpus-blk"
status=0

# run_harness NAME SECONDS: JOBS processes over build/fuzz/corpus-NAME (new
# inputs) and fuzz/corpus/NAME (the checked-in seeds); sums their executions.
run_harness() {
    local name=$1 secs=$2 total=0 j pids=()
    for ((j = 1; j <= JOBS; j++)); do
        "$OUT/fuzz_$name" -max_total_time="$secs" -print_final_stats=1 -seed=$((SEED + j)) \
            -artifact_prefix="$OUT/crashes/$name-" "$OUT/corpus-$name" "fuzz/corpus/$name" \
            > "$OUT/$name-$j.log" 2>&1 &
        pids+=($!)
    done
    for j in "${!pids[@]}"; do
        if ! wait "${pids[$j]}"; then
            echo "fuzz_$name job $((j + 1)): FINDING, see $OUT/$name-$((j + 1)).log and $OUT/crashes/" >&2
            grep -E 'ERROR|invariant failed|runtime error|SUMMARY' "$OUT/$name-$((j + 1)).log" | head -5 >&2
            status=1
        fi
    done
    for ((j = 1; j <= JOBS; j++)); do
        local n
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$OUT/$name-$j.log" | tail -n 1)
        total=$((total + ${n:-0}))
    done
    echo "fuzz_$name: $total executions in ${secs} s x $JOBS job(s), corpus $(ls "$OUT/corpus-$name" | wc -l) inputs"
}

run_harness decoder "$SECONDS_DEC"
# The corpus the decoder fuzzer grew, through the Python wrapper and the
# pure-Python reference: they must agree on every input.
"$PY" -m fuzz.fuzz_inputs replay "$OUT/corpus-decoder" fuzz/corpus/decoder || status=1
run_harness decoder_packed "$SECONDS_DEC"
"$PY" -m fuzz.fuzz_inputs replay-packed "$OUT/corpus-decoder_packed" fuzz/corpus/decoder_packed || status=1
run_harness datapath "$SECONDS_DP"
run_harness blk "$SECONDS_DP"
"$PY" -m fuzz.fuzz_messages --messages "$MESSAGES" --seed "$SEED" --findings "$OUT/message-findings" || status=1
exit $status
