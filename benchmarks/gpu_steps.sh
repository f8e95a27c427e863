# The steps of the GPU check scripts (`gpu_check.sh`, `gpu_issue25.sh`), sourced by them: `step NAME SECONDS
# COMMAND...` runs COMMAND under `timeout`, its output in $OUT/NAME.log, and appends one line (exit status, seconds,
# the command) to $OUT/summary.txt, so one failing step does not hide the others.

step() {  # step NAME SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    printf '%-14s exit %3d  %5ds  %s\n' "$name" "$status" "$((SECONDS - start))" "$*" | tee -a "$OUT/summary.txt"
}
