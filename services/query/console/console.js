// The operations console: one page over the query API (/stats, /runs, /rejects and the admin
// actions). Everything from the API is put in the page as text (textContent), never as HTML.
"use strict";

const REFRESH_MS = 10000;
const KEY = "etl-console-key";
// A run that rejects more than this share of what it read turns its source amber; a few bad
// rows in a large file are a data-quality note (the counts show them), not an alarm.
const REJECTS_AMBER = 0.01;
// Whether this service asks for API keys (its page says so). Without keys the API reads
// freely and refuses every action.
const KEYS_REQUIRED = document.querySelector('meta[name="etl-api-keys"]').content === "required";

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function say(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

class Unauthorized extends Error {}

/** A JSON answer of the API, with the key when one is set; a problem's detail on failure. */
async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    askForKey();
    throw new Unauthorized(body.detail || "an API key is needed");
  }
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function askForKey() {
  const form = document.getElementById("key-form");
  form.hidden = false;
  document.getElementById("key-input").focus();
}

function ago(timestamp) {
  if (!timestamp) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(timestamp)) / 1000);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function duration(seconds) {
  if (seconds === undefined || seconds === null) return "running";
  return seconds < 10 ? `${seconds.toFixed(2)} s` : `${Math.round(seconds)} s`;
}

function every(seconds) {
  if (!seconds) return "–";
  if (seconds % 3600 === 0) return `every ${seconds / 3600} h`;
  if (seconds % 60 === 0) return `every ${seconds / 60} min`;
  return `every ${seconds} s`;
}

/** Rows waiting to be normalized: every raw row until the normalizer has looked at the source. */
function lagOf(source) {
  return source.checkpoint ? source.checkpoint.lag : source.raw_records;
}

/** When the normalizer last applied a change of the source. */
function lastNormalizedChange(source) {
  return ago(source.checkpoint && source.checkpoint.last_processed_at);
}

/** Red, amber or green, and why, from a source's stats. */
function stateOf(source) {
  const ingest = source.last_ingest;
  const normalize = source.last_normalize;
  if (ingest && ingest.status === "failed")
    return ["red", `last ingest failed: ${ingest.error_message || "no reason given"}`];
  if (normalize && normalize.status === "failed")
    return ["red", `last normalize failed: ${normalize.error_message || "no reason given"}`];
  if (source.replay && source.replay.error) return ["red", `replay stopped: ${source.replay.error}`];
  if (!ingest) return ["amber", "never ingested"];
  const schedule = source.config ? source.config.schedule_seconds : null;
  const fresh = source.last_successful_ingest_at;
  if (schedule && fresh && Date.now() - Date.parse(fresh) > 2 * schedule * 1000 + 60000)
    return ["amber", `stale: last successful ingest ${ago(fresh)}, ${every(schedule)}`];
  const lag = lagOf(source);
  if (lag > 0) return ["amber", `${lag} rows waiting to be normalized`];
  if (source.replay) return ["amber", `replaying: ${source.replay.remaining} rows to go`];
  for (const [stage, run] of [["ingest", ingest], ["normalize", normalize]]) {
    if (run && run.records_rejected > REJECTS_AMBER * run.records_processed)
      return ["amber", `last ${stage} rejected ${run.records_rejected} of ${run.records_processed} records`];
  }
  const rejected = source.rejected_at_ingest + source.rejected_at_normalize;
  return ["green", `ingested ${ago(ingest.ended_at || ingest.started_at)}, all normalized` +
    (rejected ? `; ${source.rejected_at_ingest} rejected at ingest, ${source.rejected_at_normalize} at normalize` : "")];
}

function stateCell(source) {
  const [level, reason] = stateOf(source);
  return el("td", { "data-label": "State" },
    el("div", { class: "state-cell" },
      el("span", { class: `state ${level}` }, level),
      el("span", { class: "reason" }, reason)));
}

function runSummary(run) {
  if (!run) return "never";
  return `${run.status}, ${ago(run.started_at)}, ${duration(run.duration_seconds)}, ` +
    `${run.records_processed} read (${run.records_inserted} new, ${run.records_updated} changed, ` +
    `${run.records_rejected} rejected)`;
}

function td(label, content, numeric = false) {
  return el("td", { "data-label": label, class: numeric ? "num" : null }, content);
}

function table(caption, headings, rows) {
  return el("div", { class: "table" },
    el("table", { class: "cards" },
      el("caption", { class: "visually-hidden" }, caption),
      el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)));
}

async function overview() {
  const stats = await api("/stats");
  const rows = stats.sources.map((source) => el("tr", { "data-source": source.source },
    td("Source", el("a", { href: `#/source/${encodeURIComponent(source.source)}` }, source.source)),
    stateCell(source),
    td("Kind", source.config ? `${source.config.kind}, ${every(source.config.schedule_seconds)}` : "–"),
    td("Last ingest", runSummary(source.last_ingest)),
    td("Last normalize", runSummary(source.last_normalize)),
    td("Last successful ingest", ago(source.last_successful_ingest_at)),
    td("Last change normalized", lastNormalizedChange(source)),
    td("Lag (rows)", lagOf(source), true),
    td("Records", source.records, true),
    td("Rejected at ingest", source.rejected_at_ingest, true),
    td("Rejected at normalize", source.rejected_at_normalize, true)));
  return [
    el("h2", {}, `Sources (${stats.sources.length}), ${stats.total_records} records`),
    stats.sources.length
      ? table("Every source's state", ["Source", "State", "Kind", "Last ingest", "Last normalize",
        "Last successful ingest", "Last change normalized", "Lag (rows)", "Records",
        "Rejected at ingest", "Rejected at normalize"], rows)
      : el("p", {}, "No source yet: an ingester publishes its sources when it starts."),
  ];
}

/** A line of rows per second over the runs (oldest first), as an SVG sparkline. */
function sparkline(runs) {
  const rates = runs.filter((r) => r.duration_seconds > 0)
    .map((r) => r.records_processed / r.duration_seconds).reverse();
  const label = rates.length
    ? `Rows per second over the last ${rates.length} ingest runs: from ${Math.round(Math.min(...rates))} to ${Math.round(Math.max(...rates))}`
    : "No finished ingest run yet";
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  if (rates.length > 1) {
    const top = Math.max(...rates) || 1;
    const points = rates.map((rate, i) =>
      `${(i * 100) / (rates.length - 1)},${28 - (rate / top) * 26}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points);
    svg.append(line);
  }
  return el("figure", {}, svg, el("figcaption", {}, label));
}

function position(reject) {
  const p = reject.position;
  if (p.line) return `line ${p.line}`;
  if (p.page) return `page ${p.page}, item ${p.item}`;
  if (p.raw_id) return `raw row ${p.raw_id}`;
  return "–";
}

async function act(name, action) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent =
    action === "run" ? `Run ${name} now?` : `Replay ${name}?`;
  document.getElementById("confirm-text").textContent = action === "run"
    ? "An ingester reads the source now, as its schedule would."
    : "A normalizer rebuilds the source's records from its raw rows; the current version stays served until the new one is complete.";
  dialog.returnValue = "";
  dialog.showModal();
  const choice = await new Promise((resolve) =>
    dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true }));
  if (choice !== "ok") return;
  try {
    const request = await api(`/sources/${encodeURIComponent(name)}/${action}`, { method: "POST" });
    notice = {
      text: `${action} of ${name} asked for (request ${request.request_id}); its run appears below shortly.`,
      until: Date.now() + 30000,
    };
    say(notice.text);
    setTimeout(render, 1500);
  } catch (error) {
    say(`${action} of ${name} refused: ${error.message}`, true);
  }
}

const PAGE_SIZE = 20;

/** The link to a source's page, with the page of runs and of rejects it shows. */
function sourceHref(name, pages) {
  const query = new URLSearchParams();
  if (pages.runs > 1) query.set("runs", pages.runs);
  if (pages.rejects > 1) query.set("rejects", pages.rejects);
  const tail = query.toString();
  return `#/source/${encodeURIComponent(name)}${tail ? `?${tail}` : ""}`;
}

/** "Newer" and "Older" links under a paged table, when there is somewhere to go. */
function pager(name, pages, which, answer) {
  const page = pages[which];
  const links = [];
  if (page > 1)
    links.push(el("a", { href: sourceHref(name, { ...pages, [which]: page - 1 }), rel: "prev" }, "← Newer"));
  if (answer.has_more)
    links.push(el("a", { href: sourceHref(name, { ...pages, [which]: page + 1 }), rel: "next" }, "Older →"));
  if (!links.length && page === 1) return null;
  return el("nav", { class: "pager", "aria-label": `Pages of ${which}` },
    el("span", {}, `Page ${page}`), ...links);
}

async function sourcePage(name, pages) {
  const source_ = `source=${encodeURIComponent(name)}`;
  const [stats, runs, rejects, ingests, records] = await Promise.all([
    api("/stats"),
    api(`/runs?${source_}&page_size=${PAGE_SIZE}&page=${pages.runs}`),
    api(`/rejects?${source_}&page_size=${PAGE_SIZE}&page=${pages.rejects}`),
    api(`/runs?${source_}&page_size=${PAGE_SIZE}&service=ingester`),
    api(`/data?${source_}&page_size=5&sort=-updated_at`),
  ]);
  const source = stats.sources.find((s) => s.source === name);
  if (!source) return [el("h2", {}, name), el("p", {}, "No such source.")];
  const config = source.config;
  const mapping = config ? config.mapping : null;
  const [level, reason] = stateOf(source);
  return [
    el("h2", {}, name, " ", el("span", { class: `state ${level}` }, level)),
    el("p", { class: "reason" }, reason),
    KEYS_REQUIRED
      ? el("div", { class: "buttons" },
        el("button", { type: "button", id: "run-now", onclick: () => act(name, "run") }, "Run now"),
        el("button", { type: "button", id: "replay", class: "secondary", onclick: () => act(name, "replay") }, "Replay"))
      : el("p", { id: "actions-off" },
        "Run now and Replay need an admin API key, and this service has no keys file " +
        "(QUERY_API_KEYS_FILE; etl-query api-key NAME --admin makes one)."),
    el("h2", {}, "Freshness"),
    el("dl", {},
      el("dt", {}, "Last successful ingest"), el("dd", {}, ago(source.last_successful_ingest_at)),
      el("dt", {}, "Last change normalized"), el("dd", {}, lastNormalizedChange(source)),
      el("dt", {}, "Lag (rows)"), el("dd", {}, lagOf(source)),
      el("dt", {}, "Records"), el("dd", {}, source.records),
      el("dt", {}, "Rejected"), el("dd", {}, `${source.rejected_at_ingest} at ingest, ${source.rejected_at_normalize} at normalize`)),
    el("h2", {}, "Configuration"),
    config ? el("dl", {},
      el("dt", {}, "Kind"), el("dd", {}, config.kind),
      el("dt", {}, "Schedule"), el("dd", {}, every(config.schedule_seconds)),
      el("dt", {}, "URL"), el("dd", {}, config.url),
      el("dt", {}, "source_id"), el("dd", {}, mapping.by_position ? "the record's position" : mapping.source_id.join(" + ")),
      el("dt", {}, "name"), el("dd", {}, mapping.name),
      el("dt", {}, "value"), el("dd", {}, mapping.value),
      el("dt", {}, "description"), el("dd", {}, mapping.description || "–"))
      : el("p", {}, "Not published by an ingester yet."),
    el("h2", {}, "Throughput"),
    sparkline(ingests.data),
    el("h2", { id: "runs" }, "Runs"),
    table(`Runs of ${name}`, ["Run", "Service", "Status", "Started", "Duration", "Read", "New", "Changed", "Rejected", "Error"],
      runs.data.map((run) => el("tr", { "data-run": run.run_id },
        td("Run", run.run_id, true),
        td("Service", run.service),
        td("Status", run.status),
        td("Started", ago(run.started_at)),
        td("Duration", duration(run.duration_seconds)),
        td("Read", run.records_processed, true),
        td("New", run.records_inserted, true),
        td("Changed", run.records_updated, true),
        td("Rejected", run.records_rejected, true),
        td("Error", run.error_message || "")))),
    pager(name, pages, "runs", runs),
    el("h2", { id: "rejects" }, "Rejects"),
    rejects.data.length
      ? table(`Rejected records of ${name}`, ["Stage", "Where", "Reason", "Record"],
        rejects.data.map((reject) => el("tr", { "data-reject": reject.id },
          td("Stage", reject.stage),
          td("Where", position(reject)),
          td("Reason", reject.reason),
          td("Record", el("pre", {}, reject.raw_encoding === "base64" ? `(base64) ${reject.raw}` : reject.raw)))))
      : el("p", {}, "No rejected record."),
    pager(name, pages, "rejects", rejects),
    el("h2", {}, "Latest records"),
    records.data.length
      ? table(`Latest records of ${name}`, ["source_id", "Name", "Value", "Description", "Updated"],
        records.data.map((record) => el("tr", { "data-record": record.source_id },
          td("source_id", record.source_id),
          td("Name", record.name),
          td("Value", record.value, true),
          td("Description", record.description || ""),
          td("Updated", ago(record.updated_at)))))
      : el("p", {}, "No record yet."),
  ];
}

/** What identifies a focusable element across a re-render: its id, else its link. */
function focusKey(node) {
  if (node.id) return `#${CSS.escape(node.id)}`;
  const href = node.getAttribute("href");
  return href ? `a[href="${CSS.escape(href)}"]` : null;
}

// Renders can overlap (the timer, a click, a navigation): only the latest one started may
// fill the page, so a slow refresh of the overview never replaces the source page just opened.
let latestRender = 0;
// What the operator last asked for, kept in the status line for a while across refreshes.
let notice = null;

async function render() {
  const started = ++latestRender;
  const main = document.getElementById("main");
  const route = location.hash.match(/^#\/source\/([^?]+)(?:\?(.*))?$/);
  // A refresh replaces the content: the focus goes back where it was, for keyboard users.
  const focused = document.activeElement;
  const key = focused && focused !== main && main.contains(focused) ? focusKey(focused) : null;
  try {
    let content;
    if (route) {
      const query = new URLSearchParams(route[2] || "");
      const page = (name) => Math.max(1, parseInt(query.get(name), 10) || 1);
      content = await sourcePage(decodeURIComponent(route[1]), { runs: page("runs"), rejects: page("rejects") });
    } else {
      content = await overview();
    }
    if (started !== latestRender) return;
    main.replaceChildren(...content.filter((node) => node !== null));
    document.getElementById("key-form").hidden = true;
    if (key) main.querySelector(key)?.focus({ preventScroll: true });
    if (notice && Date.now() > notice.until) notice = null;
    say(`${notice ? `${notice.text} ` : ""}Updated ${new Date().toLocaleTimeString()}; ` +
      `refreshes every ${REFRESH_MS / 1000} s.`);
  } catch (error) {
    if (started !== latestRender) return;
    say(error instanceof Unauthorized ? "An API key is needed." : `Could not load: ${error.message}`, true);
  }
}

function start() {
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("key-input").value.trim());
    render();
  });
  window.addEventListener("hashchange", () => {
    render();
    document.getElementById("main").focus();
  });
  // A service that asks for keys says so in the page: ask before the first request.
  if (KEYS_REQUIRED && !sessionStorage.getItem(KEY)) {
    askForKey();
    say("An API key is needed.");
  } else {
    render();
  }
  setInterval(() => {
    // No refresh under an open dialog (the confirmation keeps its context) or while a key
    // is asked for.
    if (!document.getElementById("confirm").open && document.getElementById("key-form").hidden) render();
  }, REFRESH_MS);
}

start();
