// Small DOM helpers and an SVG line chart shared by the views.

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

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

// A line chart of series [{name, points: [[x, y], …]}] as an accessible SVG figure.
// x is a number (step) or a Date; the figure's caption and a text summary name the values.
export function lineChart(title, series, { xLabel = "step", yLabel = "" } = {}) {
  const W = 640, H = 260, L = 56, R = 12, T = 12, B = 36;
  const all = series.flatMap((s) => s.points).filter(([, y]) => y !== null && Number.isFinite(y));
  const figure = h("figure", { class: "chart" }, h("figcaption", {}, title));
  if (!all.length) {
    figure.append(h("p", { class: "help" }, "No points yet."));
    return figure;
  }
  const xs = all.map(([x]) => +x), ys = all.map(([, y]) => y);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - 1, y1 + 1];
  const px = (x) => L + ((+x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const isTime = series[0]?.points[0]?.[0] instanceof Date;
  const xText = (x) => (isTime ? new Date(x).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : fmt(Math.round(x)));
  const summary = series
    .map((s) => {
      const last = s.points[s.points.length - 1];
      return `${s.name}: ${s.points.length} points, last ${fmt(last?.[1])}`;
    })
    .join("; ");
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": `${title}. ${summary}`,
    preserveAspectRatio: "xMidYMid meet",
  });
  root.append(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4, x = x0 + ((x1 - x0) * i) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: py(y), y2: py(y), class: "grid" }));
    const yt = svg("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end", class: "tick" });
    yt.textContent = fmt(y);
    const xt = svg("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "tick" });
    xt.textContent = xText(x);
    root.append(yt, xt);
  }
  const xl = svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis" });
  xl.textContent = xLabel;
  root.append(xl);
  if (yLabel) {
    const yl = svg("text", { x: 4, y: H - 4, class: "axis" });
    yl.textContent = yLabel;
    root.append(yl);
  }
  series.forEach((s, i) => {
    const pts = s.points.filter(([, y]) => y !== null && Number.isFinite(y));
    const d = pts.map(([x, y], j) => `${j ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    root.append(svg("path", { d, class: "line", stroke: COLORS[i % COLORS.length], "data-series": s.name }));
    if (pts.length === 1) root.append(svg("circle", { cx: px(pts[0][0]), cy: py(pts[0][1]), r: 3, fill: COLORS[i % COLORS.length] }));
  });
  figure.append(root);
  figure.append(
    h(
      "ul",
      { class: "legend" },
      series.map((s, i) => h("li", {}, h("span", { class: "swatch", style: `background:${COLORS[i % COLORS.length]}` }), s.name)),
    ),
  );
  return figure;
}

// Show an error in place (and announce it) rather than leaving a view half-drawn.
export function failed(container, err) {
  container.replaceChildren(h("p", { class: "error", role: "alert" }, err.message || String(err)));
}
