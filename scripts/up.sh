#!/usr/bin/env bash
# The cluster on one machine: installs what is missing, builds Walkabout, and runs
# `walkabout up` (a controller and three agents on loopback, four guests walking about;
# Ctrl-C stops everything). Extra arguments go to `walkabout up` (e.g. --netns).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
cargo build --release --locked -p walkabout
exec target/release/walkabout up "$@"
