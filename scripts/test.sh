#!/usr/bin/env bash
# Runs every test of tollgate. Installs what the tests need when it is missing,
# so a fresh Debian machine passes: cargo-nextest (from crates.io), and — for
# the store and ledger tests that arrive with later crates — redis-server,
# PostgreSQL and faketime (the clock-skew test A11) from Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql)
command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need_apt[*]} from Debian packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Unit, integration and contract tests (the binary's tests run the real executable).
cargo nextest run --workspace --locked --no-fail-fast
# Doc examples (nextest does not run doctests).
cargo test --workspace --locked --doc --quiet
# Model-checked interleavings of the in-memory store's locking (RELIABILITY-PLAN A4).
# Built with its own cfg into its own target dir, so the main build stays cached.
# Only the test lines are shown; if the step fails (a compile error, say), its
# whole output is shown, so the cause is never hidden.
loom_log=$(mktemp)
if RUSTFLAGS="--cfg tollgate_loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p tollgate-core --locked --release --test it loom -- --nocapture >"$loom_log" 2>&1; then
  grep -E "^(test |test result)" "$loom_log"
  rm -f "$loom_log"
else
  status=$?
  cat "$loom_log"
  rm -f "$loom_log"
  echo "loom models failed (exit $status)" >&2
  exit "$status"
fi
