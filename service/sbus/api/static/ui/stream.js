// The change stream, GET /watch (protocol.md, "change stream"), read with fetch rather
// than EventSource, which cannot send the Authorization header token mode needs.
// Resumes after a disconnect with Last-Event-ID; an `event: reset` (the cursor is too old
// to resume) starts again from now.

import { failure, headers, url } from "./api.js";

const RETRY_MS = [500, 1000, 2000, 5000, 10000];

// One text/event-stream parser: feed it chunks of text, it calls onEvent({event, data,
// id}) for each complete event and onComment(text) for each comment line.
export class EventParser {
  constructor(onEvent, onComment) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = "";
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
    this.id = null;
  }

  push(text) {
    this.buffer += text;
    let end;
    while ((end = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      // A CR that ends the chunk may be the first half of a CRLF: wait for the rest.
      if (end === this.buffer.length - 1 && this.buffer[end] === "\r") break;
      const line = this.buffer.slice(0, end);
      const width = this.buffer.startsWith("\r\n", end) ? 2 : 1;
      this.buffer = this.buffer.slice(end + width);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      // A block with only an id still moves the cursor (the bus ends a stream that way
      // at shutdown, so that the client resumes where it stopped).
      if (this.data.length || this.event || this.id !== null) {
        this.onEvent({ event: this.event || "message", data: this.data.join("\n"), id: this.id });
      }
      this.reset();
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1).trimStart());
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id") this.id = value;
  }
}

// Watches `prefix` until stop(). Callbacks: onChange(change) for each event's data,
// onReset(reason), onState(state, detail) with state one of "connecting", "live",
// "retrying" (detail: the 503's ApiError, or null after a dropped stream), "refused"
// (detail: the ApiError; no retry) and "stopped".
export class Watch {
  constructor({ prefix, conflicts, onChange, onReset, onState }) {
    this.prefix = prefix;
    this.conflicts = conflicts;
    this.onChange = onChange;
    this.onReset = onReset;
    this.onState = onState;
    this.cursor = null;
    this.controller = null;
    this.stopped = false;
    this.failures = 0;
    this.error = null; // the 503 that ended the last attempt, if it was one
  }

  start() {
    this.loop();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
    this.onState("stopped");
  }

  async loop() {
    while (!this.stopped) {
      let retry = true;
      try {
        retry = await this.once();
      } catch (error) {
        if (this.stopped) return;
        // A dropped connection: resume from the cursor.
      }
      if (this.stopped || !retry) return;
      const wait = RETRY_MS[Math.min(this.failures, RETRY_MS.length - 1)];
      this.failures++;
      this.onState("retrying", this.error);
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  // One connection; true when the stream should be resumed.
  async once() {
    this.controller = new AbortController();
    this.onState("connecting");
    // An empty prefix is sent as such: every key.
    const query = { prefix: this.prefix, include: this.conflicts ? "conflicts" : undefined };
    const extra = { Accept: "text/event-stream" };
    if (this.cursor) extra["Last-Event-ID"] = this.cursor;
    const response = await fetch(url("watch", query), {
      headers: headers(extra),
      signal: this.controller.signal,
      cache: "no-store",
    });
    if (!response.ok) {
      const error = await failure(response);
      // A bad request or a refusal does not get better by asking again; a store that is
      // not ready or busy (503) does.
      if (response.status !== 503) {
        this.onState("refused", error);
        return false;
      }
      this.error = error;
      return true;
    }
    this.error = null;
    const parser = new EventParser(
      (message) => this.message(message),
      (comment) => {
        if (comment.startsWith("subscribed")) {
          this.failures = 0;
          this.onState("live");
        }
      },
    );
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return true;
      parser.push(value);
    }
  }

  message({ event, data, id }) {
    if (event === "reset") {
      // The cursor was too old; the reset's id, where present, is the live edge.
      this.cursor = id || null;
      let reason = "";
      try {
        reason = JSON.parse(data).reason || "";
      } catch {
        // keep the empty reason
      }
      this.onReset(reason);
      return;
    }
    if (id) this.cursor = id;
    if (!data) return;
    let change;
    try {
      change = JSON.parse(data);
    } catch {
      return;
    }
    if (change && typeof change === "object") this.onChange(change);
  }
}
