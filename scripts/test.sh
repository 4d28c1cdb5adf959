#!/usr/bin/env bash
# The test command: installs what is missing (QEMU >= 10), checks formatting and lints
# (the whole workspace, bench included, warnings are errors), then runs every test with
# cargo-nextest, including the ones that boot real Linux guests under QEMU. The guest
# image is built and cached by the tests themselves (`walkabout image build`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
export CARGO_TERM_COLOR=never
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# cargo-nextest (on every machine of this kind; installed if missing) runs each test in
# its own process, the end-to-end ones two at a time from every file at once
# (.config/nextest.toml); the doc tests it does not run follow.
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
cargo nextest run --workspace --locked "$@"
cargo test --workspace --locked --doc
