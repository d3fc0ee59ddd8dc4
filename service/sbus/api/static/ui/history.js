// A shard's retained history (GET /history/{key}, newest first) and the line diff of
// each version against the one before it.

import { get } from "./api.js";
import { diff } from "./diff.js";
import { el } from "./view.js";

const LIMIT = 100;

function keyPath(key) {
  return `history/${key.split("/").map(encodeURIComponent).join("/")}`;
}

export class History {
  constructor({ form, input, versions, title, diff: pre, note }) {
    this.input = input;
    this.versions = versions;
    this.title = title;
    this.pre = pre;
    this.note = note;
    this.key = null;
    this.entries = [];
    this.selected = 0;
    this.timer = null;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (key) this.show(key);
    });
  }

  async show(key, keepSelection = false) {
    this.input.value = key;
    const version = keepSelection && this.key === key ? this.entries[this.selected]?.version : null;
    this.key = key;
    try {
      const answer = await get(keyPath(key), { limit: LIMIT });
      if (this.key !== key) return; // another key was asked for meanwhile
      this.entries = answer.entries;
      this.note("");
    } catch (error) {
      if (this.key !== key) return;
      this.entries = [];
      this.note(`${key}: ${error.code}${error.detail ? ` (${error.detail})` : ""}`);
    }
    const kept = this.entries.findIndex((entry) => entry.version === version);
    this.select(kept >= 0 ? kept : 0);
  }

  // The shown key changed: reload its history shortly (changes come in bursts).
  moved(key) {
    if (key !== this.key) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.show(key, true), 300);
  }

  select(index) {
    this.selected = index;
    this.versions.replaceChildren(...this.entries.map((entry, i) => {
      const label = `v${entry.version}  ${entry.agent_id || "-"}  ${entry.committed_at}` +
        (entry.deleted ? "  deleted" : "") + (entry.rationale ? `  ${entry.rationale}` : "");
      const button = el("button", { text: label, className: i === index ? "selected" : "", data: { version: String(entry.version) } });
      button.type = "button";
      button.addEventListener("click", () => this.select(i));
      return el("li", {}, [button]);
    }));
    const entry = this.entries[index];
    if (!entry) {
      this.title.textContent = this.key ? `${this.key}: no version to show` : "Pick a key to see its versions.";
      this.pre.replaceChildren();
      return;
    }
    const before = this.entries[index + 1];
    this.title.textContent = before
      ? `${this.key}: v${before.version} → v${entry.version}`
      : `${this.key}: v${entry.version} (the oldest version retained)`;
    const lines = diff(before ? before.content : "", entry.content);
    if (lines === null) {
      this.pre.replaceChildren(el("span", { text: "Too large to compare here.", className: "muted" }));
      return;
    }
    this.pre.replaceChildren(...lines.map((line) =>
      el("span", { text: `${line.op} ${line.text}`, className: { "+": "add", "-": "del", " ": "same" }[line.op] })));
  }
}
