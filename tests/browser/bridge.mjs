// The browser side of the console's tests: Debian's chromium, driven by playwright-core, one
// JSON command a line on stdin, one JSON answer a line on stdout. The Rust tests start the real
// services, say what to do here and assert on what comes back, so every assertion sits beside
// the data it is about. Everything the page logs as an error, every uncaught exception and
// every request that fails or answers 4xx/5xx is kept and handed over by `problems`.
import { createInterface } from "node:readline";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

const browser = await chromium.launch({
  executablePath: process.env.ETL_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // As root (CI) chromium needs --no-sandbox; the rest keep it off a network it cannot reach.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

let page = null;
let problems = [];

async function open({ url, width = 1280, height = 800 }) {
  if (page) await page.context().close();
  const context = await browser.newContext({ viewport: { width, height } });
  page = await context.newPage();
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console error: ${message.text()}`);
  });
  page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
  page.on("requestfailed", (request) =>
    problems.push(`request failed: ${request.method()} ${request.url()}: ${request.failure()?.errorText}`));
  page.on("response", (response) => {
    if (response.status() >= 400)
      problems.push(`HTTP ${response.status()}: ${response.request().method()} ${response.url()}`);
  });
  await page.goto(url, { waitUntil: "load" });
  return null;
}

const commands = {
  open,
  goto: async ({ url }) => { await page.goto(url, { waitUntil: "load" }); return null; },
  // An expression evaluated in the page (a promise is awaited); its value as JSON.
  eval: async ({ js }) => page.evaluate(js),
  wait: async ({ selector, timeout_ms }) => {
    await page.waitForSelector(selector, { timeout: timeout_ms });
    return null;
  },
  viewport: async ({ width, height }) => { await page.setViewportSize({ width, height }); return null; },
  // Until an expression evaluated in the page is truthy; that value.
  // (Polled from here: waitForFunction evaluates inside the page, which the console's CSP forbids.)
  until: async ({ js, timeout_ms }) => {
    const deadline = Date.now() + timeout_ms;
    for (;;) {
      const value = await page.evaluate(js);
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`still false after ${timeout_ms} ms: ${js}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  },
  click: async ({ selector }) => { await page.click(selector); return null; },
  fill: async ({ selector, value }) => { await page.fill(selector, value); return null; },
  press: async ({ key }) => { await page.keyboard.press(key); return null; },
  screenshot: async ({ path, full_page = true }) => {
    await page.screenshot({ path, fullPage: full_page });
    return null;
  },
  // axe-core's WCAG 2.1 A and AA rules (contrast, labels, names, roles) over the page as it is.
  axe: async () => {
    await page.evaluate(AXE);
    const result = await page.evaluate(() => globalThis.axe.run(document, {
      runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] },
    }));
    return result.violations.map((v) =>
      `${v.id} (${v.impact}): ${v.help}: ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
  },
  problems: async () => { const seen = problems; problems = []; return seen; },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const { op, ...args } = JSON.parse(line);
  let answer;
  try {
    if (!commands[op]) throw new Error(`no such command: ${op}`);
    answer = { ok: (await commands[op](args)) ?? null };
  } catch (error) {
    answer = { error: String(error && error.message || error) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
