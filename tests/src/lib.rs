//! Test harness: every test gets its own database, cloned from a template that was migrated once,
//! and dropped when the test ends. Tests therefore run in parallel (nextest runs each in its own
//! process) without seeing each other's rows.
//!
//! The server comes from `DATABASE_URL`, which `cargo xtask test` sets to the Postgres it
//! provisioned (an existing one, or a throwaway cluster).

mod browser;
mod fixtures;

use std::time::Duration;

pub use browser::{screenshot_dir, Browser};
pub use fixtures::{sources_toml, streamed_csv, SourceToml, SourcesFile, TestServer};

pub use etl_shared::db::url_with_database as with_database;
use etl_shared::DatabaseSettings;
use tokio_postgres::{Client, NoTls};

/// Serializes template creation across test processes (session advisory lock on the server).
const TEMPLATE_LOCK_KEY: i64 = 0x6574_6c5f_746d_706c; // "etl_tmpl"

/// A database that exists for one test.
pub struct TestDb {
    pub name: String,
    /// Connection URL for this database, as a service would get it in `DATABASE_URL`.
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// A fresh database with the current schema.
    pub async fn new() -> Self {
        let admin_url = admin_url();
        let template = ensure_template(&admin_url).await;
        Self::create(admin_url, Some(&template)).await
    }

    /// A fresh database with no schema at all (for testing the migrations themselves).
    pub async fn empty() -> Self {
        Self::create(admin_url(), None).await
    }

    async fn create(admin_url: String, template: Option<&str>) -> Self {
        capture_logs();
        let name = format!("etl_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_url).await;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {} TEMPLATE {}", ident(&name), ident(t)),
            None => format!("CREATE DATABASE {}", ident(&name)),
        };
        admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let url = with_database(&admin_url, &name);
        Self {
            name,
            url,
            admin_url,
        }
    }

    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings::from_url(&self.url).expect("test database URL is valid")
    }

    /// A connection of its own to this database.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

impl TestDb {
    /// `rows` normalized records of `source`, each with a description of 1,200 bytes, written
    /// straight into `normalized_data` (the reads under test do not care how they came).
    pub async fn seed_large_records(&self, source: &str, rows: i64) {
        let client = self.client().await;
        client
            .execute("SELECT etl_ensure_partition($1)", &[&source])
            .await
            .expect("the source's partition");
        client
            .execute(
                "INSERT INTO normalized_data (source, source_id, name, value, description)
                 SELECT $1, g::text, 'item ' || g, g, repeat('x', 1200)
                 FROM generate_series(1, $2::bigint) g",
                &[&source, &rows],
            )
            .await
            .expect("seed records");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot be async, and we may be inside a runtime: do it on a thread of its own.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&self.name));
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping a test database")
                .block_on(async { connect(&admin_url).await.batch_execute(&sql).await })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// Sends the logs of services running inside the test process to the test's captured output,
/// which the runner prints when the test fails (and hides when it passes). Installed by
/// [`TestDb`], so every test that runs a service in-process has it; `RUST_LOG` overrides the
/// level. (Services started as processes log to files: see [`ServiceProcess::log_tail`].)
pub fn capture_logs() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // A test that installed its own subscriber keeps it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

/// The server URL the harness works from.
pub fn admin_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set. Run the suite with `cargo xtask test` (or `just test`), which \
             starts a throwaway Postgres, or point DATABASE_URL at a server where this user may \
             CREATE DATABASE."
        ),
    }
}

/// Creates (once per migration set) a migrated template database and returns its name. The name
/// carries a checksum of the embedded migrations, so editing a migration yields a new template
/// instead of silently testing the old schema.
async fn ensure_template(admin_url: &str) -> String {
    let name = format!("etl_template_{:016x}", migrations_checksum());
    let admin = connect(admin_url).await;
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK_KEY])
        .await
        .expect("template lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("look up template")
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        // Left over if an earlier run died mid-migration. (Two statements: DROP DATABASE cannot
        // share an implicit transaction.)
        for sql in [
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            "CREATE DATABASE {}",
        ] {
            admin
                .batch_execute(&sql.replace("{}", &ident(&building)))
                .await
                .expect("create template database");
        }
        let settings =
            DatabaseSettings::from_url(&with_database(admin_url, &building)).expect("template URL");
        etl_shared::migrate(&settings)
            .await
            .expect("migrate the template database");
        // Renamed only once complete, so a crash mid-migration never leaves a half template.
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} RENAME TO {}",
                ident(&building),
                ident(&name)
            ))
            .await
            .expect("publish template database");
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK_KEY])
        .await
        .expect("template unlock");
    name
}

fn migrations_checksum() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    etl_shared::migrate::embedded_migrations().hash(&mut hasher);
    hasher.finish()
}

/// A connection with its driver running in the background.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    tokio::spawn(connection);
    client
}

/// A backend of the query service (by its `application_name`) in the middle of a statement, as
/// under API load: what the pipeline's writers yield to. Cancelled when dropped.
pub struct BusyReader {
    cancel: tokio_postgres::CancelToken,
    statement: tokio::task::JoinHandle<()>,
}

impl BusyReader {
    pub async fn start(url: &str) -> Self {
        let separator = if url.contains('?') { '&' } else { '?' };
        let application = etl_shared::pacing::READER_APPLICATION;
        let client = connect(&format!("{url}{separator}application_name={application}")).await;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let cancel = client.cancel_token();
        let statement = tokio::spawn(async move {
            let _ = client.batch_execute("SELECT pg_sleep(120)").await;
        });
        // This reader's own backend, so a second reader does not pass on the first one's.
        let watcher = connect(url).await;
        wait_for(
            "the reader's statement to run",
            Duration::from_secs(10),
            || async {
                let row = watcher
                    .query_opt(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                        &[&pid],
                    )
                    .await
                    .unwrap();
                row.map(|_| ())
            },
        )
        .await;
        Self { cancel, statement }
    }
}

impl Drop for BusyReader {
    fn drop(&mut self) {
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let _ = cancel.cancel_query(NoTls).await;
        });
        self.statement.abort();
    }
}

/// What a Prometheus counter reads in `exposition` (0 when absent).
pub fn counter_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A quoted SQL identifier (names here are generated, but quoting keeps them exact).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Polls `condition` until it returns `Some`, failing the test after `deadline`. Tests wait for
/// what they expect instead of sleeping for a guessed time.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `LISTEN`ing connection whose notifications arrive on a channel, for asserting what the
/// services announce (and, with [`Listener::quiet_until_marker`], what they do not).
pub struct Listener {
    client: Client,
    url: String,
    channel: String,
    notifications: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
}

impl Listener {
    pub async fn start(url: &str, channel: &str) -> Self {
        use futures_util::StreamExt;
        let (client, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect listener");
        let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n);
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", ident(channel)))
            .await
            .expect("LISTEN");
        Self {
            client,
            url: url.into(),
            channel: channel.into(),
            notifications,
        }
    }

    /// The next notification's payload, failing the test after `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> String {
        tokio::time::timeout(deadline, self.notifications.recv())
            .await
            .expect("no notification before the deadline")
            .expect("listener connection closed")
            .payload()
            .to_owned()
    }

    /// Everything notified before now: sends a marker from another session and collects what
    /// arrives ahead of it. Postgres delivers notifications in commit order, so anything
    /// committed earlier shows up here.
    pub async fn drain(&mut self) -> Vec<String> {
        let marker = format!("marker-{}", uuid::Uuid::new_v4());
        let other = connect(&self.url).await;
        other
            .execute("SELECT pg_notify($1, $2)", &[&self.channel, &marker])
            .await
            .expect("send marker");
        let mut before = Vec::new();
        loop {
            let payload = self.next(Duration::from_secs(10)).await;
            if payload == marker {
                return before;
            }
            before.push(payload);
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// A TCP proxy in front of Postgres that a test can cut and restore, to show what the services
/// do while the database is unreachable (without stopping the server other tests share).
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// While true, no byte moves either way, but every connection stays open.
    frozen: tokio::sync::watch::Sender<bool>,
    /// Bytes passed on from clients to the server, over every connection so far.
    to_server: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TcpProxy {
    /// Proxies 127.0.0.1:<free port> to the Postgres server behind `database_url`.
    pub async fn to_database(database_url: &str) -> Self {
        let (host, port, _) = server_of(database_url);
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .expect("resolve the database host")
            .next()
            .expect("an address");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accept_up, accept_links) = (up.clone(), links.clone());
        let (frozen, thawed) = tokio::sync::watch::channel(false);
        let to_server = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = to_server.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                // Checked and registered under the lock `cut` takes, so no link accepted as the
                // cut happens escapes it.
                let mut links = accept_links.lock().unwrap();
                if !accept_up.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let thawed = thawed.clone();
                let counted = counted.clone();
                let link = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        let (from_client, to_client) = inbound.into_split();
                        let (from_server, to_server) = outbound.into_split();
                        tokio::join!(
                            pump(from_client, to_server, thawed.clone(), Some(counted)),
                            pump(from_server, to_client, thawed, None)
                        );
                    }
                });
                links.push(link.abort_handle());
            }
        });
        Self {
            addr,
            up,
            links,
            frozen,
            to_server,
        }
    }

    /// Bytes clients have sent the server through this proxy so far.
    pub fn bytes_to_server(&self) -> u64 {
        self.to_server.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops every byte in both directions without closing anything, as a network partition
    /// or a frozen pod would: peers see silence, not a reset.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets bytes through again; what was held back is delivered.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// `url` (a postgres:// URL) pointed at this proxy instead of the server.
    pub fn url_for(&self, url: &str) -> String {
        url_at(url, self.addr)
    }

    /// Cuts every open connection and refuses new ones.
    pub fn cut(&self) {
        let mut links = self.links.lock().unwrap();
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in links.drain(..) {
            link.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Path of a service binary built by `cargo xtask test` (which passes the folder in
/// `ETL_BIN_DIR`), for tests that run the real binaries as processes.
pub fn service_binary(name: &str) -> std::path::PathBuf {
    let dir = std::env::var("ETL_BIN_DIR").expect(
        "ETL_BIN_DIR is not set: run the suite with `cargo xtask test`, which builds the binaries",
    );
    std::path::PathBuf::from(dir).join(name)
}

/// A service running as a process, its output in a log file (shown when a test fails).
pub struct ServiceProcess {
    pub name: &'static str,
    pub child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl ServiceProcess {
    pub fn start(name: &'static str, env: &[(&str, String)]) -> Self {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("etl-test-{name}-{}-{n}.log", std::process::id()));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(service_binary(name))
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name, child, log }
    }

    /// Sends a signal (`-TERM`, `-KILL`, …) to the process.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = tokio::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGTERM, then the exit code (failing the test if it takes over 20 s).
    pub async fn stop(&mut self) -> Option<i32> {
        self.signal("-TERM").await;
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not stop on SIGTERM:\n{}",
                    self.name,
                    self.log_tail()
                )
            })
            .unwrap();
        status.code()
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's peak resident memory so far, in KiB (VmHWM: the kernel's own high-water
    /// mark, so one read after the work is exact).
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("still running");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .expect("VmHWM in /proc/<pid>/status")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Copies bytes one way until either side closes, holding them while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
    counted: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            break;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read just as the freeze began: held until the thaw, as a stalled network would.
        if frozen.wait_for(|frozen| !frozen).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            break;
        }
        if let Some(counted) = &counted {
            counted.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let _ = to.shutdown().await;
}

/// The TCP host, port and user a database URL names (tests put things in front of them).
fn server_of(database_url: &str) -> (String, u16, String) {
    let config: tokio_postgres::Config = database_url.parse().expect("database URL");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => panic!("a TCP database URL is needed here"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    (host, port, user)
}

/// `url` (a postgres:// URL) with its host and port replaced by `addr`, user and path kept.
pub fn url_at(url: &str, addr: std::net::SocketAddr) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority.rfind('@').map_or("", |i| &authority[..=i]);
    format!(
        "{}{userinfo}{addr}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    )
}

/// A free port on 127.0.0.1 for a service under test to listen on. The port is free now but
/// is bound by the service only later, so it is drawn at random below Linux's ephemeral range
/// (32768 and up): there, a test server or client binding port 0 in a parallel test cannot be
/// handed the same port meanwhile (that happened: a console test's query port answered 404
/// from another test's source server).
pub fn free_local_addr() -> std::net::SocketAddr {
    const PORTS: std::ops::Range<u16> = 20_000..32_000;
    for _ in 0..1_000 {
        let draw = uuid::Uuid::new_v4().as_u128() % u128::from(PORTS.end - PORTS.start);
        let port = PORTS.start + u16::try_from(draw).expect("below the range's width");
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("a bound address");
        }
    }
    panic!("no free port on 127.0.0.1 in {PORTS:?}")
}

/// An admin token in a file of its own, for `ADMIN_TOKEN_FILE` (removed when dropped).
pub struct AdminTokenFile {
    pub token: String,
    pub path: std::path::PathBuf,
}

impl AdminTokenFile {
    pub fn new() -> Self {
        let token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
        let path = std::env::temp_dir().join(format!("etl-admin-token-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("{token}\n")).expect("write the admin token");
        Self { token, path }
    }

    /// The value of `ADMIN_TOKEN_FILE`.
    pub fn env_value(&self) -> String {
        self.path.display().to_string()
    }
}

impl Default for AdminTokenFile {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AdminTokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The three services as processes, sharing `env` (database, sources file, tuning), each on a
/// port of its own, with an admin token (`admin_token`) for the ingester's actions.
pub struct Pipeline {
    pub services: Vec<ServiceProcess>,
    pub ingester_admin: std::net::SocketAddr,
    pub normalizer_admin: std::net::SocketAddr,
    pub query_addr: std::net::SocketAddr,
    pub admin_token: AdminTokenFile,
}

impl Pipeline {
    pub fn start(env: &[(&'static str, String)]) -> Self {
        let (ingester_admin, normalizer_admin, query_addr) =
            (free_local_addr(), free_local_addr(), free_local_addr());
        let admin_token = AdminTokenFile::new();
        let with = |var: &'static str, addr: std::net::SocketAddr| {
            let mut env = env.to_vec();
            env.push((var, addr.to_string()));
            if !env.iter().any(|(k, _)| *k == "ADMIN_TOKEN_FILE") {
                env.push(("ADMIN_TOKEN_FILE", admin_token.env_value()));
            }
            env
        };
        Self {
            services: vec![
                ServiceProcess::start("etl-ingester", &with("INGESTER_ADMIN_ADDR", ingester_admin)),
                ServiceProcess::start(
                    "etl-normalizer",
                    &with("NORMALIZER_ADMIN_ADDR", normalizer_admin),
                ),
                ServiceProcess::start("etl-query", &with("QUERY_ADDR", query_addr)),
            ],
            ingester_admin,
            normalizer_admin,
            query_addr,
            admin_token,
        }
    }

    /// The query API's base URL.
    pub fn api(&self) -> String {
        format!("http://{}", self.query_addr)
    }

    /// Fails the test if a service has exited.
    pub fn assert_running(&mut self) {
        for service in &mut self.services {
            assert!(
                service.child.try_wait().unwrap().is_none(),
                "{} exited:\n{}",
                service.name,
                service.log_tail()
            );
        }
    }

    /// SIGTERM to each; every one must exit with code 0.
    pub async fn stop(&mut self) {
        for service in &mut self.services {
            let code = service.stop().await;
            assert_eq!(code, Some(0), "{}:\n{}", service.name, service.log_tail());
        }
    }
}

/// PgBouncer (Debian's `pgbouncer` package) in front of the test server, in the given pool mode
/// (`transaction`, `session`), for showing what the services do behind a pooler. Runs as the
/// `postgres` user when the tests run as root (PgBouncer refuses root); stopped on drop.
pub struct PgBouncer {
    pub addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl PgBouncer {
    pub async fn start(database_url: &str, pool_mode: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let (host, port, user) = server_of(database_url);
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .expect(
                "pgbouncer is not installed: `apt-get install pgbouncer` (.ci/run installs it)",
            );
        let dir = std::env::temp_dir().join(format!(
            "etl-test-pgbouncer-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let addr = free_local_addr();
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = {pool_mode}\n\
                 default_pool_size = 3\nmax_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits\n",
                addr.port(),
                dir.join("users.txt").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("pgbouncer.log")).unwrap();
        let mut command = std::process::Command::new(binary);
        command
            .arg(dir.join("pgbouncer.ini"))
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let run_as = xtask::pg::unprivileged_user().expect("a `postgres` user to run PgBouncer as");
        if let Some((uid, gid)) = run_as {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().expect("start pgbouncer");
        let bouncer = Self { addr, dir, child };
        wait_for("pgbouncer to listen", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
        bouncer
    }

    /// `url` (a postgres:// URL to the server behind it) pointed at PgBouncer instead.
    pub fn url_for(&self, url: &str) -> String {
        url_at(url, self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
