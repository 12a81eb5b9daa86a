#!/usr/bin/env bash
# Submit vbon stages to Slurm with launch/slurm_vbon.sbatch.
#   launch/submit.sh CONFIG [options] [-- extra vbon arguments, e.g. --set train.steps=2000]
# CONFIG: a YAML file, or the name of a recipe in launch/ (tldr_vbon = launch/tldr_vbon.yaml).
# Options (defaults in brackets):
#   --stage S           refcache | train | evaluate | bon | all [all]: all = the reference cache as a job
#                       array, a merge job that fills any gap and validates the whole cache, train, evaluate
#   --nodes N           nodes per job [1]
#   --gpus-per-node G   GPUs, i.e. ranks, per node [8]
#   --cpus-per-gpu C    CPU cores per rank [8]
#   --time T            time limit of each job [24:00:00]
#   --launcher L        srun (one task per GPU) | deepspeed (one task per node) [srun]
#   --parts P           reference-cache job-array tasks, each on --nodes nodes [4]
#   --signal-seconds S  USR1 this long before the time limit: checkpoint and requeue; the job requeues
#                       30 s before the limit even if the trainer is still busy [300]
#   --partition X, --account A, --qos Q   passed to sbatch
#   --no-gpus           request no GPUs (CPU partitions, tests); G is then the number of ranks per node
#   --wait              wait for the last job and exit with its exit code
#   --dry-run           print the sbatch commands instead of running them
# Prints one line per submitted job: STAGE JOBID. Logs: NAME-JOBID.out in the current directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
usage() { sed -n '2,20s/^# \{0,1\}//p' "$0" >&2; exit 2; }
die() { echo "submit.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage
config="$1"; shift
[ -f "$config" ] || [ ! -f "$here/$config.yaml" ] || config="$here/$config.yaml"
[ -f "$config" ] || die "config not found: $config"

stage=all nodes=1 gpus=8 cpus_per_gpu=8 time_limit=24:00:00 launcher=srun parts=4 signal_s=300
use_gpus=1 wait=0 dry=0 extra_sbatch=() vbon_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --cpus-per-gpu) cpus_per_gpu="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --signal-seconds) signal_s="$2"; shift 2 ;;
    --partition|--account|--qos) extra_sbatch+=("$1=$2"); shift 2 ;;
    --no-gpus) use_gpus=0; shift ;;
    --wait) wait=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; vbon_extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown option $1 (see the top of $0)" ;;
  esac
done
case "$stage" in refcache|train|evaluate|bon|all) ;; *) die "--stage: unknown stage $stage" ;; esac
case "$launcher" in srun|deepspeed) ;; *) die "--launcher: expected srun or deepspeed, got $launcher" ;; esac
for n in "$nodes" "$gpus" "$cpus_per_gpu" "$parts" "$signal_s"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$n'"
done

# The two launchers need different task layouts for the same GPUs and cores.
if [ "$launcher" = srun ]; then
  tasks=(--ntasks-per-node="$gpus" --cpus-per-task="$cpus_per_gpu")
else
  tasks=(--ntasks-per-node=1 --cpus-per-task=$((gpus * cpus_per_gpu)))
fi
if [ "$use_gpus" = 1 ]; then gpu_request=(--gpus-per-node="$gpus"); else gpu_request=(--gpus-per-node=0); fi
name="$(basename "$config" .yaml)"

# submit STAGE [sbatch options...]: submits one job; prints "STAGE JOBID" and sets $jobid.
submit() {
  local what="$1"; shift
  local cmd=(sbatch --parsable --job-name="vbon-$what-$name" --nodes="$nodes" "${tasks[@]}" "${gpu_request[@]}"
    --time="$time_limit" --signal="B:USR1@$signal_s" --export="ALL,VBON_PROCS_PER_NODE=$gpus$exports"
    "${extra_sbatch[@]}" "$@" "$here/slurm_vbon.sbatch" --launcher "$launcher" "${what%%-*}" --config "$config"
    "${vbon_extra[@]}")
  if [ "$dry" = 1 ]; then
    jobid="<$what>"; printf '%q ' "${cmd[@]}"; echo
  else
    local rc=0
    jobid="$("${cmd[@]}")" || rc=$?  # with --wait, sbatch exits with the job's exit code
    jobid="${jobid%%;*}"
    echo "$what $jobid"
    [ "$rc" = 0 ] || { echo "submit.sh: $what (job $jobid) failed with exit code $rc" >&2; exit "$rc"; }
  fi
}

stages=("$stage")
[ "$stage" != all ] || stages=(refcache train evaluate)
after=() exports=""
last=${stages[-1]}
for s in "${stages[@]}"; do
  waiting=()
  [ "$wait" = 1 ] && [ "$s" = "$last" ] && waiting=(--wait)
  if [ "$s" = refcache ] && [ "$parts" -gt 1 ]; then
    exports=",VBON_REFCACHE_PARTS=$parts"
    submit refcache-array --array="0-$((parts - 1))" "${after[@]}"
    exports=""
    submit refcache-merge --dependency="afterany:$jobid" "${waiting[@]}"
  else
    submit "$s" "${after[@]}" "${waiting[@]}"
  fi
  after=(--dependency="afterok:$jobid" --kill-on-invalid-dep=yes)
done
