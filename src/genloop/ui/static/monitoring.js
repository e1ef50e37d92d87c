// Monitoring: request rate, latency percentiles, errors and drift over time (UTC); errors
// by status, refusal reasons, usage per key; alerts.
import { api } from "./api.js";
import { chart } from "./charts.js";
import { failed, h, notify, table, when } from "./ui.js";

const WINDOWS = [
  [1, 5, "Last hour"],
  [24, 60, "Last 24 hours"],
  [24 * 7, 360, "Last 7 days"],
  [24 * 30, 720, "Last 30 days"],
];

export async function render(section) {
  const select = h(
    "select",
    { id: "mon-window" },
    WINDOWS.map(([hours, bucket, label], i) => h("option", { value: `${hours}:${bucket}`, selected: i === 1 }, label)),
  );
  const body = h("div", { id: "mon-body" });
  const refresh = h("button", { type: "button", class: "secondary" }, "Refresh");
  section.replaceChildren(
    h("h2", { id: "mon-title" }, "Monitoring"),
    h("div", { class: "row" }, h("div", { class: "field" }, h("label", { for: "mon-window" }, "Window"), select), refresh),
    body,
  );
  const load = () => draw(body, ...select.value.split(":").map(Number));
  select.addEventListener("change", load);
  refresh.addEventListener("click", load);
  await load();
}

// Every bucket of the window, oldest first, with its counts (0 where nothing was logged:
// a gap in traffic is shown as zero, not drawn across) and latencies (null there).
function filled(mon) {
  const width = mon.bucket_minutes * 60;
  const since = Date.parse(mon.since) / 1000;
  const until = Date.parse(mon.until) / 1000;
  const byStart = new Map(mon.requests.map((p) => [Math.round(Date.parse(p.start) / 1000), p]));
  const out = [];
  for (let t = since; t < until; t += width) {
    const p = byStart.get(Math.round(t)) ?? {};
    out.push({
      t,
      requests: p.requests ?? 0,
      client_errors: p.client_errors ?? 0,
      server_errors: p.server_errors ?? 0,
      rejected: p.rejected ?? 0,
      p50: p.latency_p50_ms ?? null,
      p95: p.latency_p95_ms ?? null,
      p99: p.latency_p99_ms ?? null,
    });
  }
  return out;
}

async function draw(body, hours, bucket) {
  body.replaceChildren(h("p", { class: "status", role: "status" }, "Loading…"));
  try {
    const [mon, alerts, usage] = await Promise.all([
      api(`/v1/admin/monitoring?hours=${hours}&bucket_minutes=${bucket}`),
      api("/v1/admin/alerts?limit=50"),
      api(`/v1/admin/usage?hours=${hours}&by=key`),
    ]);
    const buckets = filled(mon);
    const total = mon.requests.reduce((n, p) => n + p.requests, 0);
    const errors = mon.requests.reduce((n, p) => n + p.errors, 0);
    const refused = mon.requests.reduce((n, p) => n + (p.rejected ?? 0), 0);
    const line = (name, key, scale = 1) => ({ name, points: total ? buckets.map((b) => [b.t, b[key] === null ? null : b[key] * scale]) : [] });
    const time = { time: true, pad: bucket * 60 };
    const charts = h(
      "div",
      { class: "charts" },
      chart("Request rate", [line("requests per minute", "requests", 1 / mon.bucket_minutes)], {
        ...time, yLabel: "req/min", zero: true, empty: "No requests in this window.",
      }),
      chart("Latency percentiles", [line("p50", "p50"), line("p95", "p95"), line("p99", "p99")], {
        ...time, yLabel: "ms", zero: true, empty: "No successful requests in this window, so no latency.",
      }),
      chart(
        "Errors by class",
        errors ? [line("4xx", "client_errors"), line("5xx", "server_errors"), line("of which refused", "rejected")] : [],
        { ...time, yLabel: "per bucket", zero: true, empty: "No errors in this window." },
      ),
    );
    for (const [model, series] of Object.entries(mon.drift)) {
      const lines = Object.entries(series).map(([key, points]) => ({ name: key, points: points.map(([t, v]) => [Date.parse(t) / 1000, v]) }));
      charts.append(chart(`Drift: ${model}`, lines, { ...time, yLabel: "score", empty: "No drift checks in this window." }));
    }
    const byStatus = Object.entries(mon.by_status ?? {}).map(([status, count]) => ({ status, count }));
    const byReason = Object.entries(mon.by_reason ?? {}).map(([reason, count]) => ({ reason, count }));
    body.replaceChildren(
      h(
        "p",
        { id: "mon-summary" },
        `${total} requests, ${errors} errors (${refused} refused) from ${when(mon.since)} to ${when(mon.until)}, in buckets of ${mon.bucket_minutes} min. Times are in UTC.`,
      ),
      charts,
      h(
        "div",
        { class: "tables" },
        table("Errors by status", [["Status", (r) => r.status], ["Requests", (r) => r.count]], byStatus, { id: "mon-by-status" }),
        table("Top refusal reasons", [["Reason", (r) => r.reason], ["Requests", (r) => r.count]], byReason.slice(0, 10), { id: "mon-by-reason" }),
      ),
      table(
        "Usage by API key (whole hours)",
        [
          ["Key", (r) => r.key_name ?? "(no key)"],
          ["Prefix", (r) => (r.key_prefix ? h("code", {}, r.key_prefix) : "–")],
          ["Requests", (r) => r.requests],
          ["Prompt tokens", (r) => r.prompt_tokens],
          ["Completion tokens", (r) => r.completion_tokens],
        ],
        usage.summary,
        { id: "mon-usage" },
      ),
      alertsTable(alerts.data, () => draw(body, hours, bucket)),
    );
  } catch (err) {
    failed(body, err, () => draw(body, hours, bucket));
  }
}

function alertsTable(alerts, reload) {
  return table(
    "Alerts, newest first",
    [
      ["When", (a) => when(a.created_at)],
      ["Kind", (a) => a.kind],
      ["Severity", (a) => h("span", { class: `badge ${a.severity}` }, a.severity)],
      ["Source", (a) => a.source],
      ["Message", (a) => a.message],
      [
        "Resolved",
        (a) =>
          a.resolved_at
            ? when(a.resolved_at)
            : h("button", {
                type: "button",
                class: "secondary",
                onclick: async () => {
                  try {
                    await api(`/v1/admin/alerts/${a.id}/resolve`, { method: "POST" });
                    await reload();
                  } catch (err) {
                    notify(err.message);
                  }
                },
              }, "Resolve"),
      ],
    ],
    alerts,
    { id: "alerts-table" },
  );
}
