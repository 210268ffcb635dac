#!/usr/bin/env bash
# Runs `.ci/run` the way CI does, on a fresh clone of the committed HEAD (no .venv, no
# target/), prints how long it took and how much disk the clone used, then deletes the
# clone. A clone with its libtorch wheel and build directory is several GB; clones left
# behind in /tmp once filled the disk that a later CI run needed.
#   scripts/ci-clean-clone.sh            # clone of HEAD into a temporary directory
#   KEEP_CLONE=1 scripts/ci-clean-clone.sh   # keep it (the path is printed)
set -euo pipefail
cd "$(dirname "$0")/.."
clone=$(mktemp -d /tmp/bdscan-ci.XXXXXX)
if [[ -z ${KEEP_CLONE:-} ]]; then
    trap 'rm -rf "$clone"' EXIT
fi
git clone --quiet "$PWD" "$clone"
echo "ci-clean-clone: $(git -C "$clone" rev-parse --short HEAD) in $clone" >&2
start=$(date +%s)
status=0
(cd "$clone" && .ci/run) || status=$?
echo "ci-clean-clone: exit $status after $(( $(date +%s) - start )) s; disk used: $(du -sh "$clone" | cut -f1)" \
     "(target $(du -sh "$clone/target" 2>/dev/null | cut -f1), .venv $(du -sh "$clone/.venv" 2>/dev/null | cut -f1))" >&2
exit $status
