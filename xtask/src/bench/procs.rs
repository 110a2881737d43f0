//! The services under measurement, as separate processes (the release binaries), with their
//! peak resident memory read from `/proc/<pid>/status` (VmHWM, the kernel's own high-water mark).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// How to start the release binaries: where they are, the database, the sources file, logs.
#[derive(Clone)]
pub struct Launcher {
    pub bin_dir: PathBuf,
    pub logs: PathBuf,
    pub database_url: String,
    pub sources_file: PathBuf,
}

/// A running service.
pub struct Service {
    pub name: String,
    child: Child,
    peak_kib: u64,
}

/// A one-shot command's outcome.
pub struct Finished {
    pub seconds: f64,
    pub peak_kib: u64,
}

impl Launcher {
    fn command(&self, binary: &str, log_name: &str, args: &[&str]) -> Result<Command> {
        std::fs::create_dir_all(&self.logs)?;
        let log = std::fs::File::create(self.logs.join(format!("{log_name}.log")))?;
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("SOURCES_FILE", &self.sources_file)
            .env("RUST_LOG", "warn")
            .env("INGESTER_ADMIN_ADDR", "127.0.0.1:0")
            .env("NORMALIZER_ADMIN_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        Ok(command)
    }

    /// Starts a long-running service; `extra_env` adds or overrides variables.
    pub fn start(&self, binary: &str, extra_env: &[(&str, String)]) -> Result<Service> {
        let mut command = self.command(binary, binary, &[])?;
        command.envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())));
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        Ok(Service {
            name: binary.to_owned(),
            child,
            peak_kib: 0,
        })
    }

    /// Runs `binary args…` to completion and times it; fails when it exits non-zero.
    pub async fn run(&self, binary: &str, log_name: &str, args: &[&str]) -> Result<Finished> {
        let started = Instant::now();
        let mut child = self
            .command(binary, log_name, args)?
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let pid = child.id().context("a fresh child has a pid")?;
        let mut peak_kib = 0;
        let status = loop {
            peak_kib = peak_kib.max(peak_rss_kib(pid).unwrap_or(0));
            tokio::select! {
                status = child.wait() => break status?,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!(
                "`{binary} {}` failed ({status}); see {}",
                args.join(" "),
                self.logs.join(format!("{log_name}.log")).display()
            );
        }
        Ok(Finished { seconds, peak_kib })
    }
}

impl Service {
    /// Fails when the process has exited (it should not have).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly ({status})", self.name);
        }
        self.sample();
        Ok(())
    }

    /// The peak resident memory so far, in KiB.
    pub fn peak_kib(&mut self) -> u64 {
        self.sample();
        self.peak_kib
    }

    fn sample(&mut self) {
        if let Some(kib) = self.child.id().and_then(peak_rss_kib) {
            self.peak_kib = self.peak_kib.max(kib);
        }
    }

    /// SIGTERM, wait for a clean exit; returns the peak resident memory in KiB.
    pub async fn stop(mut self) -> Result<u64> {
        self.check_alive()?;
        let pid = self.child.id().context("a running child has a pid")?;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .with_context(|| format!("{} did not stop within 30 s of SIGTERM", self.name))??;
        if !status.success() {
            bail!("{} exited with {status} after SIGTERM", self.name);
        }
        Ok(self.peak_kib)
    }
}

/// VmHWM of a live process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
