#!/bin/sh
# Outputs that are streams or links (audit 37b), names printed: cli_outputs.sh CASE SPILL
# WORKDIR GRAPH (a graph file the names case copies); prints "CASE ok" and exits 0 when the
# case holds.
set -u
case_name=$1 spill=$2 dir=$3/cli_outputs_$1
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir" || exit 1
plan="plan mlp --device h100-sxm --link pcie5 --policy spill"
fail() { echo "$case_name FAILED: $*"; exit 1; }
case $case_name in
  dev_stdout)
    # --json /dev/stdout >> log: appended after what the log had, before the table printed
    # afterwards; the log is not replaced (F8).
    echo "KEEP ME" > log.txt
    "$spill" $plan --json /dev/stdout >> log.txt 2>&1 || fail "rc $?"
    head -1 log.txt | grep -q '^KEEP ME$' || fail "the log lost its first line"
    grep -q '"budget_bytes"' log.txt || fail "no JSON in the log"
    grep -q 'spill' log.txt || fail "no table in the log"
    # Through the error stream and by the log's own name too.
    echo "KEEP ME" > log2.txt
    "$spill" $plan --timeline /dev/stderr 2>> log2.txt >/dev/null || fail "rc $?"
    "$spill" $plan --json log2.txt >> log2.txt || fail "rc $?"
    head -1 log2.txt | grep -q '^KEEP ME$' || fail "log2 lost its first line"
    grep -q '"traceEvents"' log2.txt || fail "no timeline in log2"
    grep -q '"budget_bytes"' log2.txt || fail "no JSON in log2"
    ;;
  dash)
    # "-" is the standard output: the file alone there, the command's own text on the error
    # stream, no file named "-"; a second "-" is refused before the work; a failing standard
    # output is named as "-".
    "$spill" $plan --json - > out.json 2> text.txt || fail "rc $?: $(cat text.txt)"
    head -c 1 out.json | grep -q '{' || fail "stdout began: $(head -c 80 out.json)"
    grep -q '"format": "spill-plan-result"' out.json || fail "no plan JSON on stdout"
    grep -q 'budget' text.txt || fail "no table on stderr: $(head -c 80 text.txt)"
    test -e ./- && fail "a file named - was written"
    "$spill" $plan --json - --timeline - > two.txt 2>&1
    test $? = 2 || fail "two dashes: rc $?"
    grep -q "^spill: invalid input: --timeline: '-' (standard output) is already" two.txt ||
      fail "two dashes said: $(cat two.txt)"
    if test -w /dev/full; then
      "$spill" $plan --json - > /dev/full 2> full.txt
      test $? = 1 || fail "/dev/full: rc $?"
      grep -q "^spill: error: --json: writing '-' (standard output) failed" full.txt ||
        fail "/dev/full said: $(cat full.txt)"
    fi
    ;;
  fifo)
    # A named FIFO: its reader gets the JSON (the check's open and close ended it, F9).
    mkfifo out.fifo || fail "mkfifo"
    cat out.fifo > read.txt &
    reader=$!
    "$spill" $plan --json out.fifo > /dev/null || { kill $reader; fail "rc $?"; }
    wait $reader
    grep -q '"budget_bytes"' read.txt || fail "the reader got: $(head -c 80 read.txt)"
    ;;
  dangling_link)
    # A link to a file not there yet: written through, the link kept, nothing else (F7).
    ln -s target.json link.json
    "$spill" $plan --json link.json > /dev/null || fail "rc $?"
    test -L link.json || fail "the link is gone"
    grep -q '"budget_bytes"' target.json || fail "the target has no JSON"
    test "$(ls | wc -l)" -eq 2 || fail "files left: $(ls)"
    ;;
  names)
    # Names read from a file (a graph's model and op names) and output file names are printed
    # with their control characters escaped, newlines too: an ESC sequence cannot recolour the
    # terminal, a newline cannot forge a line of the output. Before, only error messages were.
    esc=$(printf '\033')
    sed 's/"name":"\([^"]*\)"/"name":"\1\\u001b[31m\\nFORGED"/g' "$4" > evil.json
    "$spill" plan evil.json --device h100-sxm --link pcie5 --budget 1MiB > out.txt 2>&1 ||
      fail "plan: rc $?: $(cat out.txt)"
    grep -q 'mlp (captured)\\x1b\[31m\\x0aFORGED' out.txt || fail "no escaped name: $(cat out.txt)"
    grep -q "$esc" out.txt && fail "an ESC byte printed"
    grep -q '^FORGED' out.txt && fail "a forged line"
    name=$(printf 'out\033[31m\nFORGED.json')
    "$spill" train mlp --predict --layers 2 --width 256 --batch 8 --budget 4MiB --link pcie5 \
      --json "$name" > out2.txt 2>&1 || fail "train: rc $?: $(cat out2.txt)"
    grep -q '^prediction written to out\\x1b\[31m\\x0aFORGED.json$' out2.txt ||
      fail "no escaped file name: $(tail -2 out2.txt)"
    test -f "$name" || fail "nothing written"
    ;;
  full_disk)
    # A file system with no room left, not even for a temporary beside the output (no free
    # inode): the old file is kept whole, the failure is status 1 and "spill: error:", not
    # invalid input; a new output there is refused so before the work. Before, the old file
    # was rewritten in place and cut short, with status 0 (review 38c). Needs a tmpfs of its
    # own in a mount namespace: skipped (77) where that is not allowed.
    mkdir mnt || fail "mkdir"
    unshare -m sh -c '
      mount -t tmpfs -o size=64k,nr_inodes=3 tmpfs mnt 2>/dev/null || exit 77
      printf "PRECIOUS\n" > mnt/out.json
      dd if=/dev/zero of=mnt/fill bs=4k 2>/dev/null
      "$1" $2 --json mnt/out.json > out.txt 2> err.txt
      echo $? > rc.txt
      cat mnt/out.json > kept.txt
      "$1" $2 --json mnt/new.json > out2.txt 2> err2.txt
      echo $? > rc2.txt
      ls mnt > left.txt
    ' sh "$spill" "$plan"
    test $? = 77 && { echo "$case_name skipped: cannot mount a tmpfs here"; exit 77; }
    test "$(cat rc.txt)" = 1 || fail "rc $(cat rc.txt): $(cat err.txt)"
    grep -q "^spill: error: --json: .*mnt/out.json" err.txt || fail "said: $(cat err.txt)"
    test "$(cat kept.txt)" = PRECIOUS || fail "the old file became: $(head -c 80 kept.txt)"
    test "$(cat rc2.txt)" = 1 || fail "new file: rc $(cat rc2.txt): $(cat err2.txt)"
    grep -q "^spill: error: --json: cannot write .*mnt/new.json" err2.txt ||
      fail "new file: said: $(cat err2.txt)"
    test -s out2.txt && fail "new file: the work ran first: $(head -c 80 out2.txt)"
    test "$(cat left.txt | tr '\n' ' ')" = "fill out.json " || fail "left: $(cat left.txt)"
    ;;
  *) fail "unknown case" ;;
esac
echo "$case_name ok"
