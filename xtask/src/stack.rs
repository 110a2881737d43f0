//! `cargo xtask up`: the whole system on this machine. The three services run as separate
//! processes (as they would in containers) next to a demo source server that serves the sample
//! data in `deploy/demo/`; logs go to `target/stack/logs/`. `cargo xtask down`, ctrl-c or
//! SIGTERM stops everything it started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use poem::http::StatusCode;
use poem::web::Query;
use poem::{get, handler, IntoResponse, Response, Route};
use serde::Deserialize;
use tokio::process::{Child, Command};

/// Where a running stack records its process id, so a second `up` can say so and `down` can
/// find it.
pub fn pid_file(target: &Path) -> PathBuf {
    target.join("stack").join("up.pid")
}

/// The pid of a stack that is still running, if any.
pub fn running(target: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(target))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success());
    alive.then_some(pid)
}

/// Asks a running stack to stop (it cleans up after itself) and waits until it has.
pub fn down(target: &Path) -> Result<()> {
    let Some(pid) = running(target) else {
        println!("no stack is running");
        return Ok(());
    };
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(target).is_some() {
        if Instant::now() > deadline {
            bail!("the stack (pid {pid}) did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stack stopped");
    Ok(())
}

/// The running services, stopped in reverse order on drop of the handle returned by `start`.
pub struct Stack {
    children: Vec<(&'static str, Child)>,
    pub query_addr: SocketAddr,
    pub logs: PathBuf,
    /// An admin API key made for this stack: the API asks for it, and with it the console's
    /// Run now and Replay work.
    pub api_key: String,
}

/// Builds the services, starts the demo source and the three services against `database_url`,
/// and waits until both demo sources are ingested and normalized.
pub async fn start(workspace: &Path, target: &Path, database_url: &str) -> Result<Stack> {
    crate::build_services(workspace, false).await?;
    let bin = target.join("debug");
    let stack_dir = target.join("stack");
    let logs = stack_dir.join("logs");
    std::fs::create_dir_all(&logs)?;

    let demo = serve_demo(workspace.join("deploy/demo")).await?;
    let template = std::fs::read_to_string(workspace.join("deploy/demo/sources.toml"))?;
    let sources = stack_dir.join("sources.toml");
    std::fs::write(&sources, template.replace("{demo}", &demo.to_string()))?;

    let (api_key, entry) = etl_query::access::new_key("operator", true);
    let keys = stack_dir.join("api-keys.toml");
    std::fs::write(&keys, entry)?;

    let query_addr = free_addr(8080)?;
    let mut stack = Stack {
        children: Vec::new(),
        query_addr,
        logs: logs.clone(),
        api_key,
    };
    let common = [
        ("DATABASE_URL", database_url.to_owned()),
        ("SOURCES_FILE", sources.display().to_string()),
        ("QUERY_API_KEYS_FILE", keys.display().to_string()),
        ("RUST_LOG", "info".to_owned()),
    ];
    let services: [(&'static str, (&str, String)); 3] = [
        (
            "etl-ingester",
            ("INGESTER_ADMIN_ADDR", free_addr(8081)?.to_string()),
        ),
        (
            "etl-normalizer",
            ("NORMALIZER_ADMIN_ADDR", free_addr(8082)?.to_string()),
        ),
        ("etl-query", ("QUERY_ADDR", query_addr.to_string())),
    ];
    for (name, (addr_var, addr)) in services {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let child = Command::new(bin.join(name))
            .envs(common.iter().map(|(k, v)| (*k, v.as_str())))
            .env(addr_var, addr)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        stack.children.push((name, child));
    }
    stack.wait_until_normalized(database_url).await?;
    Ok(stack)
}

impl Stack {
    async fn wait_until_normalized(&mut self, database_url: &str) -> Result<()> {
        let (client, connection) =
            tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            for (name, child) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited ({status}) during start-up; see {}",
                        self.logs.join(format!("{name}.log")).display()
                    );
                }
            }
            let done: bool = client
                .query_one(
                    "SELECT count(*) = 2 FROM (
                         SELECT source FROM etl_runs
                         WHERE service = 'ingester' AND status = 'success' AND source IN ('products', 'sensors')
                         GROUP BY source) ingested
                     WHERE NOT EXISTS (SELECT 1 FROM etl_pending p
                                       WHERE p.source = ingested.source AND p.pending_changes > 0)",
                    &[],
                )
                .await?
                .get(0);
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the demo sources were not ingested and normalized within 3 minutes; see {}",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM to every service (query first, so nothing is served half-stopped), then waits.
    pub async fn stop(mut self) -> Result<()> {
        let mut failures = Vec::new();
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => failures.push(format!("{name} exited with {status}")),
                _ => {
                    let _ = child.kill().await;
                    failures.push(format!("{name} did not stop within 20 s and was killed"));
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!(failures.join("; "))
        }
    }
}

/// `preferred` on 127.0.0.1 when it is free, else any free port.
fn free_addr(preferred: u16) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?;
    Ok(listener.local_addr()?)
}

#[derive(Deserialize)]
struct PageQuery {
    page: Option<usize>,
    per_page: Option<usize>,
}

/// The demo source server: `GET /api/products?page=&per_page=` (the items of
/// `products.json`, paginated) and `GET /exports/sensors.csv`.
async fn serve_demo(dir: PathBuf) -> Result<SocketAddr> {
    let products: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("products.json"))?)
            .context("deploy/demo/products.json")?;
    let sensors = std::fs::read(dir.join("sensors.csv")).context("deploy/demo/sensors.csv")?;

    #[handler]
    fn products_page(
        Query(q): Query<PageQuery>,
        poem::web::Data(items): poem::web::Data<&std::sync::Arc<Vec<serde_json::Value>>>,
    ) -> Response {
        let (page, per_page) = (
            q.page.unwrap_or(1).max(1),
            q.per_page.unwrap_or(100).clamp(1, 500),
        );
        let start = ((page - 1) * per_page).min(items.len());
        let end = (start + per_page).min(items.len());
        poem::web::Json(serde_json::json!({ "data": &items[start..end], "page": page }))
            .into_response()
    }

    use poem::EndpointExt;
    let app = Route::new()
        .at(
            "/api/products",
            get(products_page).data(std::sync::Arc::new(products)),
        )
        .at(
            "/exports/sensors.csv",
            get(poem::endpoint::make_sync(move |_| {
                Response::builder()
                    .status(StatusCode::OK)
                    .content_type("text/csv")
                    .body(sensors.clone())
            })),
        );
    let listener = tokio::net::TcpListener::bind(free_addr(8090)?).await?;
    let addr = listener.local_addr()?;
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener)?;
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    Ok(addr)
}
