#!/usr/bin/env bash
# The test command: installs what is missing (QEMU >= 10), checks formatting and lints
# (the whole workspace, bench included, warnings are errors), then runs every test,
# including the ones that boot real Linux guests under QEMU. The guest image is built
# and cached by the tests themselves (`walkabout image build`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
export CARGO_TERM_COLOR=never
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
