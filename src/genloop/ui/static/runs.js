// Runs: a list with status; tick two or more to overlay their curves (by step or elapsed
// time, EMA-smoothed) and see how their configs and final metrics differ; one run's curves,
// pipeline stages, lineage and config.
import { api } from "./api.js";
import { chart, color } from "./charts.js";
import { failed, fmt, h, table, when } from "./ui.js";

// Charts drawn first, each with the series it holds; any other series gets a chart of its own.
const CHARTS = [
  ["Loss", ["loss", "val_loss"], "loss"],
  ["Throughput", ["tokens_per_s", "samples_per_s", "images_per_s"], "per second"],
  ["Learning rate", ["lr"], "lr"],
];
const RUN_ID = /^[0-9a-f]{32}$/;
const MODEL_REF = /^[A-Za-z0-9][\w.-]*@\d+$/;
const details = new Map(); // run id → the admin API's answer (with point times)

function runDetails(id) {
  if (!details.has(id)) {
    const answer = api(`/v1/admin/runs/${encodeURIComponent(id)}?max_points=1000&with_time=true`);
    details.set(id, answer);
    answer.catch(() => details.delete(id));
  }
  return details.get(id);
}

export async function render(section) {
  const detail = h("div", { id: "run-detail" });
  const compare = h("div", { id: "runs-compare" });
  const list = h("div", {}, h("p", { class: "status", role: "status" }, "Loading runs…"));
  section.replaceChildren(h("h2", { id: "runs-title" }, "Runs"), list, compare, detail);
  const load = async () => {
    details.clear();
    const runs = (await api("/v1/admin/runs?limit=200")).data;
    let picked = []; // in the order ticked: the first is the first series and column
    const pick = (run, on) => {
      picked = on ? [...picked, run] : picked.filter((r) => r.id !== run.id);
      drawCompare(compare, picked);
    };
    list.replaceChildren(
      table(
        "Runs, newest first (tick two or more to compare)",
        [
          ["Compare", (r) => h("input", { type: "checkbox", class: "pick", "aria-label": `Compare ${label(r)}`, onchange: (e) => pick(r, e.target.checked) })],
          ["Run", (r) => h("button", { type: "button", class: "link", "data-run": r.id, onclick: () => show(detail, r.id) }, label(r))],
          ["Kind", (r) => r.kind],
          ["Status", (r) => h("span", { class: `badge ${r.status}` }, r.status)],
          ["Started", (r) => when(r.started_at)],
          ["Ended", (r) => when(r.ended_at)],
          ["Summary", (r) => shortSummary(r)],
        ],
        runs,
        { id: "runs-table" },
      ),
    );
    drawCompare(compare, []);
  };
  try {
    await load();
  } catch (err) {
    failed(list, err, () => render(section));
  }
}

function label(run) {
  return run.name || run.id.slice(0, 8);
}

// One line: a pipeline's stage count (and where it failed); else the first few scalars.
function shortSummary(run) {
  const summary = run.summary || {};
  if (summary.stages && typeof summary.stages === "object") {
    const stages = Object.values(summary.stages);
    const done = stages.filter((s) => s.status !== "failed").length;
    return `${stages.length} stages, ${done} done${summary.failed_stage ? `, failed at ${summary.failed_stage}` : ""}`;
  }
  return Object.entries(summary)
    .filter(([, v]) => typeof v !== "object" || v === null)
    .slice(0, 3)
    .map(([k, v]) => `${k} ${fmt(v)}`)
    .join(", ");
}

// ---------------------------------------------------------------- comparing runs

// TensorBoard's smoothing: an exponential moving average, debiased so the first points
// are not pulled towards zero. weight 0 leaves the curve as it is.
export function smooth(points, weight) {
  if (!weight) return points;
  let last = 0;
  let n = 0;
  return points.map(([x, y]) => {
    if (y === null || !Number.isFinite(y)) return [x, y];
    last = last * weight + (1 - weight) * y;
    n += 1;
    return [x, last / (1 - weight ** n)];
  });
}

async function drawCompare(box, picked) {
  if (picked.length < 2) {
    box.replaceChildren(
      h("p", { class: "help" }, picked.length ? "Tick one more run to compare." : "Tick two or more runs to overlay their curves and compare their configs."),
    );
    return;
  }
  box.replaceChildren(h("p", { class: "status", role: "status" }, "Loading the runs to compare…"));
  let runs;
  try {
    runs = await Promise.all(picked.map((r) => runDetails(r.id)));
  } catch (err) {
    failed(box, err, () => drawCompare(box, picked));
    return;
  }
  const keys = [...new Set(runs.flatMap((r) => Object.keys(r.metrics || {})))].sort();
  const metric = h("select", { id: "cmp-metric" }, keys.map((k) => h("option", { value: k, selected: k === "loss" }, k)));
  const axis = h("select", { id: "cmp-x" }, h("option", { value: "step" }, "Step"), h("option", { value: "time" }, "Elapsed time (min)"));
  const weight = h("input", { id: "cmp-smooth", type: "range", min: "0", max: "0.99", step: "0.01", value: "0" });
  const shown = h("output", { for: "cmp-smooth", id: "cmp-smooth-value" }, "0");
  const plot = h("div", { id: "cmp-chart" });
  const redraw = () => {
    shown.textContent = weight.value;
    const key = metric.value;
    const byTime = axis.value === "time";
    const names = uniqueNames(runs);
    const series = runs.map((run, i) => {
      const points = run.metrics?.[key] ?? [];
      const t0 = points[0]?.[2] ?? 0;
      const xy = points.map(([step, value, at]) => [byTime ? (at - t0) / 60 : step, value]);
      if (byTime) xy.sort((a, b) => a[0] - b[0]);
      return { name: names[i], color: color(i), points: smooth(xy, Number(weight.value)) };
    });
    plot.replaceChildren(
      chart(`${key || "metric"} by ${byTime ? "elapsed time" : "step"}`, series, {
        xLabel: byTime ? "minutes since the run's first point" : "step",
        yLabel: key,
        empty: "None of these runs logged this metric.",
      }),
    );
  };
  for (const control of [metric, axis]) control.addEventListener("change", redraw);
  weight.addEventListener("input", redraw);
  box.replaceChildren(
    h("h3", { id: "cmp-title" }, `Comparing ${picked.length} runs`),
    h(
      "div",
      { class: "row" },
      h("div", { class: "field" }, h("label", { for: "cmp-metric" }, "Metric"), metric),
      h("div", { class: "field" }, h("label", { for: "cmp-x" }, "X axis"), axis),
      h("div", { class: "field" }, h("label", { for: "cmp-smooth" }, "Smoothing (EMA)"), h("div", { class: "inline" }, weight, shown)),
    ),
    plot,
    diffTable(runs),
  );
  redraw();
}

function uniqueNames(runs) {
  const counts = new Map();
  for (const r of runs) counts.set(label(r), (counts.get(label(r)) ?? 0) + 1);
  return runs.map((r) => (counts.get(label(r)) > 1 ? `${label(r)} (${r.id.slice(0, 6)})` : label(r)));
}

// {"train": {"lr": 1}} → {"train.lr": 1}
function flatten(value, prefix = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else if (prefix) {
    out[prefix] = value;
  }
  return out;
}

function same(values) {
  return values.every((v) => JSON.stringify(v) === JSON.stringify(values[0]));
}

// The config keys whose values differ, then each metric's last value, a column per run.
function diffTable(runs) {
  const names = uniqueNames(runs);
  const configs = runs.map((r) => flatten(r.config || {}));
  const configKeys = [...new Set(configs.flatMap(Object.keys))].sort();
  const rows = configKeys
    .map((key) => ({ section: "config", key, values: configs.map((c) => c[key]) }))
    .filter((row) => !same(row.values));
  const metricKeys = [...new Set(runs.flatMap((r) => Object.keys(r.metrics || {})))].sort();
  for (const key of metricKeys) {
    const last = runs.map((r) => {
      const points = r.metrics?.[key];
      return points?.length ? points[points.length - 1][1] : undefined;
    });
    rows.push({ section: "final metric", key, values: last });
  }
  return table(
    "How these runs differ: config keys with different values, and final metrics",
    [
      ["", (r) => r.section],
      ["Key", (r) => h("code", {}, r.key)],
      ...names.map((name, i) => [name, (r) => (r.values[i] === undefined ? "–" : fmt(r.values[i]))]),
    ],
    rows,
    { id: "runs-diff" },
  );
}

// ---------------------------------------------------------------- one run

async function show(detail, runId) {
  detail.replaceChildren(h("p", { class: "status", role: "status" }, "Loading the run…"));
  try {
    const run = await runDetails(runId);
    const metrics = run.metrics || {};
    const charts = h("div", { class: "charts" });
    const used = new Set();
    for (const [title, keys, yLabel] of CHARTS) {
      const series = keys.filter((k) => metrics[k]).map((k) => ({ name: k, points: metrics[k].map(([s, v]) => [s, v]) }));
      series.forEach((s) => used.add(s.name));
      if (series.length) charts.append(chart(title, series, { yLabel }));
    }
    for (const [key, points] of Object.entries(metrics)) {
      if (!used.has(key)) charts.append(chart(key, [{ name: key, points: points.map(([s, v]) => [s, v]) }], { yLabel: key }));
    }
    const lineage = [
      ["Dataset version id", run.dataset_version_id],
      ["Parent model version id", run.parent_model_version_id],
      ["Parent run", run.parent_run_id ? runLink(detail, run.parent_run_id) : null],
      ["Child runs", (run.child_runs || []).length ? (run.child_runs || []).map((id) => runLink(detail, id)) : null],
      ["Models made", (run.models || []).length ? (run.models || []).map((ref) => h("a", { href: "#models" }, ref)) : null],
      ["Study / trial", run.study ? `${run.study} #${run.trial}` : null],
      ["Git commit", run.git_commit ? h("code", {}, run.git_commit.slice(0, 12)) : null],
    ];
    const stages = run.summary?.stages && typeof run.summary.stages === "object" ? stagesTable(detail, run.summary.stages) : null;
    const heading = h("h3", { id: "run-title", tabindex: "-1" }, `Run ${run.name || run.id}`);
    const parts = [
      heading,
      h("p", {}, h("span", { class: `badge ${run.status}` }, run.status), ` ${run.kind} · ${when(run.started_at)}`),
      h("p", { class: "error", hidden: !run.error }, run.error || ""),
      stages,
      charts.children.length || !stages ? charts : null,
      charts.children.length || stages ? null : h("p", {}, "This run has no metric series."),
      h("h4", {}, "Lineage"),
      h("dl", { class: "pairs" }, lineage.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")])),
      h("details", { class: "config" }, h("summary", {}, "Config"), h("pre", { id: "run-config", tabindex: "0" }, JSON.stringify(run.config, null, 2))),
    ];
    detail.replaceChildren(...parts.filter(Boolean));
    heading.focus();
  } catch (err) {
    failed(detail, err, () => show(detail, runId));
  }
}

function runLink(detail, id) {
  return h("button", { type: "button", class: "link", title: id, onclick: () => show(detail, id) }, id.slice(0, 8));
}

// A value of a stage's outputs, short: a NAME@VERSION ref links to Data (a dataset) or
// Models, a run id opens the run, anything long is cut (in full on hover).
function output(detail, key, value) {
  const text = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
  if (MODEL_REF.test(text)) return h("a", { href: key.includes("dataset") ? "#data" : "#models" }, text);
  if (RUN_ID.test(text)) return runLink(detail, text);
  return text.length > 40 ? h("span", { title: text }, `${text.slice(0, 39)}…`) : text;
}

function stagesTable(detail, stages) {
  const rows = Object.entries(stages).map(([stage, s]) => ({ stage, ...s }));
  return table(
    "Pipeline stages",
    [
      ["Stage", (r) => r.stage],
      ["Status", (r) => h("span", { class: `badge ${r.status}` }, r.status)],
      ["Time", (r) => (typeof r.seconds === "number" ? `${r.seconds.toFixed(1)} s` : "–")],
      [
        "Output",
        (r) =>
          h(
            "ul",
            { class: "outputs" },
            Object.entries(r.outputs || {}).map(([k, v]) => h("li", {}, `${k}: `, output(detail, k, v))),
          ),
      ],
      ["Note", (r) => r.note || ""],
    ],
    rows,
    { id: "run-stages" },
  );
}
