#!/usr/bin/env bash
# QDagger on Atari (benchmark qdagger_atari): for each env and seed, first the teacher,
# pqn_atari_envpool.py --save-model --exp-name pqn_teacher (10M steps), then the student,
# qdagger_dqn_atari_impalacnn.py --exp-name qdagger with that run's saved model as its teacher
# (--teacher-model-path {run_dir:pqn_teacher}/pqn_teacher.pt; defaults: 500k teacher steps, 500k
# offline gradient steps, 10M online steps). Envs Breakout-v5, Pong-v5, BeamRider-v5, seeds 1 2 3.
# Then benchmark/report.py writes benchmark/results/qdagger_atari.md and .png (teacher and student
# side by side). benchmark/run.py, run again, skips the runs that finished and continues those
# stopped with a checkpoint.
#
# How long: it needs a GPU and has not been timed on one. On a 2-core CPU without GPU the student
# learns at 12.3 env steps/s (benchmark/results/speed.md).
#
# Usage (from anywhere):  bash benchmark/qdagger.sh
# Environment variables:
#   ENVS           the envpool Atari ids (default "Breakout-v5 Pong-v5 BeamRider-v5")
#   SEEDS          the seeds (default "1 2 3")
#   WORKERS        runs at a time (default 1)
#   EXTRA_FLAGS    flags appended to the teacher's and the student's commands, e.g. "--total-timesteps 1000000"
#   STUDENT_FLAGS  flags appended to the student's commands only, e.g. "--offline-steps 50000"
#   SUFFIX         appended to the benchmark name (a run with other flags needs another name)
#   RUNNER_FLAGS   flags for run.py: "--dry-run" prints the commands; "--slurm --slurm-gpus 1" submits
#                  them as slurm jobs, each student after its teacher (see python benchmark/run.py
#                  --help); the report is then skipped
#   MACHINE        the machine line of the report (default: this machine's cores, CPU and GPU)
#   PYTHON         the Python to run (default: python)
# A smaller version (one env and seed, 1M steps for the teacher and the student, 50k offline steps):
#   ENVS=Breakout-v5 SEEDS=1 EXTRA_FLAGS="--total-timesteps 1000000" STUDENT_FLAGS="--offline-steps 50000" \
#       SUFFIX=_short bash benchmark/qdagger.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# How the script was called, for the report: the variables above that are set.
invocation=$(for v in ENVS SEEDS WORKERS EXTRA_FLAGS STUDENT_FLAGS SUFFIX; do [ -z "${!v:-}" ] || printf '%s="%s" ' "$v" "${!v}"; done)
SELF=benchmark/qdagger.sh
PYTHON=${PYTHON:-python}
ENVS=${ENVS:-"Breakout-v5 Pong-v5 BeamRider-v5"}
SEEDS=${SEEDS:-"1 2 3"}
WORKERS=${WORKERS:-1}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
STUDENT_FLAGS=${STUDENT_FLAGS:-}
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

run "qdagger_atari$SUFFIX" "$WORKERS" pqn_teacher pqn_atari_envpool.py "$ENVS" --save-model
# shellcheck disable=SC2086  # STUDENT_FLAGS is a list of words
run "qdagger_atari$SUFFIX" "$WORKERS" qdagger qdagger_dqn_atari_impalacnn.py "$ENVS" \
    --teacher-model-path "{run_dir:pqn_teacher}/pqn_teacher.pt" $STUDENT_FLAGS
report "qdagger_atari$SUFFIX" ""
exit $status
