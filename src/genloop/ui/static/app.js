// Sign-in and view routing (#playground, #runs, #models, #data, #monitoring).
import { ApiError, api, getKey, setKey } from "./api.js";
import { clearNotice, notify } from "./ui.js";

const VIEWS = {
  playground: () => import("./playground.js"),
  runs: () => import("./runs.js"),
  models: () => import("./models.js"),
  data: () => import("./data.js"),
  monitoring: () => import("./monitoring.js"),
};
const ADMIN_VIEWS = new Set(["runs", "models", "data", "monitoring"]);
let session = null; // {models, admin}

async function signIn(key) {
  const models = await api("/v1/models", { key });
  let admin = false;
  try {
    await api("/v1/admin/overview", { key });
    admin = true;
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 403) throw err;
  }
  setKey(key);
  session = { models: models.data, admin };
}

function showSignedIn(on) {
  document.getElementById("signin").hidden = on;
  document.getElementById("nav").hidden = !on;
  document.getElementById("signout").hidden = !on;
  for (const link of document.querySelectorAll("#nav a")) {
    link.parentElement.hidden = on && !session?.admin && ADMIN_VIEWS.has(link.dataset.view);
  }
  if (!on) for (const v of document.querySelectorAll(".view")) v.hidden = true;
}

async function route() {
  if (!session) return;
  let name = location.hash.slice(1) || "playground";
  if (!VIEWS[name] || (ADMIN_VIEWS.has(name) && !session.admin)) name = "playground";
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [view] of Object.entries(VIEWS)) {
    document.getElementById(`view-${view}`).hidden = view !== name;
  }
  const section = document.getElementById(`view-${name}`);
  const module = await VIEWS[name]();
  await module.render(section, session);
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
