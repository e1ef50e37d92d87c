// Data: dataset versions with statistics, the preprocessing report (card), and a browser of
// a version's records: text a page at a time (escaped, long ones folded), images with
// their captions as thumbnails.
import { api, getKey } from "./api.js";
import { fmt, h, table, when } from "./ui.js";

const PAGE = 20;
const FOLD = 300; // characters of a record shown before "Show all"

export async function render(section) {
  const list = h("div", { id: "datasets-list" }, h("p", { class: "status", role: "status" }, "Loading datasets…"));
  const detail = h("div", { id: "dataset-detail" });
  section.replaceChildren(h("h2", { id: "data-title" }, "Data"), list, detail);
  await load(list, detail);
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

async function load(list, detail) {
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
    failedWithRetry(list, err, () => load(list, detail));
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
    const records = h("section", { id: "records", "aria-labelledby": "records-title" });
    detail.replaceChildren(
      heading,
      statsTable(info.stats),
      records,
      h("h4", {}, "Preprocessing report"),
      card ? h("pre", { class: "card" }, card.markdown) : h("p", {}, "No dataset card."),
      h("h4", {}, "Sample records"),
      samples.data.length
        ? h("ol", { class: "samples" }, samples.data.map((r) => h("li", {}, h("pre", {}, typeof r === "string" ? r : JSON.stringify(r, null, 2)))))
        : h("p", {}, "No sample records stored."),
      h("details", {}, h("summary", {}, "Config and lineage"), h("pre", {}, JSON.stringify({ config: info.config, lineage: info.lineage, files: info.files }, null, 2))),
    );
    heading.focus();
    await browse(records, base, info, null, 0);
  } catch (err) {
    failedWithRetry(detail, err, () => show(detail, name, version));
  }
}

// One page of a split's records, with the split picker and Previous / Next.
async function browse(box, base, info, split, offset) {
  const title = h("h4", { id: "records-title" }, "Records");
  let page;
  try {
    const q = new URLSearchParams({ offset: String(offset), limit: String(PAGE) });
    if (split) q.set("split", split);
    page = await api(`${base}/records?${q}`);
  } catch (err) {
    box.replaceChildren(title, h("div"));
    failedWithRetry(box.lastChild, err, () => browse(box, base, info, split, offset));
    return;
  }
  if (page.storage === "tokens" || page.storage === "none") {
    const tokens = info.stats?.tokens;
    const what =
      page.storage === "tokens"
        ? `This version stores token ids only (${page.splits.join(", ")} split${page.splits.length > 1 ? "s" : ""}${tokens ? `, ${fmt(tokens)} tokens` : ""}): the text was not kept, so there are no records to show. The sample records below were saved when it was prepared.`
        : "This version stores no records to browse.";
    box.replaceChildren(title, h("p", { class: "help" }, what));
    return;
  }
  const go = (s, o) => browse(box, base, info, s, o);
  const splitId = "records-split";
  const picker = h(
    "select",
    { id: splitId, onchange: (e) => go(e.target.value, 0) },
    page.splits.map((s) => h("option", { value: s, selected: s === page.split }, s)),
  );
  const last = offset + page.data.length;
  const of = page.total !== null && page.total !== undefined ? ` of ${fmt(page.total)}` : "";
  const position = page.data.length ? `Records ${offset + 1}–${last}${of}` : "No records on this page";
  const prev = h("button", { type: "button", class: "secondary", disabled: offset === 0, onclick: () => go(page.split, Math.max(0, offset - PAGE)) }, "Previous");
  const next = h("button", { type: "button", class: "secondary", disabled: !page.has_more, onclick: () => go(page.split, offset + PAGE) }, "Next");
  const list =
    page.storage === "images"
      ? h("ul", { class: "thumbs", id: "records-list" }, page.data.map((r) => thumb(base, page.split, r)))
      : h("ol", { class: "records", id: "records-list", start: String(offset + 1) }, page.data.map((r) => recordItem(page.storage, r)));
  box.replaceChildren(
    title,
    h(
      "div",
      { class: "row pager" },
      h("div", { class: "field" }, h("label", { for: splitId }, "Split"), picker),
      h("p", { class: "status", role: "status", id: "records-position" }, position),
      prev,
      next,
    ),
    list,
  );
}

// A record as escaped, preformatted text (textContent, never HTML); long ones fold. A
// document (docs/) shows its text under its id and label; a row (pairs/) shows as JSON,
// since every field of it matters (prompt and response, chosen and rejected, text and label).
function recordItem(storage, r) {
  const rec = r.record;
  const isDoc = storage === "docs" && typeof rec?.text === "string";
  const text = typeof rec === "string" ? rec : isDoc ? rec.text : JSON.stringify(rec, null, 2);
  const item = h("li", { "data-index": r.index });
  if (isDoc && (rec.id || rec.label !== null && rec.label !== undefined)) {
    item.append(h("p", { class: "help record-id" }, [rec.id, rec.label !== null && rec.label !== undefined ? `label ${rec.label}` : null].filter(Boolean).join(" · ")));
  }
  const pre = h("pre", {});
  pre.textContent = text.length > FOLD ? `${text.slice(0, FOLD)}…` : text;
  item.append(pre);
  if (text.length > FOLD) {
    const more = h("button", { type: "button", class: "link expand", "aria-expanded": "false" }, "Show all");
    more.addEventListener("click", () => {
      const open = more.getAttribute("aria-expanded") === "true";
      pre.textContent = open ? `${text.slice(0, FOLD)}…` : text;
      more.setAttribute("aria-expanded", String(!open));
      more.textContent = open ? "Show all" : "Show less";
    });
    item.append(more);
  }
  if (r.truncated) item.append(h("p", { class: "help" }, "Cut short by the server (very long fields)."));
  return item;
}

// An image of the split: fetched with the key (an <img src> cannot send it), shown from a
// blob URL, with its caption (or label) as text and as the image's alternative text.
function thumb(base, split, r) {
  const words = r.caption || (r.label !== null && r.label !== undefined ? `label ${r.label}` : `image ${r.index + 1}`);
  const img = h("img", { alt: words, width: 96, height: 96, loading: "lazy" });
  const figure = h("li", { "data-index": r.index }, h("figure", {}, img, h("figcaption", {}, words)));
  fetch(`${base}/images/${encodeURIComponent(split)}/${r.index}`, { headers: { Authorization: `Bearer ${getKey() ?? ""}` } })
    .then((res) => (res.ok ? res.blob() : Promise.reject(new Error(`image ${r.index}: ${res.status}`))))
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true }); // drawn: free it
      img.src = url;
    })
    .catch((err) => img.replaceWith(h("p", { class: "error" }, err.message)));
  return figure;
}
