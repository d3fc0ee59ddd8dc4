// The live panels: the feed of changes and conflicts, the keys (hottest first) and the
// agents, all counted from the change stream since the page opened.

import { clock, el, keyLink, row } from "./view.js";

const FEED_ROWS = 200;
const WINDOW_MS = 60000;
const TABLE_ROWS = 50;

export class Activity {
  constructor({ feed, feedEmpty, keys, agents, knownKeys, onKey }) {
    this.feed = feed;
    this.feedEmpty = feedEmpty;
    this.keysBody = keys;
    this.agentsBody = agents;
    this.knownKeys = knownKeys;
    this.onKey = onKey;
    this.keys = new Map(); // key -> {changes, conflicts, version, agent, recent: [ms]}
    this.agents = new Map(); // agent -> {changes, conflicts, lastKey}
    this.known = new Set();
    this.pending = false;
    setInterval(() => this.schedule(), 5000); // the last-minute counts decay
  }

  know(keys) {
    for (const key of keys) {
      if (this.known.has(key)) continue;
      this.known.add(key);
      const option = el("option", { text: key });
      option.value = key;
      this.knownKeys.append(option);
    }
  }

  add(change) {
    const now = Date.now();
    const conflict = change.op === "conflict";
    const key = String(change.key ?? "");
    const agent = String(change.agent_id ?? "");
    const k = this.keys.get(key) || { changes: 0, conflicts: 0, version: null, agent: "", recent: [] };
    k.recent.push(now);
    k.agent = agent;
    if (conflict) k.conflicts++;
    else {
      k.changes++;
      k.version = change.version;
    }
    this.keys.set(key, k);
    const a = this.agents.get(agent) || { changes: 0, conflicts: 0, lastKey: "" };
    if (conflict) a.conflicts++;
    else a.changes++;
    a.lastKey = key;
    this.agents.set(agent, a);
    if (!conflict) this.know([key]);
    this.prepend(this.feedRow(change, conflict));
    this.schedule();
  }

  feedRow(change, conflict) {
    const at = change.committed_at ? new Date(change.committed_at) : new Date();
    let detail;
    if (conflict) {
      const keys = Array.isArray(change.stale_keys)
        ? change.stale_keys.map((k) => (k && typeof k === "object" ? k.key : k)) : [];
      const stale = keys.length ? ` (stale: ${keys.join(", ")})` : "";
      detail = `${change.error ?? "refused"}${stale}`;
    } else {
      detail = change.commit_id ? `commit ${String(change.commit_id).slice(0, 12)}` : "";
    }
    const op = el("span", { text: change.op ?? "?", className: `op op-${change.op}` });
    const tr = row([clock(at), op, keyLink(String(change.key ?? ""), this.onKey),
      conflict ? "" : String(change.version ?? ""), String(change.agent_id ?? ""), detail]);
    tr.className = conflict ? "conflict" : "change";
    tr.dataset.key = String(change.key ?? "");
    return tr;
  }

  marker(text) {
    const tr = el("tr", { className: "marker" }, [el("td", { text })]);
    tr.firstChild.colSpan = 6;
    this.prepend(tr);
  }

  prepend(tr) {
    this.feed.prepend(tr);
    while (this.feed.rows.length > FEED_ROWS) this.feed.lastChild.remove();
    this.feedEmpty.hidden = true;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  render() {
    const since = Date.now() - WINDOW_MS;
    const keys = [...this.keys.entries()];
    for (const [, k] of keys) k.recent = k.recent.filter((t) => t >= since);
    keys.sort(([ka, a], [kb, b]) =>
      b.recent.length - a.recent.length || (b.changes + b.conflicts) - (a.changes + a.conflicts) || (ka < kb ? -1 : 1));
    this.keysBody.replaceChildren(...keys.slice(0, TABLE_ROWS).map(([key, k]) => {
      const tr = row([keyLink(key, this.onKey), k.recent.length, k.changes, k.conflicts, k.version ?? "", k.agent]);
      if (k.conflicts) tr.className = "has-conflicts";
      return tr;
    }));
    const agents = [...this.agents.entries()].sort(([na, a], [nb, b]) =>
      (b.changes + b.conflicts) - (a.changes + a.conflicts) || (na < nb ? -1 : 1));
    this.agentsBody.replaceChildren(...agents.slice(0, TABLE_ROWS).map(([agent, a]) => {
      const tr = row([agent || "(none)", a.changes, a.conflicts, a.lastKey]);
      if (a.conflicts) tr.className = "has-conflicts";
      return tr;
    }));
  }
}
