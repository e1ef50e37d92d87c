// Small DOM helpers shared by the views (the charts: charts.js).

// h("button", {type: "button", onclick}, "text", child…) → element
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

let noticeTimer = null;

// A message for everyone (read out by screen readers): kind "error" | "info".
export function notify(message, kind = "error") {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.className = `notice ${kind}`;
  box.hidden = false;
  clearTimeout(noticeTimer);
  if (kind === "info") noticeTimer = setTimeout(() => (box.hidden = true), 4000);
}

export function clearNotice() {
  document.getElementById("notice").hidden = true;
}

// A table with a caption; columns: [[header, row => cell], …].
export function table(caption, columns, rows, attrs = {}) {
  // a wrap that may scroll sideways (phone width) is a named region the keyboard can reach
  return h(
    "div",
    { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
    h(
      "table",
      attrs,
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, columns.map(([name]) => h("th", { scope: "col" }, name)))),
      h(
        "tbody",
        {},
        rows.length
          ? rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row) ?? ""))))
          : h("tr", {}, h("td", { colspan: columns.length }, "Nothing yet.")),
      ),
    ),
  );
}

export function fmt(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// A time as the whole UI writes it: UTC, to the minute, zone named ("2026-12-07 22:28 UTC"),
// the same zone as every chart's time axis.
export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
}

// Show an error in place (and announce it) rather than leaving a view half-drawn; with
// `retry`, a Retry button that runs it (and the error stays until it succeeds).
export function failed(container, err, retry = null) {
  const message = h("p", { class: "error", role: "alert" }, err.message || String(err));
  if (!retry) {
    container.replaceChildren(message);
    return;
  }
  const button = h("button", { type: "button", class: "secondary retry" }, "Retry");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await retry();
    } finally {
      button.disabled = false;
    }
  });
  container.replaceChildren(h("div", { class: "failed" }, message, button));
}
