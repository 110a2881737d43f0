# Developer commands. Each is a thin alias: without `just`, run the command after the colon.

# List the recipes.
default:
    @just --list

# The whole system: Postgres, migrations, the three services and a demo source; ctrl-c stops it.
up:
    cargo xtask up

# Run the whole test suite against a self-provisioned Postgres.
test *args:
    cargo xtask test {{args}}

# Measure the pipeline against Postgres's own ceiling; writes BENCHMARKS.md (`--quick`: a smoke run).
bench *args:
    cargo xtask bench {{args}}

# Formatting and lints, exactly as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Stop a stack started by `just up` in another terminal.
down:
    cargo xtask down
