# Sourced by the device run scripts: `step NAME MAX_S CMD...` runs CMD under the smaller of MAX_S and
# what is left of BUDGET_S (counted from when this file was sourced), appending its output and exit
# status to $LOG, so one call to the device tool stays inside its time limit and brings back one log.
T0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T0))); }
step() {
  local name=$1 max=$2; shift 2
  local t=$(left); [ "$t" -gt "$max" ] && t=$max
  echo "=== $name (limit ${t}s)" >> "$LOG"
  if [ "$t" -lt 20 ]; then echo "skipped: no time left" >> "$LOG"; return; fi
  local s=$SECONDS
  timeout "$t" "$@" >> "$LOG" 2>&1
  echo "rc=$? seconds=$((SECONDS - s))" >> "$LOG"
}
