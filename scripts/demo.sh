#!/usr/bin/env bash
# A shorter tour than the main job (scripts/up.sh): installs what is missing, builds Walkabout, and runs `walkabout demo`
# (agents on loopback, real guests walking from host to host). Extra arguments go to
# `walkabout demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
cargo build --release --locked -p walkabout
exec target/release/walkabout demo "$@"
