// Playground: chat, completion or images against a served model, with feedback on every answer.
import { api, stream } from "./api.js";
import { h, notify } from "./ui.js";

let builtFor = null; // the session the view was drawn for (a new sign-in redraws it)
let controller = null; // the AbortController of the request in flight
const history = []; // chat messages so far

export async function render(section, session) {
  if (builtFor === session) return;
  builtFor = session;
  history.length = 0;
  const models = session.models;
  const modelSelect = h(
    "select",
    { id: "pg-model", name: "model" },
    models.map((m) => h("option", { value: m.id, "data-kind": m.kind || "text" }, `${m.id}${m.version ? ` (version ${m.version})` : ""}`)),
  );
  const mode = h(
    "select",
    { id: "pg-mode", name: "mode" },
    h("option", { value: "chat" }, "Chat"),
    h("option", { value: "completion" }, "Completion"),
  );
  const num = (id, label, attrs) =>
    h("div", { class: "field" }, h("label", { for: id }, label), h("input", { id, type: "number", ...attrs }));
  const sampling = h(
    "fieldset",
    { class: "sampling" },
    h("legend", {}, "Sampling"),
    num("pg-temperature", "Temperature", { min: 0, max: 2, step: 0.1, value: 0.8 }),
    num("pg-top-p", "Top p", { min: 0.01, max: 1, step: 0.01, value: 1 }),
    num("pg-max-tokens", "Max tokens", { min: 1, max: 4096, step: 1, value: 64 }),
    num("pg-seed", "Seed (optional)", { min: 0, step: 1 }),
  );
  const imageFields = h(
    "fieldset",
    { class: "sampling", hidden: true },
    h("legend", {}, "Images"),
    num("pg-n", "Number of images", { min: 1, max: 16, step: 1, value: 4 }),
    num("pg-image-seed", "Seed (optional)", { min: 0, step: 1 }),
    num("pg-steps", "Steps (text-to-image, optional)", { min: 1, max: 1000, step: 1 }),
    num("pg-guidance", "Guidance scale (text-to-image, optional)", { min: 0, max: 50, step: 0.5 }),
    h("div", { class: "field" }, h("label", { for: "pg-negative" }, "Negative prompt (text-to-image, optional)"),
      h("input", { id: "pg-negative", type: "text", maxlength: 4000 })),
  );
  const transcript = h("ol", { id: "pg-transcript", class: "transcript", "aria-live": "polite", "aria-label": "Conversation" });
  const prompt = h("textarea", { id: "pg-prompt", rows: 3, required: true, placeholder: "Write a message…" });
  const send = h("button", { type: "submit", id: "pg-send" }, "Send");
  const stop = h("button", { type: "button", id: "pg-stop", disabled: true, onclick: () => controller?.abort() }, "Stop");
  const clear = h("button", { type: "button", class: "secondary", onclick: () => { history.length = 0; transcript.replaceChildren(); } }, "Clear");
  const status = h("p", { id: "pg-status", class: "status", role: "status" });
  const grid = h("div", { id: "pg-images", class: "image-grid", role: "group", "aria-label": "Generated images" });

  const form = h(
    "form",
    { id: "pg-form" },
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "pg-model" }, "Model"), modelSelect),
      h("div", { class: "field" }, h("label", { for: "pg-mode" }, "Mode"), mode)),
    sampling,
    imageFields,
    h("div", { class: "field" }, h("label", { for: "pg-prompt" }, "Prompt (for image models: what to draw, or a class name)"), prompt),
    h("div", { class: "row" }, send, stop, clear),
    status,
  );
  section.replaceChildren(h("h2", { id: "pg-title" }, "Playground"), form, transcript, grid);
  if (!models.length) status.textContent = "No model is served yet (or the server is still loading).";

  const isImage = () => modelSelect.selectedOptions[0]?.dataset.kind === "image";
  const syncKind = () => {
    const image = isImage();
    imageFields.hidden = !image;
    sampling.hidden = image;
    mode.disabled = image;
  };
  modelSelect.addEventListener("change", syncKind);
  syncKind();
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    status.textContent = "Generating…";
    try {
      if (isImage()) await runImages(text, modelSelect.value, grid, controller.signal);
      else await runText(text, modelSelect.value, mode.value, transcript, controller.signal, status);
      prompt.value = "";
    } catch (err) {
      if (err.name === "AbortError") status.textContent = "Stopped.";
      else {
        status.textContent = "Failed.";
        notify(err.message);
      }
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  });
}

function intOrNull(id) {
  const v = document.getElementById(id).value;
  return v === "" ? undefined : Number(v);
}

async function runText(text, model, mode, transcript, signal, status) {
  const params = {
    model,
    temperature: Number(document.getElementById("pg-temperature").value),
    top_p: Number(document.getElementById("pg-top-p").value),
    max_tokens: intOrNull("pg-max-tokens"),
    seed: intOrNull("pg-seed"),
  };
  transcript.append(h("li", { class: "msg user" }, h("span", { class: "who" }, "You"), h("div", { class: "text" }, text)));
  const body = h("div", { class: "text", "aria-busy": "true" });
  const item = h("li", { class: "msg assistant" }, h("span", { class: "who" }, "Model"), body);
  transcript.append(item);
  let responseId = null;
  let answer = "";
  const onEvent = (chunk) => {
    responseId = chunk.id || responseId;
    const choice = chunk.choices?.[0];
    const piece = mode === "chat" ? choice?.delta?.content : choice?.text;
    if (piece) {
      answer += piece;
      body.textContent = answer;
    }
  };
  let path, payload;
  if (mode === "chat") {
    history.push({ role: "user", content: text });
    path = "/v1/chat/completions";
    payload = { ...params, messages: [...history] };
  } else {
    path = "/v1/completions";
    payload = { ...params, prompt: text };
  }
  try {
    await stream(path, payload, { signal, onEvent });
    status.textContent = "Done.";
  } catch (err) {
    if (err.name === "AbortError") item.classList.add("stopped");
    throw err;
  } finally {
    body.removeAttribute("aria-busy");
    if (mode === "chat") history.push({ role: "assistant", content: answer });
    if (responseId) item.append(feedbackControls(responseId, answer));
  }
}

// Sends a rating (and a correction, for text) to /v1/feedback for this response id.
function rater(responseId, said) {
  return async (rating, correction) => {
    try {
      const body = { response_id: responseId, rating };
      if (correction) body.correction = correction;
      await api("/v1/feedback", { method: "POST", body });
      said.textContent = correction ? "Correction sent. Thank you." : "Feedback sent. Thank you.";
    } catch (err) {
      notify(err.message);
    }
  };
}

// Thumbs up/down for a set of generated images (nothing to edit there).
function ratingControls(responseId) {
  const said = h("span", { class: "status", role: "status" });
  const sendRating = rater(responseId, said);
  return h(
    "div",
    { class: "feedback", "data-response-id": responseId },
    h("button", { type: "button", class: "icon", "aria-label": "Good images", title: "Good images", onclick: () => sendRating(1) }, "👍"),
    h("button", { type: "button", class: "icon", "aria-label": "Bad images", title: "Bad images", onclick: () => sendRating(-1) }, "👎"),
    said,
  );
}

// Thumbs up/down and "edit the answer", sent to /v1/feedback for this response id.
function feedbackControls(responseId, answer) {
  const said = h("span", { class: "status", role: "status" });
  const sendRating = rater(responseId, said);
  const editor = h("form", { class: "edit", hidden: true });
  const area = h("textarea", { rows: 3, "aria-label": "Corrected answer" });
  area.value = answer;
  editor.append(area, h("button", { type: "submit" }, "Send correction"));
  editor.addEventListener("submit", (e) => {
    e.preventDefault();
    sendRating(-1, area.value);
    editor.hidden = true;
  });
  return h(
    "div",
    { class: "feedback", "data-response-id": responseId },
    h("button", { type: "button", class: "icon", "aria-label": "Good answer", title: "Good answer", onclick: () => sendRating(1) }, "👍"),
    h("button", { type: "button", class: "icon", "aria-label": "Bad answer", title: "Bad answer", onclick: () => sendRating(-1) }, "👎"),
    h("button", { type: "button", class: "secondary", onclick: () => { editor.hidden = !editor.hidden; if (!editor.hidden) area.focus(); } }, "Edit the answer"),
    said,
    editor,
  );
}

async function runImages(text, model, grid, signal) {
  const body = { model, prompt: text, n: intOrNull("pg-n") ?? 1, response_format: "b64_json" };
  const seed = intOrNull("pg-image-seed");
  if (seed !== undefined) body.seed = seed;
  const steps = intOrNull("pg-steps");
  if (steps !== undefined) body.num_inference_steps = steps;
  const guidance = document.getElementById("pg-guidance").value;
  if (guidance !== "") body.guidance_scale = Number(guidance);
  const negative = document.getElementById("pg-negative").value.trim();
  if (negative) body.negative_prompt = negative;
  const result = await api("/v1/images/generations", { method: "POST", body, signal });
  grid.replaceChildren(
    ...result.data.map((img, i) =>
      h("figure", {}, h("img", { src: `data:image/png;base64,${img.b64_json}`, alt: `Image ${i + 1} for “${text}”` }), h("figcaption", {}, `#${i + 1}`)),
    ),
  );
  if (result.id) grid.append(ratingControls(result.id));
  const warned = result.warnings?.length ? ` ${result.warnings.join(" ")}` : "";
  document.getElementById("pg-status").textContent = `${result.data.length} images.${warned}`;
}
