// Monitoring: request rate, latency percentiles, errors and drift over time; alerts.
import { api } from "./api.js";
import { failed, h, lineChart, notify, table, when } from "./ui.js";

const WINDOWS = [
  [1, 5, "Last hour"],
  [24, 60, "Last 24 hours"],
  [24 * 7, 360, "Last 7 days"],
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

async function draw(body, hours, bucket) {
  body.replaceChildren(h("p", { class: "status", role: "status" }, "Loading…"));
  try {
    const [mon, alerts] = await Promise.all([
      api(`/v1/admin/monitoring?hours=${hours}&bucket_minutes=${bucket}`),
      api("/v1/admin/alerts?limit=50"),
    ]);
    const at = (p) => new Date(p.start);
    const pts = (key) => mon.requests.map((p) => [at(p), p[key]]);
    const perMin = mon.requests.map((p) => [at(p), p.requests / mon.bucket_minutes]);
    const charts = h(
      "div",
      { class: "charts" },
      lineChart("Request rate", [{ name: "requests per minute", points: perMin }], { xLabel: "time", yLabel: "req/min" }),
      lineChart("Latency percentiles", [
        { name: "p50", points: pts("latency_p50_ms") },
        { name: "p95", points: pts("latency_p95_ms") },
        { name: "p99", points: pts("latency_p99_ms") },
      ], { xLabel: "time", yLabel: "ms" }),
      lineChart("Errors", [{ name: "errors (status ≥ 400)", points: pts("errors") }], { xLabel: "time", yLabel: "count" }),
    );
    for (const [model, series] of Object.entries(mon.drift)) {
      charts.append(
        lineChart(`Drift: ${model}`, Object.entries(series).map(([key, points]) => ({ name: key, points: points.map(([t, v]) => [new Date(t), v]) })), { xLabel: "time", yLabel: "score" }),
      );
    }
    const total = mon.requests.reduce((n, p) => n + p.requests, 0);
    const errors = mon.requests.reduce((n, p) => n + p.errors, 0);
    body.replaceChildren(
      h("p", { id: "mon-summary" }, `${total} requests, ${errors} errors since ${when(mon.since)}.`),
      charts,
      alertsTable(alerts.data, () => draw(body, hours, bucket)),
    );
  } catch (err) {
    failed(body, err);
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
