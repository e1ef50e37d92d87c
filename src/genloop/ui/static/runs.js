// Runs: a list with status; one run's loss, validation loss and throughput curves, config, lineage.
import { api } from "./api.js";
import { failed, fmt, h, lineChart, table, when } from "./ui.js";

// Charts drawn first, each with the series it holds; any other series gets a chart of its own.
const CHARTS = [
  ["Loss", ["loss", "val_loss"], "loss"],
  ["Throughput", ["tokens_per_s", "samples_per_s", "images_per_s"], "per second"],
  ["Learning rate", ["lr"], "lr"],
];

export async function render(section) {
  const detail = h("div", { id: "run-detail" });
  const list = h("div", {}, h("p", { class: "status", role: "status" }, "Loading runs…"));
  section.replaceChildren(h("h2", { id: "runs-title" }, "Runs"), list, detail);
  try {
    const runs = (await api("/v1/admin/runs?limit=200")).data;
    list.replaceChildren(
      table(
        "Runs, newest first",
        [
          ["Run", (r) => h("button", { type: "button", class: "link", "data-run": r.id, onclick: () => show(detail, r.id) }, r.name || r.id.slice(0, 8))],
          ["Kind", (r) => r.kind],
          ["Status", (r) => h("span", { class: `badge ${r.status}` }, r.status)],
          ["Started", (r) => when(r.started_at)],
          ["Ended", (r) => when(r.ended_at)],
          ["Summary", (r) => Object.entries(r.summary || {}).slice(0, 3).map(([k, v]) => `${k} ${fmt(v)}`).join(", ")],
        ],
        runs,
        { id: "runs-table" },
      ),
    );
  } catch (err) {
    failed(list, err);
  }
}

async function show(detail, runId) {
  detail.replaceChildren(h("p", { class: "status", role: "status" }, "Loading the run…"));
  try {
    const run = await api(`/v1/admin/runs/${encodeURIComponent(runId)}?max_points=500`);
    const metrics = run.metrics || {};
    const charts = h("div", { class: "charts" });
    const used = new Set();
    for (const [title, keys, yLabel] of CHARTS) {
      const series = keys.filter((k) => metrics[k]).map((k) => ({ name: k, points: metrics[k] }));
      series.forEach((s) => used.add(s.name));
      if (series.length) charts.append(lineChart(title, series, { yLabel }));
    }
    for (const [key, points] of Object.entries(metrics)) {
      if (!used.has(key)) charts.append(lineChart(key, [{ name: key, points }]));
    }
    if (!charts.children.length) charts.append(h("p", {}, "This run has no metric series."));
    const lineage = [
      ["Dataset version id", run.dataset_version_id],
      ["Parent model version id", run.parent_model_version_id],
      ["Parent run", run.parent_run_id],
      ["Child runs", (run.child_runs || []).join(", ")],
      ["Models made", (run.models || []).join(", ")],
      ["Study / trial", run.study ? `${run.study} #${run.trial}` : null],
      ["Git commit", run.git_commit],
    ];
    const heading = h("h3", { id: "run-title", tabindex: "-1" }, `Run ${run.name || run.id}`);
    detail.replaceChildren(
      heading,
      h("p", {}, h("span", { class: `badge ${run.status}` }, run.status), ` ${run.kind} · ${when(run.started_at)}`),
      h("p", { class: "error", hidden: !run.error }, run.error || ""),
      charts,
      h("h4", {}, "Lineage"),
      h("dl", { class: "pairs" }, lineage.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, fmt(v || null))])),
      h("details", {}, h("summary", {}, "Config"), h("pre", {}, JSON.stringify(run.config, null, 2))),
    );
    heading.focus();
  } catch (err) {
    failed(detail, err);
  }
}
