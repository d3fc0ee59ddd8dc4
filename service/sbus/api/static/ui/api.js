// Calls to the bus that served this page: same origin, URLs relative to the page (so a
// path prefix added by a proxy is kept), the token (token mode) as a bearer header.

const TOKEN_KEY = "sbus.token";

export function meta(name) {
  const tag = document.querySelector(`meta[name="sbus-${name}"]`);
  return tag ? tag.content : "";
}

export const tokenMode = () => meta("auth") === "token";

export function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function storeToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// What a token says about itself (its payload, unverified: the bus verifies it). Used
// only to avoid requests the bus would refuse, each of which a browser logs as an error.
export function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const value = JSON.parse(new TextDecoder().decode(bytes));
    return value && typeof value === "object" ? value : null;
  } catch {
    return null;
  }
}

// Whether the caller holds the admin right (protocol.md section 2.9), as far as the page
// can tell: open mode says so in the page, token mode in the token's scopes.
export function adminHeld() {
  const mode = meta("admin");
  if (mode !== "token") return mode === "on";
  const scopes = (claims(storedToken()) || {}).scopes;
  return Array.isArray(scopes) && scopes.some(
    (s) => s && s.pattern === "**" && Array.isArray(s.rights) && s.rights.includes("admin"));
}

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}${detail ? `: ${detail}` : ""}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

export function url(path, query) {
  const target = new URL(path, document.baseURI);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null) target.searchParams.set(name, value);
  }
  return target;
}

export function headers(extra) {
  const all = { ...(extra || {}) };
  const token = tokenMode() ? storedToken() : "";
  if (token) all.Authorization = `Bearer ${token}`;
  return all;
}

// A refused request as an ApiError carrying the problem document's `error` code.
export async function failure(response) {
  let code = `HTTP ${response.status}`;
  let detail = "";
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") code = body.error;
    if (body && typeof body.detail === "string") detail = body.detail;
  } catch {
    // not a problem document: the status says it all
  }
  return new ApiError(response.status, code, detail);
}

export async function call(method, path, { query, body, signal } = {}) {
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url(path, query), init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

export const get = (path, query) => call("GET", path, { query });
export const post = (path, body) => call("POST", path, { body });
