//! Tools from npm, pinned with their whole tree by a committed lockfile and installed with
//! `npm ci` into a folder under `target/`, again only when the lockfile changes.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::pyclient::run_reporting_nothing;

/// `npm ci` of `sources`' `package.json` and `package-lock.json` into `tools`, unless the same
/// lockfile is installed there already.
pub fn install(sources: &Path, tools: &Path, what: &str) -> Result<()> {
    let lock = std::fs::read(sources.join("package-lock.json"))?;
    let marker = tools.join(format!("installed-{:016x}", fingerprint(&lock)));
    if marker.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing {what} into {}", tools.display());
    let _ = std::fs::remove_dir_all(tools);
    std::fs::create_dir_all(tools)?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(sources.join(file), tools.join(file))?;
    }
    run_reporting_nothing(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .current_dir(tools),
        &[],
    )
    .with_context(|| format!("npm ci of {what} (Debian: apt-get install nodejs npm)"))?;
    std::fs::write(&marker, "")?;
    Ok(())
}

/// FNV-1a: tells one lockfile from another, so a changed pin reinstalls.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
