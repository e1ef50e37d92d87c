// Line charts drawn by uPlot (vendored: vendor/uPlot.iife.min.js, a classic script that
// defines window.uPlot before the app's modules run). Why uPlot: docs/ui.md.
//
// Every time the UI shows is in one zone, UTC, and says so: time axes are labelled
// "time (UTC)" and headers use when() (ui.js). Charts size themselves to their box (a
// ResizeObserver), keep a padded range around a single point, grow the y axis to fit its
// longest label, and say in words when there is nothing to draw.
import { fmt, h } from "./ui.js";

export const ZONE = "UTC";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

export function color(i) {
  return COLORS[i % COLORS.length];
}

function css(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

// Series [{name, points: [[x, y], …]}] on one shared, sorted x (uPlot's data layout):
// a series without a point at some x gets null there (drawn across: spanGaps).
function align(series) {
  const xs = [...new Set(series.flatMap((s) => s.points.map(([x]) => +x)))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const ys = series.map((s) => {
    const col = new Array(xs.length).fill(null);
    for (const [x, y] of s.points) col[index.get(+x)] = y === null || !Number.isFinite(y) ? null : y;
    return col;
  });
  return [xs, ...ys];
}

// The y axis as wide as its longest label (uPlot's default is a fixed 50 px, which cut
// labels such as "0.002350" to "0002350").
function fitAxis(self, values, axisIdx, cycleNum) {
  const axis = self.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  let size = axis.ticks.size + axis.gap;
  const longest = (values ?? []).reduce((a, v) => (String(v).length > a.length ? String(v) : a), "");
  if (longest) {
    self.ctx.font = axis.font[0];
    size += self.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size) + 4;
}

// Time tick labels, 24-hour UTC, as fine as the tick spacing: seconds under a minute,
// HH:MM under a day (the date under the first tick and where the day changes, or under
// every tick when the ticks span days), MM-DD under a month, else YYYY-MM.
function timeTicks(u, splits, axisIdx, space, incr) {
  const pad = (n) => String(n).padStart(2, "0");
  const span = splits.length ? splits[splits.length - 1] - splits[0] : 0;
  let lastDay = null;
  return splits.map((t) => {
    const d = new Date(t * 1000);
    const day = `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
    const hm = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
    if (incr >= 28 * 86400) return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}`;
    if (incr >= 86400) return day;
    const text = incr < 60 ? `${hm}:${pad(d.getUTCSeconds())}` : hm;
    const withDay = span >= 86400 || day !== lastDay;
    lastDay = day;
    return withDay ? `${text}\n${day}` : text;
  });
}

// chart(title, series, {time, xLabel, yLabel, empty, zero, pad, height}) → <figure>
//   time: x in Unix seconds, shown as UTC time; else a number (step, minutes…)
//   empty: the sentence shown instead of a chart when no series has a point
//   zero: the y axis starts at 0 (counts and rates)
//   pad: half the x range around a single point (seconds for time; default 30 min / 1),
//        used whenever the points span less than that
export function chart(title, series, opts = {}) {
  const { time = false, xLabel = time ? `time (${ZONE})` : "step", yLabel = "", empty = "No points yet.", zero = false } = opts;
  const id = `chart-${Math.random().toString(36).slice(2, 9)}`;
  const figure = h("figure", { class: "chart", "aria-labelledby": id }, h("figcaption", { id }, title));
  const live = series.filter((s) => s.points.some(([, y]) => y !== null && Number.isFinite(y)));
  if (!live.length) {
    figure.classList.add("empty");
    figure.append(h("p", { class: "empty" }, empty));
    return figure;
  }
  const summary = live
    .map((s) => {
      const ys = s.points.filter(([, y]) => y !== null && Number.isFinite(y));
      return `${s.name}: ${ys.length} points, last ${fmt(ys[ys.length - 1][1])}`;
    })
    .join("; ");
  const plot = h("div", { class: "plot", role: "img", "aria-label": `${title}. ${summary}` });
  figure.append(plot, h("p", { class: "sr-only" }, summary));
  const data = align(live);
  const pad = opts.pad ?? (time ? 1800 : 1);
  const muted = css("--muted", "#4b5563");
  const grid = { stroke: css("--line", "#d1d5db"), width: 1 };
  const axis = { stroke: muted, grid, ticks: grid, font: "11px system-ui, sans-serif", labelFont: "11px system-ui, sans-serif" };
  const options = {
    width: 300,
    height: opts.height ?? 220,
    tzDate: (ts) => window.uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    scales: {
      x: {
        time,
        // a single point (or points closer than pad): centred in a range 2·pad wide
        range: (u, min, max) => (max - min < pad ? [(min + max) / 2 - pad, (min + max) / 2 + pad] : [min, max]),
      },
      y: {
        range: (u, min, max) => {
          if (zero) return [0, max > 0 ? max * 1.1 : 1];
          if (min === max) {
            const d = Math.abs(min) * 0.1 || 1;
            return [min - d, max + d];
          }
          return window.uPlot.rangeNum(min, max, 0.1, true);
        },
      },
    },
    axes: [
      { ...axis, label: xLabel, labelSize: 18, ...(time ? { values: timeTicks, space: 60 } : {}) },
      { ...axis, label: yLabel || undefined, labelSize: yLabel ? 18 : 0, size: fitAxis },
    ],
    legend: { live: false },
    cursor: { drag: { x: true, y: false } },
    series: [
      { label: xLabel },
      ...live.map((s, i) => ({
        label: s.name,
        stroke: s.color ?? color(i),
        width: 2,
        spanGaps: true,
        points: { show: data[0].length <= 40, size: 5 },
      })),
    ],
  };
  let u = null;
  new ResizeObserver(() => {
    const width = Math.floor(plot.clientWidth);
    if (!width) return;
    if (!u) {
      u = new window.uPlot({ ...options, width }, data, plot);
      figure.uplot = u; // for tests and the console: the instance behind this figure
      figure.dataset.drawn = "true";
    } else if (u.width !== width) {
      u.setSize({ width, height: options.height });
    }
  }).observe(plot);
  return figure;
}
