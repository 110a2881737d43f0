//! The spec's outside checks: a real OpenAPI validator, a real client generator and
//! schemathesis, from PyPI, in a virtualenv under `target/`. `cargo xtask test` runs the first
//! two before the suite; the suite then drives the running API through the generated client and
//! with schemathesis.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Pinned, so a new release cannot change what CI checks without a commit.
const TOOLS: [&str; 3] = [
    "openapi-spec-validator==0.9.0",
    "openapi-python-client==0.29.1",
    "schemathesis==4.32.5",
];

/// Where the generated client and the Python that can run it are.
pub struct GeneratedClient {
    pub python: PathBuf,
    /// Put on `PYTHONPATH`: it holds the client package.
    pub package_dir: PathBuf,
}

/// Validates `spec` and generates a Python client from it under `target_dir`.
pub fn validate_and_generate(workspace: &Path, target_dir: &Path) -> Result<GeneratedClient> {
    let venv = target_dir.join("pytools");
    let bin = venv.join("bin");
    let marker = venv.join(format!("installed-{}", TOOLS.join("-")));
    if !marker.exists() {
        eprintln!(
            "xtask: installing {} into {}",
            TOOLS.join(", "),
            venv.display()
        );
        run(Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg("--clear")
            .arg(&venv))
        .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
        run(Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(TOOLS))
        .context("pip install of the OpenAPI tools")?;
        std::fs::write(&marker, "")?;
    }
    let spec = workspace.join("services/query/openapi.json");
    run(Command::new(bin.join("openapi-spec-validator")).arg(&spec))
        .context("the committed OpenAPI spec is not valid")?;
    let out = target_dir.join("generated/etl-query-client");
    run(Command::new(bin.join("openapi-python-client"))
        .arg("generate")
        .arg("--path")
        .arg(&spec)
        .arg("--config")
        .arg(workspace.join("services/query/openapi-python-client.yaml"))
        .arg("--output-path")
        .arg(&out)
        .arg("--overwrite"))
    .context("generating the Python client from the spec")?;
    Ok(GeneratedClient {
        python: bin.join("python"),
        package_dir: out,
    })
}

fn run(command: &mut Command) -> Result<()> {
    run_reporting_nothing(command, &["Warning", "Error"])
}

/// Runs `command`; fails when it fails or when its output holds any of `alarms` (matched
/// case-insensitively, colour codes aside): a generator's warning fails the check.
pub(crate) fn run_reporting_nothing(command: &mut Command, alarms: &[&str]) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "{:?} failed ({}):\n{text}",
            command.get_program(),
            output.status
        );
    }
    let lowered = text.to_lowercase();
    if alarms.iter().any(|a| lowered.contains(&a.to_lowercase())) {
        bail!("{:?} reported problems:\n{text}", command.get_program());
    }
    Ok(())
}
