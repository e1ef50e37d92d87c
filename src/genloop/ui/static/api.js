// The only way the UI talks to the server: the public HTTP API with a bearer key.
const KEY = "genloop.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status; // 0: no answer (connection lost)
    this.code = code;
  }
}

// One clear sentence per failure a user can meet; the server's own message follows.
function explain(status, serverMessage, retryAfter) {
  switch (status) {
    case 401:
      return "That API key was not accepted: it is wrong, expired or revoked.";
    case 403:
      return `This API key may not do that (${serverMessage || "missing scope"}).`;
    case 429:
      return `Too many requests: the server is busy. Try again${retryAfter ? ` in ${retryAfter} s` : " shortly"}.`;
    case 503:
      return `The server is busy or still loading its models: try again shortly. (${serverMessage || "unavailable"})`;
    default:
      return serverMessage || `The server answered ${status}.`;
  }
}

async function errorFrom(response) {
  let message = "";
  let code = null;
  try {
    const body = await response.json();
    message = body?.error?.message || "";
    code = body?.error?.code || null;
  } catch {
    /* not JSON: keep the status line */
  }
  const text = explain(response.status, message, response.headers.get("Retry-After"));
  return new ApiError(response.status, text, code);
}

function lostConnection(err) {
  if (err.name === "AbortError") return err;
  return new ApiError(0, "Lost the connection to the server: check that it is running and try again.");
}

async function send(path, { method = "GET", body, signal, key } = {}) {
  const headers = { Authorization: `Bearer ${key ?? getKey() ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    throw lostConnection(err);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function api(path, options = {}) {
  const response = await send(path, options);
  return response.json();
}

// POST a streaming request and call onEvent(obj) for each server-sent event until [DONE].
// Aborting `signal` cancels the request (the server sees the client go and stops).
export async function stream(path, body, { signal, onEvent }) {
  const response = await send(path, { method: "POST", body: { ...body, stream: true }, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        throw lostConnection(err);
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, parsed.error.message || "generation failed");
        onEvent(parsed);
      }
    }
  } finally {
    reader.releaseLock?.();
  }
}
