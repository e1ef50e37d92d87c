// Models: versions with metrics and aliases; compare two versions; promote and roll back.
import { api } from "./api.js";
import { failed, fmt, h, notify, table, when } from "./ui.js";

export async function render(section) {
  const list = h("div", { id: "models-list" }, h("p", { class: "status", role: "status" }, "Loading models…"));
  const compare = h("div", { id: "models-compare" });
  const history = h("div", { id: "models-history" });
  section.replaceChildren(h("h2", { id: "models-title" }, "Models"), list, compare, history);
  await refresh(list, compare, history);
}

async function refresh(list, compare, history) {
  let versions;
  try {
    versions = (await api("/v1/admin/models")).data;
  } catch (err) {
    failed(list, err);
    return;
  }
  const reload = () => refresh(list, compare, history);
  list.replaceChildren(
    table(
      "Model versions",
      [
        ["Ref", (v) => v.ref],
        ["Family", (v) => v.family],
        ["Aliases", (v) => h("span", { class: "aliases", "data-ref": v.ref }, v.aliases.join(", ") || "–")],
        ["Metrics", (v) => Object.entries(v.metrics || {}).slice(0, 4).map(([k, m]) => `${k} ${fmt(m)}`).join(", ") || "–"],
        ["Parent", (v) => v.parent || "–"],
        ["Created", (v) => when(v.created_at)],
        ["Promote", (v) => promoteForm(v, reload)],
      ],
      versions,
      { id: "models-table" },
    ),
    rollbackForm(versions, reload),
  );
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
