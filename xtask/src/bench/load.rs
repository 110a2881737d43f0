//! Load generators over loopback: wrk for the HTTP API, pgbench for the same SQL straight on
//! Postgres. Both are C programs, so neither side of a comparison pays for a slower client.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

/// What wrk measured.
pub struct HttpLoad {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx answers plus socket errors.
    pub errors: u64,
}

pub async fn wrk(url: &str, connections: u32, seconds: u32) -> Result<HttpLoad> {
    run_wrk(&[url.to_owned()], connections, seconds).await
}

/// A mix: each connection's requests cycle through `paths` (relative to `base`), so every path
/// gets an equal share of the requests.
pub async fn wrk_mix(
    base: &str,
    paths: &[String],
    script: &Path,
    connections: u32,
    seconds: u32,
) -> Result<HttpLoad> {
    let quoted: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    std::fs::write(
        script,
        format!(
            "local paths = {{{}}}\nlocal n = 0\n\
             request = function()\n  n = n + 1\n  return wrk.format(nil, paths[(n % #paths) + 1])\nend\n",
            quoted.join(", ")
        ),
    )?;
    let script = script.to_str().context("a UTF-8 script path")?;
    run_wrk(
        &["-s".into(), script.into(), base.into()],
        connections,
        seconds,
    )
    .await
}

async fn run_wrk(args: &[String], connections: u32, seconds: u32) -> Result<HttpLoad> {
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--timeout",
            "10s",
            "--latency",
        ])
        .args(args)
        .output()
        .await
        .context("wrk is needed for the query benchmark (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<HttpLoad> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let percentile = |p: &str| field(p).and_then(duration_ms);
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket_errors: u64 = field("Socket errors:")
        .map(|s| {
            s.split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Some(HttpLoad {
        requests_per_s: field("Requests/sec:")?.parse().ok()?,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
        errors: non_2xx + socket_errors,
    })
}

/// wrk prints durations as `850.00us`, `5.90ms`, `1.17s` or `2.00m`.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        _ => return None,
    };
    Some(number * factor)
}

/// Transactions per second of pgbench running `script` with `clients` for `seconds`.
pub async fn pgbench(
    pgbench: &Path,
    database_url: &str,
    script: &Path,
    clients: u32,
    seconds: u32,
) -> Result<f64> {
    let output = Command::new(pgbench)
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(script)
        .arg(database_url)
        .output()
        .await
        .with_context(|| format!("cannot run {}", pgbench.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("unexpected pgbench output:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read_with_its_units_and_errors() {
        let text = "Running 10s test @ http://127.0.0.1:1/data\n  1 threads and 32 connections\n\
            \x20 Latency Distribution\n     50%  850.00us\n     75%    5.90ms\n     90%   10.00ms\n     99%    1.17s\n\
            \x20 51930 requests in 10.00s, 20.00MB read\n\
            \x20 Socket errors: connect 0, read 2, write 0, timeout 3\n\
            \x20 Non-2xx or 3xx responses: 4\nRequests/sec:   5193.12\nTransfer/sec:      2.00MB\n";
        let load = parse_wrk(text).unwrap();
        assert_eq!(load.requests_per_s, 5193.12);
        assert!((load.p50_ms - 0.85).abs() < 1e-9);
        assert_eq!(load.p99_ms, 1170.0);
        assert_eq!(load.errors, 9);
    }
}
