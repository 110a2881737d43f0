//! The TypeScript side of the spec's outside checks: `@hey-api/openapi-ts` generates a client
//! from the committed spec and `tsc` type-checks it, with the suite's smoke script against it,
//! in strict mode. Both come from npm, pinned with their whole tree by the committed lockfile
//! (`services/query/tests/ts/package-lock.json`) and installed with `npm ci` under `target/`.
//! The suite then runs the compiled script with node against the running API.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::pyclient::run_reporting_nothing;

/// The compiled smoke script, and the node to run it with.
pub struct GeneratedClient {
    pub node: PathBuf,
    pub smoke_script: PathBuf,
}

pub fn generate_and_check(workspace: &Path, target_dir: &Path) -> Result<GeneratedClient> {
    let sources = workspace.join("services/query/tests/ts");
    let tools = target_dir.join("nodetools");
    crate::npm::install(&sources, &tools, "@hey-api/openapi-ts and typescript")?;
    let bin = tools.join("node_modules/.bin");
    let out = target_dir.join("generated/ts-client");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    run_reporting_nothing(
        Command::new(bin.join("openapi-ts"))
            .arg("--input")
            .arg(workspace.join("services/query/openapi.json"))
            .arg("--output")
            .arg(out.join("client"))
            .arg("--no-log-file")
            .env("NO_COLOR", "1"),
        &["warn", "error"],
    )
    .context("generating the TypeScript client from the spec")?;
    for file in ["client_smoke.ts", "tsconfig.json"] {
        std::fs::copy(sources.join(file), out.join(file))?;
    }
    run_reporting_nothing(
        Command::new(bin.join("tsc"))
            .arg("--project")
            .arg(out.join("tsconfig.json")),
        &["error"],
    )
    .context("type-checking the generated TypeScript client and the smoke script")?;
    Ok(GeneratedClient {
        node: PathBuf::from("node"),
        smoke_script: out.join("out/client_smoke.js"),
    })
}
