#!/usr/bin/env bash
# PDQN against plain PQN on MinAtar (benchmark pdqn_minatar). pdqn_minatar.py runs with
# --exp-name pdqn (planning: the defaults) and with --planning-steps 0 --exp-name pqn_minatar
# (plain PQN) on MinAtar/{Breakout,Asterix,Freeway,SpaceInvaders,Seaquest}-v1, seeds 1 2 3,
# 10M steps (the script's default), greedy evaluation every 1M steps and at the end; then
# benchmark/report.py writes benchmark/results/pdqn_minatar.md and .png. benchmark/run.py runs the
# commands: run again, it skips the runs that finished and continues those stopped with a checkpoint.
#
# How long: measured on a 2-core x86-64 CPU without GPU at 5M steps (the example below), two runs at
# a time: 12 to 18 min per PDQN run and 7 to 13 min per planning-0 run, except seed 1 of Breakout and
# Asterix, whose runs shared the cores with other work (PDQN 26 and 27 min, planning-0 19 min); each
# run's time is in benchmark/results/pdqn_minatar_5m.md. The 10M-step runs have not been timed.
#
# Usage (from anywhere):  bash benchmark/pdqn.sh
# Environment variables:
#   GAMES         the MinAtar games (default "Breakout Asterix Freeway SpaceInvaders Seaquest")
#   SEEDS         the seeds (default "1 2 3")
#   WORKERS       runs at a time (default 2)
#   EXTRA_FLAGS   flags appended to every command, e.g. "--total-timesteps 5000000" (planning starts
#                 at update 500, about 2M steps: in shorter runs both variants are the same run)
#   SUFFIX        appended to the benchmark name (a run with other flags needs another name)
#   RUNNER_FLAGS  flags for run.py: "--dry-run" prints the commands; "--slurm" submits them as
#                 slurm jobs (see python benchmark/run.py --help); the report is then skipped
#   MACHINE       the machine line of the report (default: this machine's cores, CPU and GPU)
#   PYTHON        the Python to run (default: python)
# A smaller version (5M steps; benchmark/results/pdqn_minatar_5m.md was made with these two commands):
#   GAMES="Breakout Asterix" SEEDS="1 2 3" EXTRA_FLAGS="--total-timesteps 5000000" SUFFIX=_5m bash benchmark/pdqn.sh
#   GAMES="Freeway SpaceInvaders Seaquest" SEEDS="1 2 3" EXTRA_FLAGS="--total-timesteps 5000000" SUFFIX=_5m bash benchmark/pdqn.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# How the script was called, for the report: the variables above that are set.
invocation=$(for v in GAMES SEEDS WORKERS EXTRA_FLAGS SUFFIX; do [ -z "${!v:-}" ] || printf '%s="%s" ' "$v" "${!v}"; done)
SELF=benchmark/pdqn.sh
PYTHON=${PYTHON:-python}
GAMES=${GAMES:-"Breakout Asterix Freeway SpaceInvaders Seaquest"}
SEEDS=${SEEDS:-"1 2 3"}
WORKERS=${WORKERS:-2}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
SUFFIX=${SUFFIX:-}
RUNNER_FLAGS=${RUNNER_FLAGS:-}
status=0

# machine: this machine's cores, CPU model and GPU, for the report.
machine() {
    local cpu gpu
    cpu=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
    echo "$(getconf _NPROCESSORS_ONLN)-core CPU${cpu:+ ($cpu)}, ${gpu:-no GPU}"
}

# quote WORD...: the words as a shell reads them back (single quotes where needed).
quote() {
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=-]+$ ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

# run BENCHMARK WORKERS EXP SCRIPT "ENV ..." FLAG...: one run.py call; a failure is remembered, not fatal.
run() {
    local benchmark=$1 workers=$2 exp=$3 script=$4 envs=$5
    shift 5
    # shellcheck disable=SC2086  # SEEDS, envs, RUNNER_FLAGS and EXTRA_FLAGS are lists of words
    $PYTHON benchmark/run.py --benchmark "$benchmark" --exp-name "$exp" --script "$script" --env-ids $envs \
        --seeds $SEEDS --workers "$workers" $RUNNER_FLAGS -- "$@" $EXTRA_FLAGS || status=1
}

# report BENCHMARK ARGS: the table and curves, unless the commands were only shown or submitted.
report() {
    local args=(--benchmark "$1" --machine "${MACHINE:-$(machine)}" --command "${invocation}bash $SELF${2:+ $2}")
    case " $RUNNER_FLAGS " in
        *" --dry-run "* | *" --slurm "*) echo "# when the runs have finished: python benchmark/report.py $(quote "${args[@]}")" ;;
        *) $PYTHON benchmark/report.py "${args[@]}" || status=1 ;;
    esac
}

envs=""
for game in $GAMES; do
    envs="$envs MinAtar/$game-v1"
done
run "pdqn_minatar$SUFFIX" "$WORKERS" pdqn pdqn_minatar.py "$envs" --eval-frequency 1000000
run "pdqn_minatar$SUFFIX" "$WORKERS" pqn_minatar pdqn_minatar.py "$envs" --eval-frequency 1000000 --planning-steps 0
report "pdqn_minatar$SUFFIX" ""
exit $status
