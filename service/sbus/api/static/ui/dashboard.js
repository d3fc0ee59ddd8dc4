// The dashboard at /ui: what the agents are doing, from the change stream (GET /watch),
// the DeliveryLog dump (GET /admin/delivery-log) and the history (GET /history/{key}).
// Plain modules, no build step; everything is drawn with textContent, never as HTML,
// since keys, agents and contents are whatever the agents sent.

import { adminHeld, claims, get, storeToken, storedToken, tokenMode } from "./api.js";
import { Activity } from "./activity.js";
import { History } from "./history.js";
import { ReadSets } from "./readsets.js";
import { Watch } from "./stream.js";

const $ = (id) => document.getElementById(id);

function note(element, text) {
  element.textContent = text;
  element.hidden = !text;
}

function setStatus(state, text) {
  const pill = $("stream-status");
  pill.dataset.state = state;
  pill.textContent = text;
}

const ADMIN_OFF = tokenMode()
  ? "This token holds no admin right on ** (CapabilityDenied)"
  : "Admin is not enabled on this bus (AdminDisabled): start it with SBUS_ADMIN_ENABLED=1";

class Dashboard {
  constructor() {
    this.history = new History({
      form: $("history-form"),
      input: $("history-key"),
      versions: $("versions"),
      title: $("diff-title"),
      diff: $("diff"),
      note: (text) => note($("history-note"), text),
    });
    this.readSets = new ReadSets({
      body: document.querySelector("#readsets tbody"),
      note: (text) => note($("readsets-note"), text),
      onKey: (key) => this.history.show(key),
    });
    this.activity = new Activity({
      feed: document.querySelector("#feed tbody"),
      feedEmpty: $("feed-empty"),
      keys: document.querySelector("#keys tbody"),
      agents: document.querySelector("#agents tbody"),
      knownKeys: $("known-keys"),
      onKey: (key) => this.history.show(key),
    });
    this.watch = null;
  }

  start() {
    const admin = adminHeld();
    const token = tokenMode() ? claims(storedToken()) : null;
    $("who").textContent = token ? `agent ${token.sub ?? "?"}` : "open mode";
    $("sign-out").hidden = !tokenMode();
    $("prefix-form").hidden = false;
    // /ui?prefix=doc/ opens the page watching that prefix (a bookmark keeps it).
    $("prefix").value = new URLSearchParams(location.search).get("prefix") || "";
    $("prefix-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const address = new URL(location.href);
      const prefix = $("prefix").value.trim();
      if (prefix) address.searchParams.set("prefix", prefix);
      else address.searchParams.delete("prefix");
      history.replaceState(null, "", address);
      this.startWatch();
    });
    $("readsets-refresh").addEventListener("click", () => this.readSets.load());
    if (admin) {
      this.readSets.load();
      setInterval(() => this.readSets.load(), 10000);
    } else {
      this.readSets.disable(`${ADMIN_OFF}: read sets need the admin right.`);
    }
    this.listKeys();
    this.startWatch();
  }

  async listKeys() {
    try {
      const page = await get("shards", { limit: 500 });
      this.activity.know(page.shards);
    } catch (error) {
      note($("history-note"), `Keys could not be listed: ${error.message}`);
    }
  }

  startWatch() {
    if (this.watch) this.watch.stop();
    const admin = adminHeld();
    const quiet = admin ? "" : `${ADMIN_OFF}: conflicts are not shown, commits are.`;
    note($("stream-note"), quiet);
    const prefix = $("prefix").value.trim();
    this.watch = new Watch({
      prefix,
      conflicts: admin,
      onChange: (change) => {
        this.activity.add(change);
        if (change.op !== "conflict") {
          this.readSets.moved(change.key, change.version);
          this.history.moved(change.key);
        }
      },
      onReset: (reason) => {
        this.activity.marker(`stream restarted (${reason || "reset"}): changes in between are not shown`);
      },
      onState: (state, detail) => {
        switch (state) {
          case "live":
            setStatus("live", prefix ? `live: ${prefix}*` : "live");
            note($("stream-note"), quiet);
            break;
          case "connecting":
            setStatus("connecting", "connecting");
            break;
          case "retrying":
            setStatus("retrying", "reconnecting");
            // A stream the bus cannot serve yet (503) says why; a dropped one just resumes.
            if (detail) note($("stream-note"), `Change stream unavailable, retrying: ${detail.message}`);
            break;
          case "refused":
            setStatus("off", `stream refused: ${detail.code}`);
            note($("stream-note"), `The change stream was refused: ${detail.message}`);
            break;
          default:
            break;
        }
      },
    });
    this.watch.start();
  }
}

async function signIn(token) {
  storeToken(token);
  try {
    await get("stats");
    return "";
  } catch (error) {
    storeToken("");
    return error.code ? `${error.code}: ${error.detail || error.message}` : String(error);
  }
}

function boot() {
  $("sign-out").addEventListener("click", () => {
    storeToken("");
    location.reload();
  });
  if (tokenMode() && !storedToken()) {
    $("panels").hidden = true;
    $("token-panel").hidden = false;
    setStatus("off", "no token");
    $("token-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const refused = await signIn($("token").value.trim());
      if (refused) {
        $("token-error").textContent = refused;
        return;
      }
      $("token-panel").hidden = true;
      $("panels").hidden = false;
      new Dashboard().start();
    });
    return;
  }
  new Dashboard().start();
}

boot();
