//! The Postgres bootstrap behind `cargo xtask test` and `cargo xtask up`: use the server at
//! `DATABASE_URL` when it answers, otherwise make a throwaway cluster with the machine's own
//! `initdb`/`pg_ctl` under the build folder, and remove it again when done.
//!
//! `initdb` and `postgres` refuse to run as root (CI runs as root), so as root the cluster is
//! created and run as the unprivileged `postgres` system user.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where Debian-style packages put versioned server binaries (`/usr/lib/postgresql/15/bin`).
pub const VERSIONED_BIN_ROOT: &str = "/usr/lib/postgresql";

const INSTALL_HINT: &str = "install the PostgreSQL server binaries (Debian/Ubuntu: \
    `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; macOS: \
    `brew install postgresql@15`), or set DATABASE_URL to a server you run";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("no PostgreSQL server binaries found: looked for initdb and pg_ctl on PATH and under {VERSIONED_BIN_ROOT}/*/bin; {INSTALL_HINT}")]
    NoBinaries,
    #[error("running as root, and initdb/postgres refuse to run as root; no unprivileged `postgres` user exists to run them as (create one with `useradd --system postgres`, or run as a normal user)")]
    NoUnprivilegedUser,
    #[error("{step} failed: {detail}")]
    Step { step: String, detail: String },
    #[error("I/O error while {doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let doing = doing.into();
    move |source| BootstrapError::Io { doing, source }
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bin_dir: PathBuf,
}

impl PgBinaries {
    /// Finds the binaries on `PATH`, then under `/usr/lib/postgresql/<newest>/bin`.
    pub fn find() -> Result<Self, BootstrapError> {
        let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        Self::find_in(&path_dirs, Path::new(VERSIONED_BIN_ROOT))
    }

    /// As [`find`](Self::find), over explicit places (so tests can show the not-found message).
    pub fn find_in(path_dirs: &[PathBuf], versioned_root: &Path) -> Result<Self, BootstrapError> {
        let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
        if let Some(dir) = path_dirs.iter().find(|d| has_both(d)) {
            return Ok(Self {
                bin_dir: dir.clone(),
            });
        }
        let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir(versioned_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                has_both(&bin).then_some((version, bin))
            })
            .collect();
        versioned.sort();
        versioned
            .pop()
            .map(|(_, bin_dir)| Self { bin_dir })
            .ok_or(BootstrapError::NoBinaries)
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// The database the suite or the stack runs against.
#[derive(Debug)]
pub enum Database {
    /// The server at `DATABASE_URL`, left as it was found.
    External { url: String },
    /// A cluster made for this run, removed by [`Database::shutdown`] (or on drop).
    Throwaway(Cluster),
}

impl Database {
    /// A URL for the `postgres` maintenance database (or the external one as given); the test
    /// harness creates its databases from there.
    pub fn url(&self) -> String {
        match self {
            Database::External { url } => url.clone(),
            Database::Throwaway(cluster) => cluster.url(),
        }
    }

    pub fn shutdown(self) -> Result<(), BootstrapError> {
        match self {
            Database::External { .. } => Ok(()),
            Database::Throwaway(cluster) => cluster.stop(),
        }
    }
}

/// Uses `database_url` when it answers; otherwise starts a throwaway cluster under
/// `clusters_dir`. Clusters left behind by a killed earlier run are removed first.
pub async fn provision(
    database_url: Option<&str>,
    clusters_dir: &Path,
) -> Result<Database, BootstrapError> {
    if let Some(url) = database_url.filter(|u| !u.is_empty()) {
        match answers(url).await {
            Ok(()) => {
                return Ok(Database::External {
                    url: url.to_owned(),
                })
            }
            Err(why) => eprintln!(
                "DATABASE_URL is set but does not answer ({why}); starting a throwaway cluster instead"
            ),
        }
    }
    let binaries = PgBinaries::find()?;
    reap_stale(clusters_dir);
    tokio::task::spawn_blocking({
        let dir = clusters_dir.to_owned();
        move || Cluster::start(&binaries, &dir)
    })
    .await
    .expect("cluster start-up panicked")
    .map(Database::Throwaway)
}

/// Whether a server at `url` accepts a connection and a query within a few seconds.
pub async fn answers(url: &str) -> Result<(), String> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let attempt = async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let result = client.simple_query("SELECT 1").await.map(|_| ());
        drop(client);
        let _ = driver.await;
        result
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

/// How [`Cluster::halt`] stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    Fast,
    Immediate,
}

impl ShutdownMode {
    fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

/// A running throwaway cluster: TCP on 127.0.0.1 only, trust auth, durability off (it is
/// deleted afterwards, and fsync would only slow the suite down).
///
/// Every cluster is registered by an entry folder under the clusters folder, named after the
/// process that owns it. The cluster itself lives in that entry, or, when the server's user
/// cannot reach the build folder, in the system temp folder, and then the entry's `location`
/// file names it: [`reap_stale`] finds every cluster this checkout started, wherever it lives.
#[derive(Debug)]
pub struct Cluster {
    /// Holds `data/` and `server.log`.
    pub root: PathBuf,
    /// The registry entry under the clusters folder (the same folder as `root` unless the
    /// cluster lives in the temp folder).
    pub entry: PathBuf,
    pub port: u16,
    binaries: PgBinaries,
    run_as: Option<(u32, u32)>,
    stopped: bool,
}

/// Where [`Cluster::start_placed`] puts a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the clusters folder, or in the system temp folder when the server's user cannot
    /// reach the clusters folder (a checkout in a home directory closed to other users).
    Preferred,
    /// Always in the system temp folder (registered in the clusters folder all the same); lets
    /// tests exercise the fallback on any machine.
    TempFolder,
}

/// The file in a registry entry that names a cluster living outside it.
const LOCATION_FILE: &str = "location";
/// The file in a registry entry that overrides the owner named by the entry's folder name.
const OWNER_FILE: &str = "owner.pid";

const SERVER_SETTINGS: &str = "
# Added by xtask: a throwaway cluster for tests and local runs.
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
";

/// What a test cluster needs beyond the defaults: settings appended to `postgresql.conf`, files
/// placed in the data folder (owned by the server's user, mode 0600: TLS keys must be), and a
/// `pg_hba.conf` to replace the one initdb wrote.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub settings: String,
    pub files: Vec<(String, Vec<u8>)>,
    pub hba: Option<String>,
}

impl Cluster {
    /// Creates and starts a cluster in a new folder under `clusters_dir` (or the temp folder
    /// when the server's user cannot reach it).
    pub fn start(binaries: &PgBinaries, clusters_dir: &Path) -> Result<Self, BootstrapError> {
        Self::start_placed(binaries, clusters_dir, Placement::Preferred)
    }

    /// As [`start`](Self::start), choosing where the cluster lives.
    pub fn start_placed(
        binaries: &PgBinaries,
        clusters_dir: &Path,
        placement: Placement,
    ) -> Result<Self, BootstrapError> {
        Self::start_configured(binaries, clusters_dir, placement, &ServerConfig::default())
    }

    /// As [`start_placed`](Self::start_placed), with more server configuration (TLS, a
    /// stricter `pg_hba.conf`).
    pub fn start_configured(
        binaries: &PgBinaries,
        clusters_dir: &Path,
        placement: Placement,
        server: &ServerConfig,
    ) -> Result<Self, BootstrapError> {
        let run_as = unprivileged_user()?;
        // Built before anything is created, so a failure below still removes what was made.
        let mut cluster = Cluster {
            root: PathBuf::new(),
            entry: PathBuf::new(),
            port: 0,
            binaries: binaries.clone(),
            run_as,
            stopped: true,
        };
        (cluster.entry, cluster.root) = make_cluster_root(clusters_dir, run_as, placement)?;
        let data = cluster.data_dir();
        let initdb = |locale: &str| {
            let mut command = Command::new(binaries.tool("initdb"));
            command
                .arg("--pgdata")
                .arg(&data)
                .args([
                    "--username=postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ])
                .arg(locale);
            command
        };
        // C.UTF-8 sorts like C but folds case beyond ASCII (ILIKE 'É' finds 'é'); where the
        // machine lacks it, fall back to plain C.
        if cluster
            .run("initdb", &mut initdb("--locale=C.UTF-8"))
            .is_err()
        {
            let _ = fs::remove_dir_all(&data);
            cluster.run("initdb", &mut initdb("--no-locale"))?;
        }
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io("reading postgresql.conf"))?;
        text.push_str(SERVER_SETTINGS);
        text.push_str(&server.settings);
        fs::write(&conf, text).map_err(io("writing postgresql.conf"))?;
        let hba = server.hba.iter().map(|hba| ("pg_hba.conf", hba.as_bytes()));
        let files = server.files.iter().map(|(n, b)| (n.as_str(), b.as_slice()));
        for (name, contents) in files.chain(hba) {
            use std::os::unix::fs::OpenOptionsExt;
            let path = data.join(name);
            let _ = fs::remove_file(&path);
            let write = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, contents));
            write.map_err(io(format!("writing {}", path.display())))?;
            if let Some((uid, gid)) = cluster.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io(format!(
                    "handing {} to the postgres user",
                    path.display()
                )))?;
            }
        }

        // A free port can be taken between our probe and the server's bind: try a few.
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    let port_taken = e.to_string().contains("could not bind");
                    last_error = Some(e);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(last_error.expect("at least one start attempt"))
    }

    fn start_server(&mut self) -> Result<(), BootstrapError> {
        let log = self.root.join("server.log");
        let started = self.run(
            "pg_ctl start",
            Command::new(self.binaries.tool("pg_ctl"))
                .arg("--pgdata")
                .arg(self.data_dir())
                .arg("--log")
                .arg(&log)
                .args(["--wait", "--timeout=60", "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start"),
        );
        match started {
            Ok(_) => {
                self.stopped = false;
                Ok(())
            }
            Err(e) => Err(BootstrapError::Step {
                step: "starting the throwaway cluster".into(),
                detail: format!("{e}\n--- {} ---\n{}", log.display(), tail(&log, 15)),
            }),
        }
    }

    /// Stops the server but keeps its data, as an outage would: `Fast` disconnects sessions
    /// and checkpoints, `Immediate` is a crash (recovery replays the WAL on the next start).
    /// For fault tests; [`resume`](Self::resume) starts it again on the same port.
    pub fn halt(&mut self, mode: ShutdownMode) -> Result<(), BootstrapError> {
        pg_ctl_stop(&self.binaries, &self.data_dir(), self.run_as, mode)?;
        self.stopped = true;
        Ok(())
    }

    /// Starts a halted server again, on the same port.
    pub fn resume(&mut self) -> Result<(), BootstrapError> {
        self.start_server()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The file that names the process owning this cluster, when it is not the one the entry's
    /// name says (tests point it at a dead process to stand for a killed run).
    pub fn owner_file(&self) -> PathBuf {
        self.entry.join(OWNER_FILE)
    }

    /// Stops the server (fast shutdown: sessions are disconnected) and deletes the folder.
    pub fn stop(mut self) -> Result<(), BootstrapError> {
        self.stop_and_remove()
    }

    fn stop_and_remove(&mut self) -> Result<(), BootstrapError> {
        if !self.stopped {
            self.stopped = true;
            stop_server(&self.binaries, &self.data_dir(), self.run_as)?;
        }
        // The cluster first, its registry entry last: an entry is never gone while its
        // cluster is still there to be found.
        for folder in [&self.root, &self.entry] {
            if !folder.as_os_str().is_empty() && folder.exists() {
                fs::remove_dir_all(folder).map_err(io(format!(
                    "removing the cluster folder {}",
                    folder.display()
                )))?;
            }
        }
        Ok(())
    }

    fn run(&self, step: &str, command: &mut Command) -> Result<Output, BootstrapError> {
        run_as(command, self.run_as, &self.root);
        checked(step, command)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_remove() {
            eprintln!("could not clean up the throwaway cluster: {e}");
        }
    }
}

/// Stops and deletes the clusters registered under `clusters_dir` whose owning process is gone
/// (a run that was killed before it could clean up), wherever they live, so they neither pile
/// up nor keep ports and memory.
pub fn reap_stale(clusters_dir: &Path) {
    let Ok(entries) = fs::read_dir(clusters_dir) else {
        return;
    };
    let Ok(binaries) = PgBinaries::find() else {
        return;
    };
    let run_as = unprivileged_user().ok().flatten();
    for entry in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        if owner_of(&entry).is_some_and(process_alive) {
            continue;
        }
        let root = fs::read_to_string(entry.join(LOCATION_FILE))
            .map(|location| PathBuf::from(location.trim_end()))
            .unwrap_or_else(|_| entry.clone());
        let data = root.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = stop_server(&binaries, &data, run_as);
        }
        for folder in [&root, &entry] {
            match fs::remove_dir_all(folder) {
                Ok(()) => eprintln!("removed a stale throwaway cluster: {}", folder.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("could not remove stale cluster {}: {e}", folder.display()),
            }
        }
    }
}

/// The process that owns a registry entry: the one its `owner.pid` names, else the one in its
/// folder name (`cluster-<pid>-<n>`, written at creation, so no reaper sees an entry
/// without an owner).
fn owner_of(entry: &Path) -> Option<u32> {
    if let Ok(text) = fs::read_to_string(entry.join(OWNER_FILE)) {
        return text.trim().parse().ok();
    }
    let name = entry.file_name()?.to_str()?;
    name.strip_prefix("cluster-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Stops whatever server runs on `data` at once (an immediate shutdown), ignoring errors: the
/// last resort of a test guard, so a failing test leaves no server behind.
pub fn kill_server(data: &Path) {
    if let Ok(binaries) = PgBinaries::find() {
        let user = unprivileged_user().ok().flatten();
        let _ = pg_ctl_stop(&binaries, data, user, ShutdownMode::Immediate);
    }
}

fn stop_server(
    binaries: &PgBinaries,
    data: &Path,
    user: Option<(u32, u32)>,
) -> Result<(), BootstrapError> {
    // A fast stop waits for the shutdown checkpoint; if that hangs, an immediate one still ends it.
    pg_ctl_stop(binaries, data, user, ShutdownMode::Fast)
        .or_else(|_| pg_ctl_stop(binaries, data, user, ShutdownMode::Immediate))
}

/// `pg_ctl stop` of the server on `data` in `mode`, as `user`, waiting up to 30 s.
fn pg_ctl_stop(
    binaries: &PgBinaries,
    data: &Path,
    user: Option<(u32, u32)>,
    mode: ShutdownMode,
) -> Result<(), BootstrapError> {
    let mut command = Command::new(binaries.tool("pg_ctl"));
    command.arg("--pgdata").arg(data).args([
        "--wait",
        "--timeout=30",
        "--mode",
        mode.as_str(),
        "stop",
    ]);
    run_as(&mut command, user, data.parent().unwrap_or(data));
    checked("pg_ctl stop", &mut command).map(|_| ())
}

/// `None` when already unprivileged; the `postgres` user's (uid, gid) when running as root
/// (Postgres, and PgBouncer in the tests, refuse to run as root).
pub fn unprivileged_user() -> Result<Option<(u32, u32)>, BootstrapError> {
    if id(&["-u"]).as_deref() != Some("0") {
        return Ok(None);
    }
    let uid = id(&["-u", "postgres"]).and_then(|s| s.parse().ok());
    let gid = id(&["-g", "postgres"]).and_then(|s| s.parse().ok());
    match (uid, gid) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(BootstrapError::NoUnprivilegedUser),
    }
}

fn id(args: &[&str]) -> Option<String> {
    let out = Command::new("id").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A new registry entry under `clusters_dir` and the new, empty folder for one cluster that the
/// server's user can write: the entry itself when that user can reach it, else a folder in the
/// system temp folder that the entry names.
fn make_cluster_root(
    clusters_dir: &Path,
    user: Option<(u32, u32)>,
    placement: Placement,
) -> Result<(PathBuf, PathBuf), BootstrapError> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "cluster-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let entry = clusters_dir.join(&name);
    fs::create_dir_all(&entry).map_err(io(format!("creating {}", entry.display())))?;
    let hand_over = |dir: &Path| match user {
        Some((uid, gid)) => std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io(
            format!("handing {} to the postgres user", dir.display()),
        )),
        None => Ok(()),
    };
    if placement == Placement::Preferred {
        hand_over(&entry)?;
        if writable_by(&entry, user) {
            return Ok((entry.clone(), entry));
        }
    }
    // Named after this checkout too, so two checkouts never share one.
    let checkout = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        clusters_dir.hash(&mut hasher);
        hasher.finish() as u32
    };
    let fallback = std::env::temp_dir().join(format!("etl-pg-{checkout:08x}-{name}"));
    if placement == Placement::Preferred {
        eprintln!(
            "the postgres user cannot reach {}; using {} for the throwaway cluster",
            entry.display(),
            fallback.display()
        );
    }
    // Registered before it exists: a run killed from here on still leaves it findable.
    fs::write(
        entry.join(LOCATION_FILE),
        fallback.as_os_str().as_encoded_bytes(),
    )
    .map_err(io("registering the cluster's location"))?;
    fs::create_dir_all(&fallback).map_err(io(format!("creating {}", fallback.display())))?;
    hand_over(&fallback)?;
    Ok((entry, fallback))
}

fn writable_by(dir: &Path, user: Option<(u32, u32)>) -> bool {
    let mut command = Command::new("test");
    command.arg("-w").arg(dir);
    run_as(&mut command, user, Path::new("/"));
    command.output().is_ok_and(|o| o.status.success())
}

/// Runs `command` as `user` (when given), from a folder that user can enter: Postgres tools
/// complain when they cannot read their working directory.
fn run_as(command: &mut Command, user: Option<(u32, u32)>, cwd: &Path) {
    use std::os::unix::process::CommandExt;
    command.current_dir(cwd);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
}

fn checked(step: &str, command: &mut Command) -> Result<Output, BootstrapError> {
    let output = command.output().map_err(io(format!("running {step}")))?;
    if output.status.success() {
        return Ok(output);
    }
    Err(BootstrapError::Step {
        step: step.into(),
        detail: format!(
            "{}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

fn free_port() -> Result<u16, BootstrapError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

fn process_alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(file) = fs::File::open(path) else {
        return String::from("(no server log)");
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
