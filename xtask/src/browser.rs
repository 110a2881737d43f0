//! The console's browser tests drive Debian's chromium through playwright-core (which brings no
//! browser of its own) and check pages with axe-core, both from npm, pinned by
//! `tests/browser/package-lock.json`. Their bridge script is placed beside the installed
//! modules, where node resolves its imports.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Installs the browser tools under `target/browsertools` and returns the bridge script's path.
pub fn install(workspace: &Path, target_dir: &Path) -> Result<PathBuf> {
    let sources = workspace.join("tests/browser");
    let tools = target_dir.join("browsertools");
    crate::npm::install(&sources, &tools, "playwright-core and axe-core")?;
    let bridge = tools.join("bridge.mjs");
    std::fs::copy(sources.join("bridge.mjs"), &bridge)?;
    Ok(bridge)
}
