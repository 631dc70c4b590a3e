# Developer recipes for gar-restarter. `just` is optional (`cargo install just`; it is not in
# Debian 12): every recipe is a plain cargo command, and CI runs .ci/run, not just.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# The real daemon against pstest and a fake Kubernetes API, fed sample GAR events.
demo *args:
    cargo xtask demo {{args}}

# Install what is missing, build the emulator, fmt + clippy, all tests, deploy/validate.sh.
test *args:
    cargo xtask test {{args}}

# The pstest Pub/Sub emulator in the foreground, set up for config/local.toml (Ctrl-C stops it).
emulator addr="127.0.0.1:8085":
    cargo xtask emulator --addr {{addr}}

# The daemon against `just emulator` and a real cluster; extra args go to `run` (e.g. --dry-run).
run-local kubeconfig="~/.kube/config" *args:
    PUBSUB_EMULATOR_HOST=127.0.0.1:8085 KUBECONFIG={{kubeconfig}} cargo run -p gar-restarter -- --config config/local.toml run {{args}}

# End-to-end figures (release build, pstest, fake API); micro figures: `cargo bench --bench lookup` and `--bench pipeline`. See BENCHMARKS.md.
bench *args:
    cargo xtask bench {{args}}

# Format everything.
fmt:
    cargo fmt --all

# What CI lints: rustfmt and clippy with warnings denied.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
