# Sourced by device run scripts that write many files (the device tool brings back only a few):
# `step NAME SECONDS CMD...` runs CMD under `timeout SECONDS` with its output in $STAGE/NAME.log, adds
# "NAME rc=.. Ns total, Ms" to $STAGE/steps.txt (and prints it), then packs all of $STAGE into
# $OUT/$PACK and copies steps.txt beside it, so a call cut short still returns what finished.
# Set OUT and PACK before sourcing; STAGE is a fresh directory unless set.
STAGE=${STAGE:-$(mktemp -d)}
step() {
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$STAGE/$name.log" 2>&1
  echo "$name rc=$? ${SECONDS}s total, $((SECONDS - t0))s" | tee -a "$STAGE/steps.txt"
  tar czf "$OUT/$PACK" -C "$STAGE" . && cp "$STAGE/steps.txt" "$OUT/steps.txt"
}
# record_run: the GPU (device.txt) and the tree (commit.txt) into $STAGE.
record_run() {
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$STAGE/device.txt" 2>&1
  git log -1 --format='%H %s' > "$STAGE/commit.txt" 2>/dev/null
}
# bench_step NAME SECONDS MODEL [ARGS...]: the engine bench (bf16 activations, 48 decode steps, a 2k prefill)
# as a step writing into $STAGE/NAME; ARGS add --batch, --quantization, --profile and the like.
bench_step() {
  local name=$1 secs=$2 model=$3; shift 3
  step "$name" "$secs" python -m bench.engine_bench --model "$model" --dtype bfloat16 --decode-steps 48 \
    --prefill-len 2048 --out "$STAGE/$name" "$@"
}
