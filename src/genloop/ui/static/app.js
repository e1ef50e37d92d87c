// Sign-in and view routing (#playground, #runs, #models, #data, #monitoring, #label).
import { ApiError, api, getKey, setKey } from "./api.js";
import { clearNotice, h, notify } from "./ui.js";

const VIEWS = {
  playground: () => import("./playground.js"),
  runs: () => import("./runs.js"),
  models: () => import("./models.js"),
  data: () => import("./data.js"),
  monitoring: () => import("./monitoring.js"),
  label: () => import("./labeling.js"),
};
const ADMIN_VIEWS = new Set(["runs", "models", "data", "monitoring"]);
let session = null; // {models, generate, admin, label}

// The answer of a GET with this key, or null when the key lacks the scope (403).
async function allowed(path, key) {
  try {
    return await api(path, { key });
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 403) throw err;
    return null;
  }
}

async function signIn(key) {
  const models = await allowed("/v1/models", key); // a wrong key fails here (401)
  const admin = (await allowed("/v1/admin/overview", key)) !== null;
  const label = (await allowed("/v1/label/tasks", key)) !== null;
  if (models === null && !label) {
    throw new ApiError(403, "This API key may not use the web UI: it needs the generate, label or admin scope.");
  }
  setKey(key);
  session = { models: models?.data ?? [], generate: models !== null, admin, label };
}

// Whether this session's key may open a view (a label-only key: the Label view alone).
function may(view) {
  if (ADMIN_VIEWS.has(view)) return session.admin;
  if (view === "label") return session.label;
  return session.generate;
}

function showSignedIn(on) {
  document.getElementById("signin").hidden = on;
  document.getElementById("nav").hidden = !on;
  document.getElementById("signout").hidden = !on;
  for (const link of document.querySelectorAll("#nav a")) {
    link.parentElement.hidden = on && !may(link.dataset.view);
  }
  if (!on) for (const v of document.querySelectorAll(".view")) v.hidden = true;
}

async function route() {
  if (!session) return;
  const home = may("playground") ? "playground" : "label";
  let name = location.hash.slice(1) || home;
  if (!VIEWS[name] || !may(name)) name = home;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [view] of Object.entries(VIEWS)) {
    document.getElementById(`view-${view}`).hidden = view !== name;
  }
  const section = document.getElementById(`view-${name}`);
  try {
    const module = await VIEWS[name]();
    await module.render(section, session);
  } catch (err) {
    // never a blank page: what went wrong, and a way to try again
    const title = document.querySelector(`#nav a[data-view=${name}]`)?.textContent ?? name;
    const retry = h("button", { type: "button", class: "secondary retry" }, "Retry");
    retry.addEventListener("click", () => route().catch((e) => notify(e.message)));
    section.replaceChildren(
      h("h2", { id: section.getAttribute("aria-labelledby") }, title),
      h("div", { class: "failed" }, h("p", { class: "error", role: "alert" }, `This view could not be loaded: ${err.message || err}`), retry),
    );
  }
}

async function start() {
  const form = document.getElementById("signin-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      await signIn(input.value.trim());
      input.value = "";
      clearNotice();
      showSignedIn(true);
      await route();
      document.getElementById("main").focus();
    } catch (err) {
      notify(err.message);
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  document.getElementById("signout").addEventListener("click", () => {
    setKey(null);
    session = null;
    showSignedIn(false);
    document.getElementById("api-key").focus();
  });
  window.addEventListener("hashchange", () => route().catch((err) => notify(err.message)));
  window.addEventListener("offline", () => notify("You are offline: the connection to the server is lost."));
  window.addEventListener("online", () => notify("Back online.", "info"));

  const saved = getKey();
  if (saved) {
    try {
      await signIn(saved);
      showSignedIn(true);
      await route();
      return;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setKey(null);
      notify(err.message);
    }
  }
  showSignedIn(false);
}

start();
