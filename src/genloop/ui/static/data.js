// Data: dataset versions with statistics, the preprocessing report (card) and sample records.
import { api } from "./api.js";
import { failed, fmt, h, table, when } from "./ui.js";

export async function render(section) {
  const list = h("div", {}, h("p", { class: "status", role: "status" }, "Loading datasets…"));
  const detail = h("div", { id: "dataset-detail" });
  section.replaceChildren(h("h2", { id: "data-title" }, "Data"), list, detail);
  try {
    const datasets = (await api("/v1/admin/datasets")).data;
    const rows = datasets.flatMap((d) => d.versions);
    list.replaceChildren(
      table(
        "Dataset versions",
        [
          ["Version", (v) => h("button", { type: "button", class: "link", onclick: () => show(detail, v.name, v.version) }, `${v.name}@${v.version}`)],
          ["Kind", (v) => v.kind],
          ["Status", (v) => v.status],
          ["Records", (v) => fmt(v.stats?.records ?? v.stats?.documents ?? null)],
          ["Tokens", (v) => fmt(v.stats?.tokens ?? null)],
          ["Created", (v) => when(v.created_at)],
        ],
        rows,
        { id: "datasets-table" },
      ),
    );
  } catch (err) {
    failed(list, err);
  }
}

function statsTable(stats) {
  const rows = Object.entries(stats || {}).map(([k, v]) => ({ k, v }));
  return table("Statistics", [["Statistic", (r) => r.k], ["Value", (r) => fmt(r.v)]], rows);
}

async function show(detail, name, version) {
  detail.replaceChildren(h("p", { class: "status", role: "status" }, "Loading…"));
  const base = `/v1/admin/datasets/${encodeURIComponent(name)}/${version}`;
  try {
    const info = await api(base);
    const [card, samples] = await Promise.all([
      api(`${base}/card`).catch(() => null),
      api(`${base}/samples?limit=20`).catch(() => ({ data: [] })),
    ]);
    const heading = h("h3", { tabindex: "-1" }, `${name}@${version}`);
    detail.replaceChildren(
      heading,
      statsTable(info.stats),
      h("h4", {}, "Preprocessing report"),
      card ? h("pre", { class: "card" }, card.markdown) : h("p", {}, "No dataset card."),
      h("h4", {}, "Sample records"),
      samples.data.length
        ? h("ol", { class: "samples" }, samples.data.map((r) => h("li", {}, h("pre", {}, typeof r === "string" ? r : JSON.stringify(r, null, 2)))))
        : h("p", {}, "No sample records stored."),
      h("details", {}, h("summary", {}, "Config and lineage"), h("pre", {}, JSON.stringify({ config: info.config, lineage: info.lineage, files: info.files }, null, 2))),
    );
    heading.focus();
  } catch (err) {
    failed(detail, err);
  }
}
