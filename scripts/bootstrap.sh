#!/usr/bin/env bash
# Installs everything clipsearch needs on a fresh machine: system packages, .venv (runtime, export, dev),
# .venv-sam (AWS SAM CLI, kept apart because it pins older boto3/click) and .venv-checkov. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
log=.cache/bootstrap.log
: > "$log"

# Runs a step quietly; on failure shows the end of its output.
quiet() {
  if ! "$@" >> "$log" 2>&1; then
    echo "bootstrap: failed: $*" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}
echo "bootstrap: installing into .venv and .venv-sam (log: $log)" >&2

need_apt=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]} from Debian" >&2
  quiet apt-get update -qq
  DEBIAN_FRONTEND=noninteractive quiet apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  quiet python3 -m venv .venv
fi
quiet .venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 resolves to the CPU wheel on this machine's disk; nothing may pull torchvision.
quiet .venv/bin/python -m pip install -q -e ".[export,local,dev]"
# open_clip's wheel carries the reference CLIP BPE vocabulary and tokenizer; its dependencies would pull a
# CUDA torchvision, so it is installed alone.
quiet .venv/bin/python -m pip install -q --no-deps "open_clip_torch==3.3.0"

if [ "${CLIPSEARCH_SKIP_SAM:-0}" != "1" ] && [ ! -x .venv-sam/bin/sam ]; then
  quiet python3 -m venv .venv-sam
  quiet .venv-sam/bin/python -m pip install -q --upgrade pip
  quiet .venv-sam/bin/python -m pip install -q "aws-sam-cli==1.170.0" "cfn-lint==1.58.0"
fi

# checkov (the template's static security check) would downgrade .venv's boto3 to 1.35: its own venv
# (~70 s, 289 MB).
if [ "${CLIPSEARCH_SKIP_CHECKOV:-0}" != "1" ] && [ ! -x .venv-checkov/bin/checkov ]; then
  quiet python3 -m venv .venv-checkov
  quiet .venv-checkov/bin/python -m pip install -q --upgrade pip
  quiet .venv-checkov/bin/python -m pip install -q "checkov==3.3.30"
fi
echo "bootstrap: done" >&2
