//! A real headless browser for the console's tests: Debian's chromium, driven by playwright-core
//! through `tests/browser/bridge.mjs` (installed by `cargo xtask test`, which names it in
//! `ETL_BROWSER_BRIDGE`). One JSON command a line, one answer a line: the tests stay in Rust,
//! beside the services and the data they assert on.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long one command may take (a page load, a click, an evaluation).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Browser {
    child: Child,
    input: ChildStdin,
    output: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    pub fn start() -> Self {
        let bridge = std::env::var("ETL_BROWSER_BRIDGE").expect(
            "ETL_BROWSER_BRIDGE is not set: run the suite with `cargo xtask test`, which installs \
             the browser tools",
        );
        let chromium = chromium();
        let mut child = Command::new("node")
            .arg(bridge)
            .env("ETL_CHROMIUM", chromium)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start node with the browser bridge (Debian: apt-get install nodejs)");
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            input,
            output,
        }
    }

    /// Sends one command; its value, or the test fails with the browser's error.
    pub async fn call(&mut self, command: Value) -> Value {
        let line = format!("{command}\n");
        self.input
            .write_all(line.as_bytes())
            .await
            .expect("the browser bridge takes commands");
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, self.output.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser did not answer {command} in time"))
            .expect("read the browser's answer")
            .unwrap_or_else(|| {
                let status = self.child.try_wait();
                panic!("the browser bridge ended ({status:?}) on {command}")
            });
        let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
        if let Some(error) = answer.get("error") {
            panic!("the browser failed {command}: {error}");
        }
        answer["ok"].clone()
    }

    /// A new page (cookies and storage of its own) of `width` × `height` CSS pixels at `url`.
    pub async fn open(&mut self, url: &str, width: u32, height: u32) {
        self.call(json!({"op": "open", "url": url, "width": width, "height": height}))
            .await;
    }

    /// Navigates the open page to `url`.
    pub async fn goto(&mut self, url: &str) {
        self.call(json!({"op": "goto", "url": url})).await;
    }

    /// An expression evaluated in the page; its value.
    pub async fn eval(&mut self, js: &str) -> Value {
        self.call(json!({"op": "eval", "js": js})).await
    }

    /// Waits (up to `timeout`) for `selector` to be on the page.
    pub async fn wait(&mut self, selector: &str, timeout: Duration) {
        self.call(json!({"op": "wait", "selector": selector, "timeout_ms": timeout.as_millis()}))
            .await;
    }

    /// Resizes the page to `width` × `height` CSS pixels (a phone is 390 × 844).
    pub async fn resize(&mut self, width: u32, height: u32) {
        self.call(json!({"op": "viewport", "width": width, "height": height}))
            .await;
    }

    /// Waits (up to `timeout`) until `js`, evaluated in the page, is truthy; its value.
    pub async fn until(&mut self, js: &str, timeout: Duration) -> Value {
        self.call(json!({"op": "until", "js": js, "timeout_ms": timeout.as_millis()}))
            .await
    }

    pub async fn click(&mut self, selector: &str) {
        self.call(json!({"op": "click", "selector": selector}))
            .await;
    }

    pub async fn fill(&mut self, selector: &str, value: &str) {
        self.call(json!({"op": "fill", "selector": selector, "value": value}))
            .await;
    }

    /// A key pressed on whatever has the focus (`Tab`, `Enter`, `Escape`…).
    pub async fn press(&mut self, key: &str) {
        self.call(json!({"op": "press", "key": key})).await;
    }

    /// The visible text of the first element matching `selector`, `None` when there is none.
    pub async fn text(&mut self, selector: &str) -> Option<String> {
        let js = format!(
            "document.querySelector({})?.innerText ?? null",
            json!(selector)
        );
        self.eval(&js).await.as_str().map(str::to_owned)
    }

    pub async fn screenshot(&mut self, path: &std::path::Path) {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).unwrap();
        }
        self.call(json!({"op": "screenshot", "path": path})).await;
    }

    /// axe-core's WCAG 2.1 A/AA violations on the page as it is now, one line each.
    pub async fn accessibility_violations(&mut self) -> Vec<String> {
        strings(self.call(json!({"op": "axe"})).await)
    }

    /// The console errors, uncaught exceptions and failed or 4xx/5xx requests since the last
    /// call, one line each.
    pub async fn problems(&mut self) -> Vec<String> {
        strings(self.call(json!({"op": "problems"})).await)
    }
}

fn strings(value: Value) -> Vec<String> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// Debian's chromium (`ETL_CHROMIUM` may name another build).
fn chromium() -> PathBuf {
    let path = std::env::var_os("ETL_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is not there: `apt-get install chromium` (.ci/run installs it)",
        path.display()
    );
    path
}

/// Where the tests leave their screenshots: `target/screenshots`, beside the build.
pub fn screenshot_dir() -> PathBuf {
    let bin_dir = std::env::var("ETL_BIN_DIR").map(PathBuf::from).expect(
        "ETL_BIN_DIR is not set: run the suite with `cargo xtask test`, which builds the binaries",
    );
    bin_dir
        .parent()
        .expect("the binaries' folder is under target/")
        .join("screenshots")
}
