// Each agent session's read set (GET /admin/delivery-log), each entry compared with the
// shard's current version (POST /read with record: false, which widens no one's read
// set), kept current by the change stream.

import { get, post } from "./api.js";
import { el, keyLink, row } from "./view.js";

const PAGES = 20; // of up to 1000 agents each
const READ_BATCH = 256; // SBUS_MAX_READ_KEYS' default

export class ReadSets {
  constructor({ body, note, onKey }) {
    this.body = body;
    this.note = note;
    this.onKey = onKey;
    this.sessions = null; // agent -> session -> key -> {version}
    this.current = new Map(); // key -> {version, state: "live" | "deleted" | "gone"}
    this.enabled = true;
    this.loading = false;
    this.timer = null;
  }

  disable(text) {
    this.enabled = false;
    this.note(text);
    this.body.replaceChildren();
  }

  async load() {
    if (!this.enabled || this.loading) return;
    this.loading = true;
    try {
      const sessions = {};
      let after = null;
      for (let page = 0; page < PAGES; page++) {
        const dump = await get("admin/delivery-log", { limit: 1000, after });
        Object.assign(sessions, dump.sessions);
        after = dump.next_after;
        if (after === null || after === undefined) break;
      }
      const keys = new Set();
      for (const bySession of Object.values(sessions)) {
        for (const entries of Object.values(bySession)) {
          for (const key of Object.keys(entries)) keys.add(key);
        }
      }
      this.sessions = sessions;
      this.note(await this.fetchCurrent([...keys]));
      this.render();
    } catch (error) {
      if (error.status === 403) this.disable(`Read sets are not available: ${error.code}: ${error.detail}`);
      else this.note(`Read sets could not be loaded: ${error.message}`);
    } finally {
      this.loading = false;
    }
  }

  // The current version of each key; a note when some could not be read.
  async fetchCurrent(keys) {
    this.current = new Map();
    for (let start = 0; start < keys.length; start += READ_BATCH) {
      const batch = keys.slice(start, start + READ_BATCH);
      try {
        const answer = await post("read", { keys: batch, record: false });
        for (const shard of answer.shards) this.current.set(shard.key, { version: shard.version, state: "live" });
        for (const gone of answer.missing) {
          const deleted = gone.error === "ShardDeleted";
          this.current.set(gone.key, { version: deleted ? gone.version : null, state: deleted ? "deleted" : "gone" });
        }
      } catch (error) {
        return `Current versions unknown: ${error.code ?? error.message}`;
      }
    }
    return "";
  }

  // A change seen on the stream: the key's current version moved.
  moved(key, version) {
    if (!this.sessions) return;
    this.current.set(key, { version, state: "live" });
    this.render();
    // The commit also replaced its author's read set: reload shortly.
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.load(), 1000);
  }

  render() {
    const rows = [];
    for (const agent of Object.keys(this.sessions || {}).sort()) {
      const bySession = this.sessions[agent];
      for (const session of Object.keys(bySession).sort()) {
        const entries = bySession[session];
        for (const key of Object.keys(entries).sort()) {
          const read = entries[key].version;
          const now = this.current.get(key);
          let status = "";
          let current = "?";
          if (now) {
            current = now.version === null ? "gone" : String(now.version);
            if (now.state === "gone") status = "gone";
            else if (now.version !== read) status = now.state === "deleted" ? "deleted" : "stale";
          }
          const tag = status ? el("span", { text: status, className: "stale-tag" }) : "current";
          const tr = row([agent, session === "" ? "(default)" : session, keyLink(key, this.onKey), read, current, tag]);
          tr.className = status ? "stale" : "fresh";
          tr.dataset.key = key;
          rows.push(tr);
        }
      }
    }
    if (!rows.length) rows.push(el("tr", { className: "empty" }, [el("td", { text: "No agent holds a read set." })]));
    if (rows.length === 1 && rows[0].className === "empty") rows[0].firstChild.colSpan = 6;
    this.body.replaceChildren(...rows);
  }
}
