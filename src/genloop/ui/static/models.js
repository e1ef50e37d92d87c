// Models: versions with format, size, measured latency and perplexity; the lineage from parent
// to variant; compare two versions; promote and roll back.
import { api } from "./api.js";
import { fmt, h, notify, table, when } from "./ui.js";

export async function render(section) {
  const list = h("div", { id: "models-list" }, h("p", { class: "status", role: "status" }, "Loading models…"));
  const lineage = h("div", { id: "models-lineage" });
  const compare = h("div", { id: "models-compare" });
  const history = h("div", { id: "models-history" });
  section.replaceChildren(h("h2", { id: "models-title" }, "Models"), list, lineage, compare, history);
  await refresh(list, lineage, compare, history);
}

// An error in place with a Retry button, so a failed load is never a dead end.
function failedWithRetry(container, err, retry) {
  const button = h("button", { type: "button", class: "secondary retry" }, "Retry");
  button.addEventListener("click", () => {
    container.replaceChildren(h("p", { class: "status", role: "status" }, "Loading…"));
    retry();
  });
  container.replaceChildren(
    h("div", { class: "failed" }, h("p", { class: "error", role: "alert" }, `Could not load this: ${err.message || err}`), button),
  );
}

// 1234567 → "1.2 MB" (decimal units, as disks are sold and `du --si` prints)
function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) [n, i] = [n / 1000, i + 1];
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

// A measured number, or "—" with a tooltip saying it was never measured.
function measured(v, what, digits, unit = "") {
  const value = v[what];
  if (value === null || value === undefined) {
    const how = what === "latency_ms" ? "genloop optimize --report" : "genloop eval --suite perplexity";
    return h("span", { class: "unmeasured", title: `Not measured yet (${how})` }, "—", h("span", { class: "sr-only" }, " not measured"));
  }
  const m = v.measured?.[what];
  return h("span", { title: m ? `${m.metric}, from ${m.source}` : "" }, `${value.toFixed(digits)}${unit}`);
}

// "12.5 ms · ppl 310.00": what was measured, for the lineage (the table has a column each)
function numbers(v) {
  const parts = [];
  if (typeof v.latency_ms === "number") parts.push(`${v.latency_ms.toFixed(1)} ms`);
  if (typeof v.perplexity === "number") parts.push(`ppl ${v.perplexity.toFixed(2)}`);
  return parts.join(" · ");
}

function formatBadge(v) {
  const text = v.format || "?";
  return h("span", { class: `badge fmt fmt-${text}`, title: v.transform ? `made by ${v.transform}` : "" }, text);
}

async function refresh(list, lineage, compare, history) {
  let versions;
  try {
    versions = (await api("/v1/admin/models/variants")).data;
  } catch (err) {
    failedWithRetry(list, err, () => refresh(list, lineage, compare, history));
    return;
  }
  const reload = () => refresh(list, lineage, compare, history);
  list.replaceChildren(
    table(
      "Model versions",
      [
        ["Version", (v) => h("span", { class: "ref" }, v.ref)],
        ["Family", (v) => v.family],
        ["Format", formatBadge],
        ["Size", (v) => h("span", { class: "size", title: `${v.size_bytes} bytes in ${v.files} files` }, bytes(v.size_bytes))],
        ["Latency p50", (v) => measured(v, "latency_ms", 1, " ms")],
        ["Perplexity", (v) => measured(v, "perplexity", 2)],
        ["Stage", (v) => h("span", { class: "aliases", "data-ref": v.ref }, v.aliases.join(", ") || "–")],
        ["Parent", (v) => v.parent || "–"],
        ["Created", (v) => when(v.created_at)],
        ["Promote", (v) => promoteForm(v, reload)],
      ],
      versions,
      { id: "models-table" },
    ),
  );
  lineage.replaceChildren(lineageTree(versions), rollbackForm(versions, reload));
  compare.replaceChildren(compareForm(versions));
  const names = [...new Set(versions.map((v) => v.name))];
  history.replaceChildren(h("h3", {}, "Alias history"));
  for (const name of names) {
    try {
      const rows = (await api(`/v1/admin/models/${encodeURIComponent(name)}/aliases`)).data;
      history.append(
        table(`${name}: promotions and rollbacks`, [
          ["Alias", (r) => r.alias],
          ["Version", (r) => r.version],
          ["By", (r) => r.actor],
          ["Reason", (r) => r.reason],
          ["At", (r) => when(r.at)],
          ["Rolled back", (r) => when(r.rolled_back_at)],
        ], rows),
      );
    } catch (err) {
      history.append(h("p", { class: "error" }, err.message));
    }
  }
}

// Parent → variant as nested lists: each version under the one it was made from, with the
// transform on the arrow ("tiny@1 fp32 → int8-dynamic → tiny@3 int8"). Plain lists read
// well in a screen reader and wrap at phone width, which an SVG graph would not.
function lineageTree(versions) {
  const byRef = new Map(versions.map((v) => [v.ref, v]));
  const children = new Map();
  for (const v of versions) {
    const key = v.parent && byRef.has(v.parent) ? v.parent : null;
    if (!children.has(key)) children.set(key, []);
    children.get(key).push(v);
  }
  const node = (v) => {
    const kids = children.get(v.ref) || [];
    const label = h(
      "span",
      { class: "node" },
      v.parent ? h("span", { class: "arrow", "aria-hidden": "true" }, "↳ ") : null,
      v.transform ? h("span", { class: "transform" }, `${v.transform}: `) : null,
      h("strong", {}, v.ref),
      " ",
      formatBadge(v),
      h("span", { class: "facts" }, [bytes(v.size_bytes), numbers(v)].filter(Boolean).join(" · ")),
      v.aliases.length ? h("span", { class: "badge stage" }, v.aliases.join(", ")) : null,
    );
    return h("li", { "data-ref": v.ref }, label, kids.length ? h("ul", {}, kids.map(node)) : null);
  };
  const roots = children.get(null) || [];
  return h(
    "section",
    { "aria-labelledby": "lineage-title", class: "lineage" },
    h("h3", { id: "lineage-title" }, "Lineage: parent → variant"),
    roots.length ? h("ul", { class: "tree", id: "lineage-tree" }, roots.map(node)) : h("p", {}, "No versions yet."),
  );
}

function promoteForm(v, reload) {
  const id = `alias-${v.name}-${v.version}`;
  const alias = h("input", { id, value: "production", pattern: "[A-Za-z][A-Za-z0-9_-]{0,63}", size: 10, required: true });
  const form = h(
    "form",
    { class: "inline" },
    h("label", { for: id, class: "sr-only" }, `Alias for ${v.ref}`),
    alias,
    h("button", { type: "submit", "aria-label": `Promote ${v.ref}` }, "Promote"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!confirm(`Point ${v.name}@${alias.value} at version ${v.version}?`)) return;
    try {
      await api(`/v1/admin/models/${encodeURIComponent(v.name)}/promote`, {
        method: "POST",
        body: { version: v.version, alias: alias.value, reason: "promoted in the web UI" },
      });
      notify(`${v.name}@${alias.value} now points at version ${v.version}.`, "info");
      await reload();
    } catch (err) {
      notify(err.message);
    }
  });
  return form;
}

function rollbackForm(versions, reload) {
  const names = [...new Set(versions.map((v) => v.name))];
  if (!names.length) return h("div");
  const name = h("select", { id: "rb-name" }, names.map((n) => h("option", {}, n)));
  const alias = h("input", { id: "rb-alias", value: "production", required: true, size: 10 });
  const form = h(
    "form",
    { class: "row", "aria-label": "Roll back an alias" },
    h("div", { class: "field" }, h("label", { for: "rb-name" }, "Model"), name),
    h("div", { class: "field" }, h("label", { for: "rb-alias" }, "Alias"), alias),
    h("button", { type: "submit" }, "Roll back"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!confirm(`Roll ${name.value}@${alias.value} back to its previous version?`)) return;
    try {
      const info = await api(`/v1/admin/models/${encodeURIComponent(name.value)}/rollback`, {
        method: "POST",
        body: { alias: alias.value, reason: "rolled back in the web UI" },
      });
      notify(`${name.value}@${alias.value} is back at version ${info.version}.`, "info");
      await reload();
    } catch (err) {
      notify(err.message);
    }
  });
  return h("section", { "aria-labelledby": "rb-title" }, h("h3", { id: "rb-title" }, "Roll back"), form);
}

function compareForm(versions) {
  const refs = versions.map((v) => v.ref);
  const pick = (id, label, index) =>
    h("div", { class: "field" }, h("label", { for: id }, label),
      h("select", { id }, refs.map((r, i) => h("option", { selected: i === index }, r))));
  const out = h("div", { id: "diff-out", "aria-live": "polite" });
  const form = h("form", { class: "row" }, pick("cmp-a", "Version A", 1), pick("cmp-b", "Version B", 0), h("button", { type: "submit" }, "Compare"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const a = document.getElementById("cmp-a").value, b = document.getElementById("cmp-b").value;
    try {
      const d = await api(`/v1/admin/models/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
      const metricRows = Object.entries(d.metrics).map(([k, m]) => ({ k, ...m }));
      const configRows = Object.entries(d.config).map(([k, m]) => ({ k, ...m }));
      const lineageRows = Object.entries(d.lineage).map(([k, m]) => ({ k, ...m }));
      const delta = (r) => {
        if (r.delta === undefined) return "–";
        const pct = r.delta_pct === undefined ? "" : ` (${r.delta_pct > 0 ? "+" : ""}${r.delta_pct.toFixed(1)} %)`;
        return `${r.delta > 0 ? "+" : ""}${fmt(r.delta)}${pct}`;
      };
      out.replaceChildren(
        table(`Metrics: ${d.a} → ${d.b}`, [["Metric", (r) => r.k], ["A", (r) => fmt(r.a)], ["B", (r) => fmt(r.b)], ["Delta", delta]], metricRows),
        table("Config differences", [["Key", (r) => r.k], ["A", (r) => fmt(r.a)], ["B", (r) => fmt(r.b)]], configRows),
        table("Lineage differences", [["Field", (r) => r.k], ["A", (r) => fmt(r.a)], ["B", (r) => fmt(r.b)]], lineageRows),
      );
    } catch (err) {
      notify(err.message);
    }
  });
  return h("section", { "aria-labelledby": "cmp-title" }, h("h3", { id: "cmp-title" }, "Compare two versions"), refs.length < 2 ? h("p", {}, "Two versions are needed.") : [form, out]);
}
