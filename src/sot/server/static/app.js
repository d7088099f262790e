// The race page's logic: ask /v1/sot/stream twice at once (mode "normal" and mode "sot") and render each stream
// of engine events (sot.events) in its pane. No framework and no build step; it only reads events, it never
// decides anything about the answer itself.
"use strict";

const EXAMPLES = [
  "What are some tips for staying healthy?",
  "How can I improve my time management?",
  "What should I consider when buying a used car?",
  "How do I prepare for a job interview?",
];

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};
const seconds = (s) => (s < 10 ? s.toFixed(2) : s.toFixed(1)) + " s";

let apiKey = localStorage.getItem("sot-api-key") || "";
let controller = null;

// -- server-sent events over fetch (EventSource cannot POST) ---------------------------------------------

async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // keep-alive comments
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") type = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) yield { type, data: data.join("\n") };
    }
  }
}

// -- one pane ----------------------------------------------------------------------------------------------

class Pane {
  constructor(root) {
    this.root = root;
    this.mode = root.dataset.mode;
    this.reset();
  }

  part(role) {
    return $(`[data-role="${role}"]`, this.root);
  }

  reset() {
    this.t0 = 0;
    this.wall = null; // seconds from the click to the final event, as the reader experienced it
    this.result = null;
    this.points = [];
    this.spans = [];
    this.answerText = "";
    this.fellBack = false;
    this.setState("idle");
    this.part("elapsed").textContent = "0.0 s";
    this.part("placeholder").hidden = false;
    this.part("notes").replaceChildren();
    this.part("answer").textContent = "";
    this.part("foot").replaceChildren();
    const skeleton = this.part("skeleton");
    if (skeleton) {
      skeleton.hidden = true;
      skeleton.classList.remove("collapsed");
      this.part("skeleton-text").textContent = "";
      this.part("skeleton-time").textContent = "";
      this.part("points").replaceChildren();
      this.part("timeline").hidden = true;
      this.part("timeline").replaceChildren();
    }
  }

  setState(state) {
    this.state = state;
    this.root.dataset.state = state;
  }

  now() {
    return (performance.now() - this.t0) / 1000;
  }

  start(t0) {
    this.t0 = t0;
    this.setState("running");
  }

  tick() {
    if (this.state !== "running") return;
    this.part("elapsed").textContent = seconds(this.now());
    this.drawTimeline(this.now());
  }

  note(text, kind = "") {
    this.part("notes").append(el("p", `note ${kind}`.trim(), text));
  }

  fail(message) {
    if (this.state !== "running") return;
    this.wall = this.now();
    this.part("elapsed").textContent = seconds(this.wall);
    this.setState("error");
    this.part("placeholder").hidden = true;
    this.note(message, "error");
  }

  apply(event) {
    this.part("placeholder").hidden = true;
    switch (event.type) {
      case "route_decided":
        this.note(`Router (${event.router}) chose ${event.mode}: ${event.reason}`, "info");
        break;
      case "skeleton_delta": {
        const skeleton = this.part("skeleton");
        if (skeleton.hidden) {
          skeleton.hidden = false;
          this.spans = [{ label: "skeleton", start: this.now(), end: null, skeleton: true }];
          this.part("timeline").hidden = false;
        }
        this.part("skeleton-text").textContent += event.text;
        break;
      }
      case "skeleton_done":
        this.onSkeleton(event);
        break;
      case "point_started": {
        const point = this.points[event.index - 1];
        point.raw = "";
        point.text.textContent = "";
        point.node.dataset.state = "running";
        point.meta.textContent = event.attempt > 1 ? `retry ${event.attempt}` : "";
        point.span.start = point.span.start ?? this.now();
        point.span.end = null;
        break;
      }
      case "point_delta": {
        const point = this.points[event.index - 1];
        point.raw += event.text;
        point.text.textContent = point.raw; // the server sends clean text: shown as sent
        break;
      }
      case "point_done": {
        const point = this.points[event.index - 1];
        point.text.textContent = event.text || point.text.textContent;
        point.node.dataset.state = event.error ? "error" : event.truncated ? "truncated" : "done";
        point.meta.textContent = event.error ? "failed" : `${event.tokens} tok · ${seconds(event.seconds)}`;
        point.span.end = this.now();
        break;
      }
      case "fallback":
        this.fellBack = true;
        this.note(`SoT fell back to normal decoding: ${event.reason}`);
        if (this.part("points")) this.part("points").hidden = true;
        this.part("answer").textContent = this.answerText; // what the points had sent, continued below
        break;
      case "answer_delta": {
        // Follow the text as it grows, unless the reader scrolled up to read.
        const body = this.root.querySelector(".pane-body");
        const following = body.scrollHeight - body.scrollTop - body.clientHeight < 48;
        this.answerText += event.text;
        // While SoT runs, its points are the view (the answer in order arrives alongside); after a fallback
        // the answer text, which continues what the points had sent, is.
        if (this.points.length && !this.fellBack) break;
        this.part("answer").textContent = this.answerText;
        if (following) body.scrollTop = body.scrollHeight;
        break;
      }
      case "done":
        this.onDone(event.result);
        break;
      case "error":
        this.fail(`${event.kind}: ${event.error}`);
        break;
    }
  }

  onSkeleton(event) {
    const skeleton = this.part("skeleton");
    skeleton.classList.add("collapsed");
    this.part("skeleton-time").textContent = `· ${seconds(event.seconds)} · ${event.points.length} points`;
    if (this.spans.length) this.spans[0].end = this.now();
    const list = this.part("points");
    list.hidden = false;
    this.points = event.points.map((title, i) => {
      const node = el("li", "point");
      node.dataset.state = "waiting";
      node.dataset.index = String(i + 1);
      const head = el("div", "point-title");
      const meta = el("span", "point-meta");
      head.append(el("span", "point-name", title), meta);
      const text = el("div", "point-text");
      node.append(el("span", "point-num", String(i + 1)), head, text);
      list.append(node);
      const span = { label: `point ${i + 1}`, start: null, end: null };
      this.spans.push(span);
      return { title, node, meta, text, raw: "", span };
    });
  }

  onDone(result) {
    this.result = result;
    this.wall = this.now();
    this.part("elapsed").textContent = seconds(this.wall);
    const s = result.stats;
    if (result.mode_used === "sot" && s.points.length) {
      // The server's own clock for the timeline: when each request really started and ended.
      this.spans = [{ label: "skeleton", start: 0, end: s.skeleton_seconds, skeleton: true }].concat(
        s.points.map((p) => ({ label: `point ${p.index}`, start: p.start, end: p.start + p.seconds })),
      );
      this.drawTimeline(s.total_seconds);
    }
    if (!result.complete) this.note("Cut by the token limit: this answer is incomplete.");
    const foot = this.part("foot");
    const item = (label, value, className = "") => {
      const span = el("span", className);
      span.append(`${label} `, el("b", "", value));
      foot.append(span);
    };
    item("mode", result.mode_used + (result.mode_requested !== result.mode_used ? ` (asked ${result.mode_requested})` : ""));
    if (result.points.length) item("points", String(result.points.length));
    if (s.time_to_first_token != null) item("first token", seconds(s.time_to_first_token));
    if (s.skeleton_seconds != null && result.mode_used === "sot") item("skeleton", seconds(s.skeleton_seconds));
    item("tokens", String(s.completion_tokens));
    item("requests", String(s.requests));
    item("server time", seconds(s.total_seconds));
    if (!result.complete) item("finish", "length (cut)", "warn");
    this.setState("done");
  }

  drawTimeline(total) {
    const box = this.part("timeline");
    if (!box || box.hidden || !this.spans.length) return;
    const scale = Math.max(total, 0.001);
    const rows = this.spans.map((span) => {
      const row = el("div", "tl-row" + (span.skeleton ? " skeleton-row" : ""));
      const track = el("div", "tl-track");
      if (span.start != null) {
        const end = span.end ?? total;
        const bar = el("div", "tl-bar");
        bar.style.left = `${(100 * span.start) / scale}%`;
        bar.style.width = `${(100 * Math.max(end - span.start, 0)) / scale}%`;
        track.append(bar);
      }
      row.append(el("span", "", span.label), track);
      return row;
    });
    box.replaceChildren(...rows);
  }
}

// -- the race ----------------------------------------------------------------------------------------------

const panes = {
  normal: new Pane($("#pane-normal")),
  sot: new Pane($("#pane-sot")),
};

function headers() {
  const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function runPane(pane, question, signal) {
  try {
    const response = await fetch("/v1/sot/stream", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ question, mode: pane.mode }),
      signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      const message = body?.error?.message || `HTTP ${response.status}`;
      if (response.status === 401) $("#key-row").hidden = false;
      const wait = response.headers.get("Retry-After");
      pane.fail(wait ? `${message} (retry after ${wait} s)` : message);
      return;
    }
    for await (const message of sseEvents(response)) {
      pane.apply(JSON.parse(message.data));
    }
    if (pane.state === "running") pane.fail("The stream ended before the answer was complete.");
  } catch (error) {
    pane.fail(error.name === "AbortError" ? "Stopped." : `Connection failed: ${error.message}`);
  }
}

function showVerdict() {
  const box = $("#verdict");
  const { normal, sot } = panes;
  if (normal.state !== "done" || sot.state !== "done") {
    box.hidden = true;
    return;
  }
  const ratio = normal.wall / sot.wall;
  const faster = ratio >= 1;
  const big = el("span", "big" + (faster ? "" : " slower"), faster ? `${ratio.toFixed(2)}× faster` : `${(1 / ratio).toFixed(2)}× slower`);
  const parts = [`SoT ${seconds(sot.wall)}`, `normal ${seconds(normal.wall)}`];
  const r = sot.result;
  if (r.mode_used === "sot") parts.push(`${r.points.length} points expanded in parallel after a ${seconds(r.stats.skeleton_seconds)} skeleton`);
  else if (r.fallback_reason) parts.push(`SoT fell back to normal decoding`);
  box.replaceChildren(el("span", "", "Skeleton-of-Thought finished"), big, el("span", "detail", parts.join(" · ")));
  box.dataset.speedup = ratio.toFixed(3);
  box.hidden = false;
}

async function race(question) {
  if (controller) controller.abort();
  controller = new AbortController();
  const { signal } = controller;
  $("#verdict").hidden = true;
  $("#go").disabled = true;
  $("#stop").hidden = false;
  const t0 = performance.now();
  for (const pane of Object.values(panes)) {
    pane.reset();
    pane.start(t0);
  }
  const timer = setInterval(() => Object.values(panes).forEach((p) => p.tick()), 50);
  await Promise.allSettled(Object.values(panes).map((pane) => runPane(pane, question, signal)));
  clearInterval(timer);
  if (controller?.signal === signal) {
    controller = null;
    $("#go").disabled = false;
    $("#stop").hidden = true;
    showVerdict();
  }
}

// -- wiring ------------------------------------------------------------------------------------------------

async function loadServerInfo() {
  try {
    const info = await (await fetch("/health")).json();
    const chip = (id, label, value) => {
      const node = $(id);
      node.replaceChildren(`${label} `, el("b", "", value));
    };
    chip("#server-backend", "backend", info.backend);
    chip("#server-model", "model", info.model);
    if (info.auth && !apiKey) $("#key-row").hidden = false;
  } catch {
    $("#server-backend").textContent = "server unreachable";
  }
}

function init() {
  const question = $("#question");
  for (const text of EXAMPLES) {
    const button = el("button", "", text);
    button.type = "button";
    button.addEventListener("click", () => {
      question.value = text;
      question.focus();
    });
    $("#examples").append(button);
  }
  $("#ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (text) race(text);
  });
  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("#ask").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", () => controller?.abort());
  const key = $("#api-key");
  key.value = apiKey;
  key.addEventListener("change", () => {
    apiKey = key.value.trim();
    localStorage.setItem("sot-api-key", apiKey);
  });
  loadServerInfo();
}

init();
