#!/usr/bin/env bash
# Checks the deployment files (deploy/check.py): the Kubernetes manifests against the schemas,
# every command, flag, config key and variable they (and the container files and the systemd
# units) give against the binary, and the units with systemd-analyze. Run from anywhere, after a
# build: `deploy/check.sh [TANDEM]` (default: the debug build of the workspace).
set -euo pipefail
cd "$(dirname "$0")/.."
tandem=${1:-${CARGO_TARGET_DIR:-target}/debug/tandem}
[ -x "$tandem" ] || cargo build -p tandem
venv=target/deploy-venv
[ -x $venv/bin/pip ] || python3 -m venv $venv
$venv/bin/pip install -q 'kubernetes-validate==1.37.0' 'PyYAML>=6,<7' 'jsonschema>=4,<5'
exec $venv/bin/python deploy/check.py "$tandem"
