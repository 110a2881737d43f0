//! `cargo xtask bench [--quick]` (`just bench`): the pipeline measured against Postgres's own
//! ceiling on the same database, in one run, on deterministic data served over loopback.
//!
//! Two databases: in the first, the ceiling (COPY, set-based INSERT … ON CONFLICT) and each
//! stage alone (ingest CSV, ingest REST, re-ingest, normalize the backlog); in the second, the
//! three services together from empty (end to end), then freshness and the query API under load.
//! Figures never fail the run; only errors (a stage that fails, counts that don't add up) do.

mod load;
mod procs;
mod report;
mod sources;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etl_shared::db::url_with_database;
use etl_shared::raw::{self, RawJson, RawTable};
use tokio_postgres::{Client, NoTls};

use procs::Launcher;
use report::{mib, rate, ratio, thousands, Report};

/// How much to measure.
#[derive(Clone, Copy)]
pub struct Sizes {
    pub csv_rows: u64,
    pub rest_items: u64,
    pub load_seconds: u32,
    pub probes: u32,
}

impl Sizes {
    pub const FULL: Sizes = Sizes {
        csv_rows: 1_000_000,
        rest_items: 200_000,
        load_seconds: 10,
        probes: 100,
    };
    /// A smoke run (CI): every step, small enough for a minute.
    pub const QUICK: Sizes = Sizes {
        csv_rows: 20_000,
        rest_items: 5_000,
        load_seconds: 2,
        probes: 20,
    };
}

const CSV: &str = "csv";
const CSV_SMALL: &str = "csv_tenth";
const REST: &str = "rest";

pub struct Bench {
    pub workspace: PathBuf,
    pub target: PathBuf,
    /// A URL of the server to create the benchmark databases on.
    pub admin_url: String,
    pub sizes: Sizes,
    /// Where the table goes (`BENCHMARKS.md` for a full run).
    pub output: PathBuf,
}

impl Bench {
    pub async fn run(&self) -> Result<()> {
        self.build_release().await?;
        let work = self.target.join("bench");
        let sizes = self.sizes;
        eprintln!("bench: generating data ({} CSV rows)", sizes.csv_rows);
        let data_dir = work.join("data");
        let big = tokio::task::spawn_blocking({
            let dir = data_dir.clone();
            move || sources::csv_file(&dir, sizes.csv_rows)
        })
        .await??;
        let tenth = sources::csv_file(&data_dir, sizes.csv_rows / 10)?;
        let refreshed = tokio::task::spawn_blocking({
            let dir = data_dir.clone();
            move || sources::refreshed_csv_file(&dir, sizes.csv_rows)
        })
        .await??;
        let data_server = sources::serve(
            &[big.clone(), tenth.clone()],
            &[(big.clone(), refreshed)],
            sizes.rest_items,
        )
        .await?;
        let server = data_server.addr;
        let sources_file = work.join("sources.toml");
        std::fs::write(
            &sources_file,
            sources::sources_toml(server, &[(CSV, &big), (CSV_SMALL, &tenth)], Some(REST)),
        )?;
        let e2e_sources_file = work.join("sources-e2e.toml");
        std::fs::write(
            &e2e_sources_file,
            sources::sources_toml(server, &[(CSV, &big)], None),
        )?;

        let mut report = Report::default();
        let pipeline_db = self.fresh_database("etl_bench_stages").await?;
        let launcher = Launcher {
            bin_dir: self.target.join("release"),
            logs: work.join("logs"),
            database_url: pipeline_db.clone(),
            sources_file,
        };
        let stages = stages(&launcher, &big, sizes, &mut report).await;
        self.drop_database("etl_bench_stages").await?;
        let stages = stages?;

        let e2e_db = self.fresh_database("etl_bench_e2e").await?;
        let launcher = Launcher {
            database_url: e2e_db,
            sources_file: e2e_sources_file,
            ..launcher
        };
        let whole = whole_system(
            &launcher,
            &data_server,
            sizes,
            stages.copy_rate,
            &mut report,
        )
        .await;
        self.drop_database("etl_bench_e2e").await?;
        whole?;
        report.add(
            format!(
                "ingester peak memory, {} vs {} CSV rows",
                thousands(sizes.csv_rows as f64),
                thousands((sizes.csv_rows / 10) as f64)
            ),
            mib(stages.ingest_kib),
            mib(stages.tenth_kib),
            format!(
                "{:.2}×",
                stages.ingest_kib as f64 / stages.tenth_kib.max(1) as f64
            ),
            "flat: ≤ 1.5× for 10× the rows",
            Some((stages.ingest_kib as f64) <= 1.5 * stages.tenth_kib as f64),
        );

        let header = self.header(sizes).await?;
        let table = report.markdown(&header);
        println!("\n{table}");
        report::write_between_markers(&self.output, &table)?;
        println!("written to {}", self.output.display());
        Ok(())
    }

    async fn build_release(&self) -> Result<()> {
        eprintln!("bench: building the services (release)");
        crate::build_services(&self.workspace, true).await
    }

    async fn fresh_database(&self, name: &str) -> Result<String> {
        self.drop_database(name).await?;
        connect(&self.admin_url)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = url_with_database(&self.admin_url, name);
        etl_shared::migrate(&etl_shared::DatabaseSettings::from_url(&url)?)
            .await
            .context("migrating the benchmark database")?;
        Ok(url)
    }

    async fn drop_database(&self, name: &str) -> Result<()> {
        connect(&self.admin_url)
            .await?
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        Ok(())
    }

    async fn header(&self, sizes: Sizes) -> Result<String> {
        let version: String = connect(&self.admin_url)
            .await?
            .query_one("SHOW server_version", &[])
            .await?
            .get(0);
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_kib: u64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0);
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).await;
        let commit = command_output("git", &["rev-parse", "--short", "HEAD"]).await;
        Ok(format!(
            "Measured {date} at commit `{commit}` by `cargo xtask bench{}`: {cores} cores ({cpu}), \
             {:.0} GiB memory, PostgreSQL {version} on the same machine (the throwaway cluster: \
             fsync and synchronous_commit off, for the ceiling and for us alike). {} CSV rows, \
             {} REST items in pages of {}; query load {} s per endpoint (wrk, 32 connections; \
             pgbench, 8 clients, the same SQL).\n",
            if sizes.csv_rows == Sizes::FULL.csv_rows { "" } else { " --quick" },
            memory_kib as f64 / 1024.0 / 1024.0,
            thousands(sizes.csv_rows as f64),
            thousands(sizes.rest_items as f64),
            sources::REST_PAGE_SIZE,
            sizes.load_seconds,
        ))
    }
}

async fn command_output(program: &str, args: &[&str]) -> String {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to the benchmark database")?;
    tokio::spawn(connection);
    Ok(client)
}

/// What the later steps need from the first database's.
struct StageFigures {
    copy_rate: f64,
    /// The ingester's peak memory for the CSV and for the CSV a tenth of its size.
    ingest_kib: u64,
    tenth_kib: u64,
}

/// The ceiling, then each stage alone.
async fn stages(
    launcher: &Launcher,
    csv: &Path,
    sizes: Sizes,
    report: &mut Report,
) -> Result<StageFigures> {
    let db = connect(&launcher.database_url).await?;
    let n = sizes.csv_rows;

    eprintln!("bench: Postgres ceiling");
    db.batch_execute(
        "CREATE TABLE typed_rows (id bigint, name text, value float8, description text);
         CREATE TABLE ceiling_normalized (LIKE normalized_data INCLUDING ALL);
         CREATE TABLE ceiling_from_raw (LIKE normalized_data INCLUDING ALL);
         CREATE TABLE ceiling_raw (LIKE raw_csv_data INCLUDING ALL);",
    )
    .await?;
    let started = Instant::now();
    copy_file(&db, csv).await?;
    let copy_s = started.elapsed().as_secs_f64();
    let copy_rate = rate(n, copy_s);
    let started = Instant::now();
    let upserted = ceiling_upsert(&db, "ceiling_normalized").await?;
    let upsert_rate = rate(upserted, started.elapsed().as_secs_f64());
    ensure!(
        upserted == n,
        "the ceiling upsert wrote {upserted} of {n} rows"
    );
    // The bulk ceiling: the same upsert into the normalized shape without its search indexes,
    // then both built in bulk (what a bulk normalize path could reach at best).
    db.batch_execute(
        "CREATE TABLE ceiling_bulk (LIKE normalized_data INCLUDING ALL EXCLUDING INDEXES);
         ALTER TABLE ceiling_bulk ADD PRIMARY KEY (id), ADD UNIQUE (source, source_id);",
    )
    .await?;
    let started = Instant::now();
    ceiling_upsert(&db, "ceiling_bulk").await?;
    db.batch_execute(
        "CREATE INDEX ON ceiling_bulk USING gin (name gin_trgm_ops);
         CREATE INDEX ON ceiling_bulk USING gin (description gin_trgm_ops);",
    )
    .await?;
    let bulk_rate = rate(n, started.elapsed().as_secs_f64());
    // What our raw table's shape costs Postgres itself: the same rows as jsonb, upserted in one
    // statement (on top of the COPY) with the ingester's conflict rule.
    let started = Instant::now();
    db.execute(
        "INSERT INTO ceiling_raw (source, source_id, data)
         SELECT 'csv', id::text, jsonb_build_object('id', id::text, 'name', name,
                'value', value::text, 'description', description)
         FROM typed_rows
         ON CONFLICT (source, source_id) DO UPDATE SET data = EXCLUDED.data
             WHERE ceiling_raw.data IS DISTINCT FROM EXCLUDED.data",
        &[],
    )
    .await?;
    let raw_shape_rate = rate(n, copy_s + started.elapsed().as_secs_f64());

    eprintln!("bench: ingest");
    let first = launcher
        .run("etl-ingester", "ingest-csv", &["ingest", "--source", CSV])
        .await?;
    let rest = launcher
        .run("etl-ingester", "ingest-rest", &["ingest", "--source", REST])
        .await?;
    let again = launcher
        .run("etl-ingester", "reingest-csv", &["ingest", "--source", CSV])
        .await?;
    let tenth = launcher
        .run(
            "etl-ingester",
            "ingest-csv-tenth",
            &["ingest", "--source", CSV_SMALL],
        )
        .await?;
    let raw: i64 = db
        .query_one(
            "SELECT coalesce(sum(raw_rows), 0)::bigint FROM etl_pending WHERE source IN ($1, $2)",
            &[&CSV, &REST],
        )
        .await?
        .get(0);
    ensure!(
        raw as u64 == n + sizes.rest_items,
        "{raw} raw rows landed, expected {}",
        n + sizes.rest_items
    );
    let started = Instant::now();
    db.execute(
        "INSERT INTO ceiling_from_raw (source, source_id, name, value, description)
         SELECT source, source_id, data->>'name', (data->>'value')::float8, data->>'description'
         FROM raw_csv_data WHERE source = $1
         ON CONFLICT (source, source_id) DO UPDATE SET name = EXCLUDED.name,
             value = EXCLUDED.value, description = EXCLUDED.description, updated_at = now()",
        &[&CSV],
    )
    .await?;
    let from_raw_rate = rate(n, started.elapsed().as_secs_f64());

    eprintln!("bench: normalize the backlog");
    let backlog = n + sizes.rest_items + n / 10;
    let started = Instant::now();
    let mut normalizer = launcher.start("etl-normalizer", &[])?;
    let patience = Patience::new(
        Duration::from_secs(1800),
        "the normalizer to drain the backlog",
    );
    loop {
        normalizer.check_alive()?;
        let left = sources_pending(&db).await?;
        if left == 0 {
            break;
        }
        patience.wait().await?;
    }
    let normalize_s = started.elapsed().as_secs_f64();
    let normalizer_kib = normalizer.stop().await?;
    let normalized: i64 = db
        .query_one("SELECT count(*) FROM normalized_data", &[])
        .await?
        .get(0);
    ensure!(
        normalized as u64 == backlog,
        "{normalized} rows normalized, expected {backlog}"
    );

    let first_rate = rate(n, first.seconds);
    report.add(
        "Postgres COPY of the CSV into a typed table",
        format!("{} rows/s", thousands(copy_rate)),
        "",
        "",
        "the ceiling",
        None,
    );
    report.add(
        "Postgres INSERT … SELECT … ON CONFLICT into a normalized_data-shaped table",
        format!("{} rows/s", thousands(upsert_rate)),
        "",
        "",
        "the ceiling",
        None,
    );
    report.add(
        "Postgres: the same upsert without the search indexes, then both built in bulk",
        format!("{} rows/s", thousands(bulk_rate)),
        "",
        "",
        "the bulk ceiling",
        None,
    );
    report.add(
        "context: Postgres COPY + one INSERT … ON CONFLICT into a raw_csv_data-shaped table",
        format!("{} rows/s", thousands(raw_shape_rate)),
        format!("{} rows/s COPY", thousands(copy_rate)),
        ratio(raw_shape_rate, copy_rate),
        "",
        None,
    );
    report.add(
        "ingest: CSV over HTTP, first run (raw rows landed)",
        format!("{} rows/s", thousands(first_rate)),
        format!("{} rows/s COPY", thousands(copy_rate)),
        ratio(first_rate, copy_rate),
        "≥ 0.5× COPY",
        Some(first_rate >= 0.5 * copy_rate),
    );
    let rest_rate = rate(sizes.rest_items, rest.seconds);
    report.add(
        format!(
            "ingest: REST, {} items in pages of {}",
            thousands(sizes.rest_items as f64),
            sources::REST_PAGE_SIZE
        ),
        format!("{} rows/s", thousands(rest_rate)),
        format!("{} rows/s COPY", thousands(copy_rate)),
        ratio(rest_rate, copy_rate),
        "≥ 0.5× COPY",
        Some(rest_rate >= 0.5 * copy_rate),
    );
    let again_rate = rate(n, again.seconds);
    report.add(
        "re-ingest of the unchanged CSV",
        format!("{} rows/s", thousands(again_rate)),
        format!("{} rows/s first ingest", thousands(first_rate)),
        ratio(again_rate, first_rate),
        "≥ 5× the first ingest",
        Some(again_rate >= 5.0 * first_rate),
    );
    let normalize_rate = rate(backlog, normalize_s);
    report.add(
        format!(
            "normalize: backlog of {} raw rows to checkpoint",
            thousands(backlog as f64)
        ),
        format!("{} rows/s", thousands(normalize_rate)),
        format!("{} rows/s INSERT … ON CONFLICT", thousands(upsert_rate)),
        ratio(normalize_rate, upsert_rate),
        "≥ 0.5× INSERT … ON CONFLICT",
        Some(normalize_rate >= 0.5 * upsert_rate),
    );
    report.add(
        format!(
            "normalize: the same backlog against the bulk ceiling ({} rows/s)",
            thousands(bulk_rate)
        ),
        format!("{} rows/s", thousands(normalize_rate)),
        format!("{} rows/s upsert, then indexes", thousands(bulk_rate)),
        ratio(normalize_rate, bulk_rate),
        "≥ 0.8× the bulk ceiling",
        Some(normalize_rate >= 0.8 * bulk_rate),
    );
    report.add(
        "context: the same upsert reading the raw jsonb rows",
        format!("{} rows/s", thousands(from_raw_rate)),
        format!("{} rows/s INSERT … ON CONFLICT", thousands(upsert_rate)),
        ratio(from_raw_rate, upsert_rate),
        "",
        None,
    );
    report.add(
        "normalizer peak memory (backlog)",
        mib(normalizer_kib),
        "",
        "",
        "",
        None,
    );
    Ok(StageFigures {
        copy_rate,
        ingest_kib: first.peak_kib,
        tenth_kib: tenth.peak_kib,
    })
}

/// The normalizer's upsert done by Postgres alone: the typed rows into `table`, of the
/// normalized shape, in one statement. Returns the rows written.
async fn ceiling_upsert(db: &Client, table: &str) -> Result<u64> {
    Ok(db
        .execute(
            &format!(
                "INSERT INTO {table} (source, source_id, name, value, description)
                 SELECT 'csv', id::text, name, value, description FROM typed_rows
                 ON CONFLICT (source, source_id) DO UPDATE SET name = EXCLUDED.name,
                     value = EXCLUDED.value, description = EXCLUDED.description, updated_at = now()"
            ),
            &[],
        )
        .await?)
}

/// How many sources have raw changes the normalizer has not applied yet.
async fn sources_pending(db: &Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM etl_pending WHERE pending_changes > 0",
            &[],
        )
        .await?
        .get(0))
}

async fn copy_file(db: &Client, path: &Path) -> Result<()> {
    use futures_util::SinkExt;
    use tokio::io::AsyncReadExt;
    let sink = db
        .copy_in("COPY typed_rows FROM STDIN (FORMAT csv, HEADER true)")
        .await?;
    futures_util::pin_mut!(sink);
    let mut file = tokio::fs::File::open(path).await?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        sink.send(bytes::Bytes::copy_from_slice(&buffer[..read]))
            .await?;
    }
    sink.finish().await?;
    Ok(())
}

/// The three services together from an empty database, then freshness and the query API.
async fn whole_system(
    launcher: &Launcher,
    data_server: &sources::DataServer,
    sizes: Sizes,
    copy_rate: f64,
    report: &mut Report,
) -> Result<()> {
    let mut db = connect(&launcher.database_url).await?;
    let n = sizes.csv_rows;
    let query_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let api = format!("http://{query_addr}");
    let http = reqwest::Client::new();

    eprintln!("bench: end to end");
    let mut normalizer = launcher.start("etl-normalizer", &[])?;
    let mut query = launcher.start("etl-query", &[("QUERY_ADDR", query_addr.to_string())])?;
    let patience = Patience::new(Duration::from_secs(60), "the query service to answer");
    while get_json(&http, &format!("{api}/health/live"))
        .await
        .is_err()
    {
        query.check_alive()?;
        patience.wait().await?;
    }
    let started = Instant::now();
    let mut ingester = launcher.start("etl-ingester", &[])?;
    let visible_url = format!("{api}/data?source={CSV}&page_size=1");
    let patience = Patience::new(
        Duration::from_secs(1800),
        "every row visible through GET /data",
    );
    loop {
        ingester.check_alive()?;
        normalizer.check_alive()?;
        let page = get_json(&http, &visible_url).await?;
        if page["total"].as_u64() == Some(n) {
            break;
        }
        patience.wait().await?;
    }
    let e2e_s = started.elapsed().as_secs_f64();
    let e2e_rate = rate(n, e2e_s);
    report.add(
        "end to end: empty database to every CSV row visible through GET /data",
        format!("{} rows/s ({e2e_s:.1} s)", thousands(e2e_rate)),
        format!("{} rows/s COPY", thousands(copy_rate)),
        ratio(e2e_rate, copy_rate),
        "within 3× of COPY (≥ 0.33×)",
        Some(e2e_rate >= copy_rate / 3.0),
    );

    eprintln!("bench: freshness");
    let (p50, p99) = freshness(&mut db, &http, &api, n, sizes.probes).await?;
    report.add(
        format!(
            "freshness: raw commit to visible through GET /data, {} probes under light load",
            sizes.probes
        ),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        "",
        "",
        "p50 < 50 ms",
        Some(p50 < 50.0),
    );

    eprintln!("bench: query API under load");
    query_load(&db, launcher, &api, sizes, report).await?;

    eprintln!("bench: exports");
    exports(&db, &mut query, &api, report).await?;

    eprintln!("bench: the query mix at rest, while every row is refreshed, and right after");
    mix_under_writes(&db, launcher, data_server, &api, sizes, report).await?;

    let query_kib = query.stop().await?;
    let ingester_kib = ingester.stop().await?;
    let normalizer_kib = normalizer.stop().await?;
    for (service, kib) in [
        ("ingester", ingester_kib),
        ("normalizer", normalizer_kib),
        ("query", query_kib),
    ] {
        report.add(
            format!("{service} peak memory (whole run, incl. query load)"),
            mib(kib),
            "",
            "",
            "",
            None,
        );
    }
    Ok(())
}

/// Commits raw rows one at a time (through the raw-write protocol, as the ingester does) while a light
/// steady read load runs, and times each until GET /data counts it. Returns (p50, p99) in ms.
async fn freshness(
    db: &mut Client,
    http: &reqwest::Client,
    api: &str,
    rows_before: u64,
    probes: u32,
) -> Result<(f64, f64)> {
    let background = {
        let http = http.clone();
        let url = format!("{api}/data?page=1&page_size=10");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let _ = get_json(&http, &url).await;
            }
        })
    };
    let url = format!("{api}/data?source={CSV}&page_size=1");
    let mut delays = Vec::new();
    for i in 1..=u64::from(probes) {
        let id = format!("probe-{i}");
        // Through the raw-write protocol, as the ingester writes.
        let data = serde_json::json!({"id": id, "name": "probe", "value": "1", "description": ""});
        let tx = db.transaction().await?;
        raw::write(
            &tx,
            RawTable::Csv,
            CSV,
            &[(id.clone(), RawJson(data.to_string()))],
            None,
            raw::Probe::Skip,
        )
        .await?;
        raw::notify(&tx, CSV).await?;
        tx.commit().await?;
        let committed = Instant::now();
        loop {
            let page = get_json(http, &url).await?;
            if page["total"].as_u64() == Some(rows_before + i) {
                break;
            }
            ensure!(
                committed.elapsed() < Duration::from_secs(30),
                "probe {i} was not visible within 30 s"
            );
        }
        delays.push(committed.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    background.abort();
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// wrk against each endpoint and pgbench running the SQL the service runs for it
/// (services/query/src/data.rs and stats.rs).
async fn query_load(
    db: &Client,
    launcher: &Launcher,
    api: &str,
    sizes: Sizes,
    report: &mut Report,
) -> Result<()> {
    db.batch_execute("VACUUM ANALYZE normalized_data").await?;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM normalized_data", &[])
        .await?
        .get(0);
    let deep_page = (rows / 2 / 10).max(1);
    let deep_offset = (deep_page - 1) * 10;
    let select = "SELECT id, source, source_id, name, value, description, created_at, updated_at FROM normalized_data";
    // The cursor of the deep page: the next_cursor of the page before it.
    let before_deep = get_json(
        &reqwest::Client::new(),
        &format!("{api}/data?page={}&page_size=10", (deep_page - 1).max(1)),
    )
    .await?;
    let deep_cursor = before_deep["next_cursor"]
        .as_str()
        .context("the page before the deep one has a next_cursor")?
        .to_owned();
    let after_id = before_deep["data"][9]["id"]
        .as_i64()
        .context("the page before the deep one is full")?;
    let count_all = "SELECT coalesce(sum(normalized_rows), 0)::bigint FROM etl_checkpoint;";
    let term = sources::SPECIAL_TERM;
    // One record by its key (the deep page's first), and the instant after which the ten
    // last changed records changed.
    let (record_source, record_id) = (
        before_deep["data"][0]["source"]
            .as_str()
            .context("a record's source")?,
        before_deep["data"][0]["source_id"]
            .as_str()
            .context("a record's source_id")?,
    );
    let newest = get_json(
        &reqwest::Client::new(),
        &format!("{api}/data?sort=-updated_at&page_size=10"),
    )
    .await?;
    let since = newest["data"][9]["updated_at"]
        .as_str()
        .context("ten records")?
        .to_owned();
    let capped = |filter: &str| {
        format!("SELECT count(*) FROM (SELECT 1 FROM normalized_data WHERE {filter} LIMIT 1001) capped;\n")
    };
    let quoted = |text: &str| format!("'{}'", text.replace('\'', "''"));
    let range = "value >= 500 AND value <= 501";
    let cases = [
        (
            "/data?page=1&page_size=10".to_owned(),
            format!("{select} ORDER BY id LIMIT 11 OFFSET 0;\n{count_all}\n"),
            Some(0.5),
        ),
        (
            format!("/data?page={deep_page}&page_size=10"),
            format!("{select} ORDER BY id LIMIT 11 OFFSET {deep_offset};\n{count_all}\n"),
            None,
        ),
        (
            format!("/data?page_size=10&cursor={deep_cursor}"),
            format!("{select} WHERE id > {after_id} ORDER BY id LIMIT 11 OFFSET 0;\n{count_all}\n"),
            None,
        ),
        (
            format!("/data?search={term}"),
            format!(
                "{select} WHERE (name ILIKE '%{term}%' OR description ILIKE '%{term}%') ORDER BY id LIMIT 11 OFFSET 0;\n\
                 SELECT count(*) FROM (SELECT 1 FROM normalized_data WHERE name ILIKE '%{term}%' OR description ILIKE '%{term}%' LIMIT 1001) capped;\n"
            ),
            None,
        ),
        (
            format!("/data/{}/{}", path_segment(record_source), path_segment(record_id)),
            format!(
                "{select} WHERE source = {} AND source_id = {};\n",
                quoted(record_source),
                quoted(record_id)
            ),
            None,
        ),
        (
            "/data?sort=-updated_at&page_size=10".to_owned(),
            format!("{select} ORDER BY updated_at DESC, id DESC LIMIT 11 OFFSET 0;\n{count_all}\n"),
            None,
        ),
        (
            "/data?sort=-value&page_size=10".to_owned(),
            format!("{select} ORDER BY value DESC, id DESC LIMIT 11 OFFSET 0;\n{count_all}\n"),
            None,
        ),
        (
            "/data?min_value=500&max_value=501&page_size=10".to_owned(),
            format!("{select} WHERE {range} ORDER BY id LIMIT 11 OFFSET 0;\n{}", capped(range)),
            None,
        ),
        (
            format!("/data?updated_since={}&page_size=10", since.replace('+', "%2B")),
            format!(
                "{select} WHERE updated_at >= {} ORDER BY id LIMIT 11 OFFSET 0;\n{}",
                quoted(&since),
                capped(&format!("updated_at >= {}", quoted(&since)))
            ),
            None,
        ),
        (
            "/stats".to_owned(),
            "SELECT source, count(*), min(value), max(value), avg(value) FROM normalized_data GROUP BY source;\n".to_owned(),
            None,
        ),
    ];
    let pgbench = pgbench_binary();
    let scripts = launcher.logs.parent().unwrap_or(&launcher.logs).join("sql");
    std::fs::create_dir_all(&scripts)?;
    for (i, (path, sql, target)) in cases.into_iter().enumerate() {
        let script = scripts.join(format!("case{i}.sql"));
        std::fs::write(&script, sql)?;
        let http = load::wrk(&format!("{api}{path}"), 32, sizes.load_seconds).await?;
        ensure!(
            http.errors == 0,
            "{path}: {} errors under load (non-2xx or socket errors)",
            http.errors
        );
        let tps = load::pgbench(
            &pgbench,
            &launcher.database_url,
            &script,
            8,
            sizes.load_seconds,
        )
        .await?;
        let note = if path == "/stats" {
            " (cached; pgbench: uncached aggregate)"
        } else {
            ""
        };
        report.add(
            format!("query: GET {path}{note}"),
            format!(
                "{} req/s, p50 {:.1} ms, p99 {:.1} ms",
                thousands(http.requests_per_s),
                http.p50_ms,
                http.p99_ms
            ),
            format!("{} tps pgbench", thousands(tps)),
            ratio(http.requests_per_s, tps),
            target.map_or(String::new(), |t| format!("≥ {t}× pgbench")),
            target.map(|t| http.requests_per_s >= t * tps),
        );
    }
    Ok(())
}

/// `GET /data/export` of every record, as NDJSON and as CSV, against Postgres's own
/// `COPY (SELECT …) TO STDOUT` of the same rows; and what the exports did to the query
/// service's peak memory.
async fn exports(
    db: &Client,
    query: &mut procs::Service,
    api: &str,
    report: &mut Report,
) -> Result<()> {
    let started = Instant::now();
    let copy = db
        .copy_out(
            "COPY (SELECT id, source, source_id, name, value, description, created_at, updated_at
                   FROM normalized_data ORDER BY id) TO STDOUT (FORMAT csv)",
        )
        .await?;
    futures_util::pin_mut!(copy);
    let mut copied = 0u64;
    while let Some(chunk) = futures_util::StreamExt::next(&mut copy).await {
        copied += chunk?.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let copy_rate = rate(copied, started.elapsed().as_secs_f64());
    let before_kib = query.peak_kib();
    let http = reqwest::Client::new();
    for format in ["ndjson", "csv"] {
        let started = Instant::now();
        let mut response = http
            .get(format!("{api}/data/export?format={format}"))
            .send()
            .await?
            .error_for_status()?;
        let (mut bytes, mut lines) = (0u64, 0u64);
        while let Some(chunk) = response.chunk().await? {
            bytes += chunk.len() as u64;
            lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        let seconds = started.elapsed().as_secs_f64();
        let records = if format == "csv" { lines - 1 } else { lines };
        ensure!(
            records == copied,
            "the {format} export has {records} records, COPY {copied}"
        );
        let export_rate = rate(records, seconds);
        report.add(
            format!("export: GET /data/export?format={format}, every record"),
            format!(
                "{} rows/s ({:.0} MB/s, {seconds:.1} s)",
                thousands(export_rate),
                bytes as f64 / 1e6 / seconds
            ),
            format!("{} rows/s COPY TO STDOUT", thousands(copy_rate)),
            ratio(export_rate, copy_rate),
            "≥ 200,000 rows/s",
            Some(export_rate >= 200_000.0),
        );
    }
    let after_kib = query.peak_kib();
    let growth_kib = after_kib.saturating_sub(before_kib);
    report.add(
        "query peak memory, before and after the exports",
        format!(
            "{} → {} (+{growth_kib} KiB)",
            mib(before_kib),
            mib(after_kib)
        ),
        "",
        "",
        "+ ≤ 8 MiB",
        Some(growth_kib <= 8 * 1024),
    );
    Ok(())
}

/// `text` as one path segment: every byte but the unreserved ones percent-encoded.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The query mix of a dashboard and its users: the first page, a 1% search, a page of 100 of
/// one source, and `/stats`, in equal shares over 64 connections.
fn query_mix() -> Vec<String> {
    vec![
        "/data?page=1&page_size=10".into(),
        format!("/data?search={}", sources::SPECIAL_TERM),
        format!("/data?source={CSV}&page=2&page_size=100"),
        "/stats".into(),
    ]
}

const MIX_CONNECTIONS: u32 = 64;

/// The query mix at rest; then while the source server refreshes every CSV row and the
/// ingester and normalizer write them all, in back-to-back windows; then right after.
async fn mix_under_writes(
    db: &Client,
    launcher: &Launcher,
    data_server: &sources::DataServer,
    api: &str,
    sizes: Sizes,
    report: &mut Report,
) -> Result<()> {
    let script = launcher
        .logs
        .parent()
        .unwrap_or(&launcher.logs)
        .join("mix.lua");
    let mix = query_mix();
    let at_rest = load::wrk_mix(api, &mix, &script, MIX_CONNECTIONS, sizes.load_seconds).await?;
    ensure!(
        at_rest.errors == 0,
        "the mix at rest: {} errors",
        at_rest.errors
    );

    data_server.refresh();
    let started = Instant::now();
    let refresh = {
        let launcher = launcher.clone();
        tokio::spawn(async move {
            launcher
                .run("etl-ingester", "refresh-csv", &["ingest", "--source", CSV])
                .await
        })
    };
    let window = sizes.load_seconds.min(5);
    let mut windows = Vec::new();
    let written_s = loop {
        let load = load::wrk_mix(api, &mix, &script, MIX_CONNECTIONS, window).await?;
        ensure!(
            load.errors == 0,
            "the mix under writes: {} errors",
            load.errors
        );
        let pending = sources_pending(db).await?;
        let done = refresh.is_finished() && pending == 0;
        // A window in which the load ended still saw writes for part of it.
        windows.push(load);
        if done {
            break started.elapsed().as_secs_f64();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the refresh did not finish within 30 minutes"
        );
    };
    refresh.await??;
    let refreshed: i64 = db
        .query_one(
            "SELECT count(*) FROM normalized_data WHERE source = $1 AND name LIKE '% refreshed'",
            &[&CSV],
        )
        .await?
        .get(0);
    ensure!(
        refreshed as u64 == sizes.csv_rows,
        "{refreshed} of {} rows refreshed",
        sizes.csv_rows
    );
    let after = load::wrk_mix(api, &mix, &script, MIX_CONNECTIONS, sizes.load_seconds).await?;
    ensure!(
        after.errors == 0,
        "the mix after the writes: {} errors",
        after.errors
    );

    let during_rate = windows.iter().map(|w| w.requests_per_s).sum::<f64>() / windows.len() as f64;
    let mut p50s: Vec<f64> = windows.iter().map(|w| w.p50_ms).collect();
    p50s.sort_by(f64::total_cmp);
    let during_p50 = p50s[p50s.len() / 2];
    let during_p99 = windows.iter().map(|w| w.p99_ms).fold(0.0, f64::max);
    let figures = |load: &load::HttpLoad| {
        format!(
            "{} req/s, p50 {:.1} ms, p99 {:.1} ms, 0 errors",
            thousands(load.requests_per_s),
            load.p50_ms,
            load.p99_ms
        )
    };
    report.add(
        format!("query mix at rest ({MIX_CONNECTIONS} connections: page 1, 1% search, a source's page of 100, /stats)"),
        figures(&at_rest),
        "",
        "",
        "",
        None,
    );
    report.add(
        format!(
            "query mix while {} rows are refreshed (ingest + normalize, {:.0} s; mean of {} windows of {window} s, p99 the worst)",
            thousands(sizes.csv_rows as f64),
            written_s,
            windows.len()
        ),
        format!(
            "{} req/s, p50 {during_p50:.1} ms, p99 {during_p99:.1} ms, 0 errors",
            thousands(during_rate)
        ),
        format!("{} req/s at rest", thousands(at_rest.requests_per_s)),
        ratio(during_rate, at_rest.requests_per_s),
        "p99 ≤ 200 ms and ≥ 0.4× at rest",
        Some(during_p99 <= 200.0 && during_rate >= 0.4 * at_rest.requests_per_s),
    );
    report.add(
        "query mix right after the refresh",
        figures(&after),
        format!("p99 {:.1} ms at rest", at_rest.p99_ms),
        ratio(after.p99_ms, at_rest.p99_ms),
        "p99 within 1.5× of at rest",
        Some(after.p99_ms <= 1.5 * at_rest.p99_ms),
    );
    Ok(())
}

/// pgbench beside the server binaries (Debian keeps it under /usr/lib/postgresql/<v>/bin, which
/// is not on PATH), else whatever PATH has.
fn pgbench_binary() -> PathBuf {
    let beside = |dir: &Path| Some(dir.join("pgbench")).filter(|p| p.is_file());
    crate::pg::PgBinaries::find()
        .ok()
        .and_then(|b| beside(&b.bin_dir))
        .or_else(|| {
            let versioned =
                crate::pg::PgBinaries::find_in(&[], Path::new(crate::pg::VERSIONED_BIN_ROOT));
            versioned.ok().and_then(|b| beside(&b.bin_dir))
        })
        .unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// A deadline for a polling loop: `wait` pauses 50 ms, or fails once `limit` has passed.
struct Patience {
    started: Instant,
    limit: Duration,
    what: &'static str,
}

impl Patience {
    fn new(limit: Duration, what: &'static str) -> Self {
        Self {
            started: Instant::now(),
            limit,
            what,
        }
    }

    async fn wait(&self) -> Result<()> {
        if self.started.elapsed() > self.limit {
            bail!("gave up waiting for {} after {:?}", self.what, self.limit);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<serde_json::Value> {
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}
