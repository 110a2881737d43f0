//! Developer tooling behind `cargo xtask`. The library part is the Postgres bootstrap, kept here
//! so its tests can drive it directly.

pub mod bench;
pub mod browser;
pub mod npm;
pub mod pg;
pub mod pyclient;
pub mod stack;
pub mod tsclient;

/// Builds the three service binaries (`--release` when asked) in `workspace`.
pub async fn build_services(workspace: &std::path::Path, release: bool) -> anyhow::Result<()> {
    let mut command =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(["build", "--quiet", "--bins"]);
    if release {
        command.arg("--release");
    }
    let status = command
        .args([
            "-p",
            "etl-ingester",
            "-p",
            "etl-normalizer",
            "-p",
            "etl-query",
        ])
        .current_dir(workspace)
        .status()
        .await?;
    anyhow::ensure!(status.success(), "building the services failed");
    Ok(())
}
