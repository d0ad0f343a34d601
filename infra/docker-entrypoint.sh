#!/bin/bash
# Container entrypoint: `rdeic` by default, so `docker run IMAGE archive --config ...` is `rdeic archive ...`.
# Commands that are not rdeic subcommands or flags (bash, sh, ray, python, pip, an absolute path) are run as
# given: the Ray cluster launcher starts its containers with `bash`, and debugging needs a shell.
set -euo pipefail
case "${1:-}" in
    bash|sh|ray|python|python3|pip|env|tini|/*)
        exec "$@"
        ;;
esac
exec rdeic "$@"
