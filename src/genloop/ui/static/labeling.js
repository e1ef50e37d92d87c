// Label: pick a task, label its next item (a class, token spans, an edited text, A or B),
// starting from the pre-label when there is one; see progress and agreement (Cohen's kappa).
import { api } from "./api.js";
import { failed, fmt, h, notify, table } from "./ui.js";

const OUTSIDE = "O";

export async function render(section) {
  const taskSelect = h("select", { id: "label-task", name: "task" });
  const second = h("input", { id: "label-agreement", type: "checkbox" });
  const item = h("div", { id: "label-item", "aria-live": "polite" });
  const progress = h("div", { id: "label-progress" });
  section.replaceChildren(
    h("h2", { id: "label-title" }, "Label"),
    h(
      "div",
      { class: "row" },
      h("div", { class: "field" }, h("label", { for: "label-task" }, "Task"), taskSelect),
      h("div", { class: "field check" }, second, h("label", { for: "label-agreement" }, "Second opinions (items others labeled)")),
    ),
    item,
    progress,
  );
  let tasks;
  try {
    tasks = (await api("/v1/label/tasks")).data;
  } catch (err) {
    failed(item, err);
    return;
  }
  if (!tasks.length) {
    item.replaceChildren(h("p", { class: "status", role: "status" }, "No labeling tasks yet: create one with 'genloop label create'."));
    return;
  }
  taskSelect.replaceChildren(...tasks.map((t) => h("option", { value: t.name }, `${t.name} (${t.kind})`)));
  let loads = 0; // only the newest load draws (a quick change of task must not be overdrawn)
  const load = () => {
    const mine = ++loads;
    const task = tasks.find((t) => t.name === taskSelect.value);
    showNext(task, second.checked, item, progress, () => mine === loads).catch((err) => failed(item, err));
  };
  taskSelect.addEventListener("change", load);
  second.addEventListener("change", load);
  load();
}

async function showNext(task, agreement, item, progress, current) {
  const base = `/v1/label/tasks/${encodeURIComponent(task.name)}`;
  item.replaceChildren(h("p", { class: "status", role: "status" }, "Loading the next item…"));
  const [next, info] = await Promise.all([api(`${base}/next${agreement ? "?agreement=true" : ""}`), api(base)]);
  if (!current()) return;
  showProgress(info, progress);
  if (!next.item) {
    const done = `Nothing left for ${next.annotator} in ${task.name}.`;
    item.replaceChildren(h("p", { id: "label-done", class: "status", role: "status", "data-task": task.name }, done));
    return;
  }
  const editor = EDITORS[info.kind](info, next.item);
  const submit = h("button", { type: "submit", id: "label-submit" }, "Submit");
  const form = h(
    "form",
    { id: "label-form", "data-item": next.item.id, "data-task": task.name },
    h("p", { class: "help" }, `Item ${next.item.position + 1} of ${info.items}, labeling as ${next.annotator}`),
    editor.element,
    prelabelNote(info, next.item),
    h("div", { class: "row" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = editor.value();
    if (!value) {
      notify("Choose a label first.");
      return;
    }
    submit.disabled = true;
    try {
      const saved = await api(`${base}/items/${next.item.id}/labels`, { method: "POST", body: { value } });
      const note = saved.prelabel_accepted === true ? " (pre-label accepted)" : saved.prelabel_accepted === false ? " (pre-label corrected)" : "";
      notify(`Saved item ${next.item.position + 1}${note}.`, "info");
      await showNext(task, agreement, item, progress, current);
    } catch (err) {
      notify(err.message);
      submit.disabled = false;
    }
  });
  item.replaceChildren(form);
}

function prelabelNote(task, item) {
  if (!item.prelabel) return null;
  const source = task.prelabel_source ? ` from ${task.prelabel_source}` : "";
  return h("p", { class: "help", id: "label-prelabel" }, `Pre-filled with the pre-label${source}: accept it or correct it.`);
}

// Each editor: {element, value()} where value() is the label to submit (null: none chosen).
const EDITORS = {
  classification(task, item) {
    let chosen = item.prelabel?.label ?? null;
    const buttons = task.label_set.map((label) =>
      h("button", { type: "button", class: "choice", "aria-pressed": String(label === chosen), "data-label": label }, label),
    );
    for (const b of buttons) {
      b.addEventListener("click", () => {
        chosen = b.dataset.label;
        for (const o of buttons) o.setAttribute("aria-pressed", String(o === b));
      });
    }
    const element = h(
      "div",
      {},
      h("blockquote", { class: "label-text", id: "label-text" }, item.payload.text),
      h("div", { class: "choices", role: "group", "aria-label": "Label" }, buttons),
    );
    return { element, value: () => (chosen === null ? null : { label: chosen }) };
  },

  spans(task, item) {
    const labels = item.prelabel?.labels ? [...item.prelabel.labels] : item.payload.tokens.map(() => OUTSIDE);
    let brush = task.label_set[0];
    const palette = [...task.label_set, OUTSIDE].map((label) =>
      h("button", { type: "button", class: "choice", "aria-pressed": String(label === brush), "data-label": label }, label === OUTSIDE ? "O (none)" : label),
    );
    for (const b of palette) {
      b.addEventListener("click", () => {
        brush = b.dataset.label;
        for (const o of palette) o.setAttribute("aria-pressed", String(o === b));
      });
    }
    const tokens = item.payload.tokens.map((text, i) => {
      const tag = h("span", { class: "tag" }, labels[i] === OUTSIDE ? "" : labels[i]);
      const b = h("button", { type: "button", class: "token", "data-index": i, "data-label": labels[i], "aria-label": `${text}: ${labels[i]}` }, text, tag);
      b.addEventListener("click", () => {
        labels[i] = labels[i] === brush ? OUTSIDE : brush; // a second click clears it
        b.dataset.label = labels[i];
        b.setAttribute("aria-label", `${text}: ${labels[i]}`);
        tag.textContent = labels[i] === OUTSIDE ? "" : labels[i];
      });
      return b;
    });
    const element = h(
      "div",
      {},
      h("div", { class: "choices", role: "group", "aria-label": "Label to assign" }, palette),
      h("p", { class: "help" }, "Click a token to give it the selected label; click it again to clear it."),
      h("div", { class: "tokens", id: "label-tokens" }, tokens),
    );
    return { element, value: () => ({ labels: [...labels] }) };
  },

  caption(task, item) {
    const start = item.prelabel?.text ?? item.payload.text ?? "";
    const box = h("textarea", { id: "label-edit", rows: 4, maxlength: 32000 });
    box.value = start;
    const element = h(
      "div",
      {},
      item.payload.prompt ? h("blockquote", { class: "label-text" }, item.payload.prompt) : null,
      h("label", { for: "label-edit" }, "Text (edit it as it should be)"),
      box,
    );
    return { element, value: () => (box.value.trim() ? { text: box.value } : null) };
  },

  preference(task, item) {
    let chosen = item.prelabel?.choice ?? null;
    const side = (key) => {
      const b = h("button", { type: "button", class: "choice", "aria-pressed": String(key === chosen), "data-choice": key }, `${key.toUpperCase()} is better`);
      return [b, h("div", { class: "candidate" }, h("h3", {}, key.toUpperCase()), h("p", { class: "text" }, item.payload[key] || "(empty)"), b)];
    };
    const [ba, pa] = side("a");
    const [bb, pb] = side("b");
    for (const b of [ba, bb]) {
      b.addEventListener("click", () => {
        chosen = b.dataset.choice;
        for (const o of [ba, bb]) o.setAttribute("aria-pressed", String(o === b));
      });
    }
    const element = h(
      "div",
      {},
      h("blockquote", { class: "label-text" }, item.payload.prompt || "(no prompt)"),
      h("div", { class: "candidates" }, pa, pb),
    );
    return { element, value: () => (chosen === null ? null : { choice: chosen }) };
  },
};

function pct(x) {
  return x === null || x === undefined ? "–" : `${Math.round(x * 100)}%`;
}

function showProgress(info, progress) {
  const p = info.progress;
  const pre = p.prelabels;
  progress.replaceChildren(
    h("h3", {}, "Progress"),
    h(
      "dl",
      { class: "pairs", id: "label-stats" },
      h("dt", {}, "Items"),
      h("dd", {}, `${p.items}: ${p.labeled_items} labeled, ${p.complete_items} complete (${p.overlap} label(s) each)`),
      h("dt", {}, "You"),
      h("dd", { id: "label-you" }, `${p.you.labeled} labeled, ${p.you.remaining} left`),
      h("dt", {}, "Pre-labels"),
      h("dd", { id: "label-accuracy" }, pre.items ? `${pre.accepted} of ${pre.reviewed} accepted (${pct(pre.accuracy)})` : "none"),
    ),
    table(
      "Agreement between annotators (Cohen's kappa)",
      [
        ["Annotators", (r) => r.annotators.join(" / ")],
        ["Common items", (r) => r.items],
        ["Same answer", (r) => pct(r.observed)],
        ["Kappa", (r) => fmt(r.kappa)],
      ],
      p.agreement,
      { id: "label-agreement-table" },
    ),
  );
}
