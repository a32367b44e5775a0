// The unmask playground: builds a GenerateRequest (the proto's JSON mapping), streams
// POST /v1/generate?stream=true (server-sent events: accepted, step..., block..., final) and
// draws the canvas as it denoises. MIDI: a piano roll, WebAudio playback, download.
"use strict";

const $ = (id) => document.getElementById(id);
const MASK_GLYPH = "\u2591";
let mode = "text";
let pieces = null; // token id -> text, from GET /v1/pieces
let controller = null; // aborts the running request
let run = null; // the state of the current (or last) run

// ---- small helpers ----------------------------------------------------------------------
const num = (id) => {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
};
const field = (obj, snake) => {
  // the JSON mapping writes lowerCamelCase; accept both
  if (obj == null) return undefined;
  if (snake in obj) return obj[snake];
  const camel = snake.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
  return obj[camel];
};
const b64ToBytes = (b64) => Uint8Array.from(atob(b64 || ""), (c) => c.charCodeAt(0));
const bytesToB64 = (bytes) => {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function pieceOf(id) {
  if (!pieces) return `#${id} `;
  const p = pieces[id];
  return p === undefined || p === null ? "\u00b7" : p;
}

// ---- modes -----------------------------------------------------------------------------
function setMode(next) {
  mode = next;
  for (const b of document.querySelectorAll("#modes button")) {
    b.classList.toggle("active", b.dataset.mode === mode);
  }
  for (const el of document.querySelectorAll("#controls [class^=mode-], #controls [class*=' mode-']")) {
    el.hidden = !el.className.split(/\s+/).includes(`mode-${mode}`);
  }
  if (mode === "code" && $("prompt").value.startsWith("It was")) $("prompt").value = "def parse(line):\n";
  if (mode === "text" && $("prompt").value.startsWith("def ")) $("prompt").value = "It was a fine morning, and";
  $("gen_length").value = mode === "midi" ? "128" : $("gen_length").value === "128" ? "64" : $("gen_length").value;
  $("gen_length").disabled = mode === "infill";
}

// '[MASK:n]' template -> proto segments; the server checks the rest
function segments(template) {
  const out = [];
  const re = /\[MASK:([^\]]*)\]/g;
  let pos = 0;
  let m;
  while ((m = re.exec(template)) !== null) {
    if (!/^\d+$/.test(m[1]) || Number(m[1]) < 1) {
      throw new Error(`${m[0]} is not a gap: write [MASK:n] with a whole number n >= 1`);
    }
    if (m.index > pos) out.push({ text: template.slice(pos, m.index) });
    out.push({ mask: Number(m[1]) });
    pos = m.index + m[0].length;
  }
  if (pos < template.length) out.push({ text: template.slice(pos) });
  if (!out.some((s) => "mask" in s)) throw new Error("the template has no [MASK:n] gap");
  return out;
}

function params() {
  const p = { seed: num("seed") ?? 0 };
  for (const k of ["steps", "block_length", "threshold", "temperature"]) {
    const v = num(k);
    if (v !== undefined) p[k] = v;
  }
  if (mode !== "infill") p.gen_length = num("gen_length") ?? 64;
  return p;
}

async function buildRequest() {
  const req = { params: params() };
  if (mode === "text" || mode === "code") {
    req.modality = mode === "text" ? "MODALITY_TEXT" : "MODALITY_CODE";
    req.prompt = $("prompt").value;
  } else if (mode === "infill") {
    req.modality = $("infill-code").checked ? "MODALITY_CODE" : "MODALITY_TEXT";
    req.infill = { segments: segments($("template").value) };
  } else {
    req.modality = "MODALITY_MIDI";
    const file = $("midi-file").files[0];
    const bars = $("rewrite-bars").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    if (file) {
      const midi = bytesToB64(new Uint8Array(await file.arrayBuffer()));
      if (bars.length) req.midi_infill = { midi, bars };
      else req.midi = midi;
    } else {
      const programs = $("programs").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
      req.midi_settings = {
        time_signature: $("timesig").value.trim(),
        tempo: num("tempo") ?? 120,
        programs,
        bars: num("bars") ?? 4,
      };
    }
  }
  return req;
}

// ---- the canvas ------------------------------------------------------------------------
function newRun(request) {
  return {
    request,
    t0: performance.now(),
    tokens: new Map(), // position -> {id, conf, state}
    snapshots: [], // one per step: [[pos, id, conf, state], ...]
    committed: 0,
    step: 0,
    minPos: Infinity, // the first generated position seen
    midiTokens: [], // MIDI token names of committed blocks, in order (live piano roll)
    final: null,
  };
}

function onStep(step) {
  const t = run.tokens;
  for (const pos of field(step, "remasked") || []) {
    const tok = t.get(pos);
    if (tok) tok.state = "remasked";
  }
  for (const k of field(step, "tentative") || []) {
    const pos = field(k, "position") ?? 0;
    const cur = t.get(pos);
    if (cur && cur.state === "committed") continue;
    t.set(pos, { id: field(k, "id") ?? 0, conf: field(k, "confidence") ?? 0, state: "tentative" });
  }
  for (const k of field(step, "committed") || []) {
    const pos = field(k, "position") ?? 0;
    if (!t.has(pos) || t.get(pos).state !== "committed") run.committed += 1;
    t.set(pos, { id: field(k, "id") ?? 0, conf: field(k, "confidence") ?? 0, state: "committed" });
  }
  for (const pos of t.keys()) run.minPos = Math.min(run.minPos, pos);
  run.step = (field(step, "step") ?? run.step) + 1;
  run.snapshots.push([...t.entries()].map(([p, v]) => [p, v.id, v.conf, v.state]));
  const slider = $("replay");
  slider.max = String(run.snapshots.length - 1);
  slider.value = slider.max;
  slider.disabled = false;
  draw(run.snapshots.length - 1);
}

function draw(index) {
  const box = $("canvas");
  const snap = run.snapshots[index] || [];
  const frag = document.createDocumentFragment();
  if (run.request.prompt) {
    const span = document.createElement("span");
    span.className = "tok prompt";
    span.textContent = run.request.prompt;
    frag.appendChild(span);
  }
  // text/code: the positions not reached yet are drawn masked (the canvas is gen_length long
  // from the first generated position); infill gaps are only known once they are touched
  const cells = [...snap];
  const length = run.request.params.gen_length;
  if (length && !run.request.infill && mode !== "midi" && Number.isFinite(run.minPos)) {
    const known = new Set(cells.map((c) => c[0]));
    for (let p = run.minPos; p < run.minPos + length; p++) if (!known.has(p)) cells.push([p, 0, 0, "masked"]);
  }
  for (const [, id, conf, state] of cells.sort((a, b) => a[0] - b[0])) {
    const span = document.createElement("span");
    span.className = `tok ${state}`;
    span.textContent = state === "remasked" || state === "masked" ? MASK_GLYPH : pieceOf(id) || " ";
    if (state === "tentative") span.style.background = `rgba(47, 93, 138, ${0.12 + 0.5 * conf})`;
    span.title = `id ${id}, confidence ${conf.toFixed(3)}`;
    frag.appendChild(span);
  }
  box.replaceChildren(frag);
  $("step").textContent = String(index + 1);
  $("replay-at").textContent = `${index + 1} / ${run.snapshots.length}`;
  $("committed").textContent = String(snap.filter((s) => s[3] === "committed").length);
  const secs = (performance.now() - run.t0) / 1000;
  if (!run.final) $("tps").textContent = secs > 0 ? (run.committed / secs).toFixed(1) : "0";
  if (mode === "midi") drawRoll(liveNotes());
}

// ---- MIDI: live notes from block tokens, the final file's notes, piano roll, playback ----
function liveNotes() {
  // MMM/REMI-like tokens: Bar_None, Position_p, Pitch_n, Duration_a.b.c (beats.ticks.res)
  const notes = [];
  let bar = -1;
  let lastPos = Infinity;
  let pos = 0;
  let pitch = null;
  for (const tok of run.midiTokens) {
    const [kind, value] = tok.split("_");
    if (kind === "Bar" || kind === "Track") { bar += 1; lastPos = -1; }
    else if (kind === "Position") {
      pos = Number(value);
      if (pos < lastPos) bar += 1;
      lastPos = pos;
    } else if (kind === "Pitch") pitch = Number(value);
    else if (kind === "Duration" && pitch !== null) {
      const [beats, ticks, res] = value.split(".").map(Number);
      const start = Math.max(bar, 0) * 4 + pos / 4;
      notes.push({ start, end: start + beats + (res ? ticks / res : 0), pitch });
      pitch = null;
    }
  }
  return notes; // in beats
}

function parseMidi(bytes) {
  // A standard MIDI file -> notes {start, end (seconds), pitch, track}; tempo changes applied.
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const str = (o) => String.fromCharCode(...bytes.subarray(o, o + 4));
  if (str(0) !== "MThd") throw new Error("not a MIDI file");
  const nTracks = dv.getUint16(10);
  const division = dv.getUint16(12);
  let off = 8 + dv.getUint32(4);
  const events = []; // {tick, kind, ...}
  for (let t = 0; t < nTracks && off < bytes.length; t++) {
    const len = dv.getUint32(off + 4);
    let p = off + 8;
    const end = p + len;
    let tick = 0;
    let status = 0;
    const vlq = () => {
      let v = 0;
      let b;
      do { b = bytes[p++]; v = (v << 7) | (b & 0x7f); } while (b & 0x80);
      return v;
    };
    while (p < end) {
      tick += vlq();
      let b = bytes[p];
      if (b & 0x80) { status = b; p++; }
      const type = status >> 4;
      if (status === 0xff) {
        const meta = bytes[p++];
        const mlen = vlq();
        if (meta === 0x51) events.push({ tick, kind: "tempo", us: (bytes[p] << 16) | (bytes[p + 1] << 8) | bytes[p + 2] });
        p += mlen;
      } else if (status === 0xf0 || status === 0xf7) {
        p += vlq();
      } else if (type === 0x9 || type === 0x8) {
        const pitch = bytes[p++];
        const vel = bytes[p++];
        events.push({ tick, kind: type === 0x9 && vel > 0 ? "on" : "off", pitch, track: t, ch: status & 15 });
      } else if (type === 0xc || type === 0xd) p += 1;
      else p += 2;
    }
    off = end;
  }
  events.sort((a, b) => a.tick - b.tick);
  let usPerBeat = 500000;
  let lastTick = 0;
  let seconds = 0;
  const open = new Map();
  const notes = [];
  for (const e of events) {
    seconds += ((e.tick - lastTick) / division) * (usPerBeat / 1e6);
    lastTick = e.tick;
    if (e.kind === "tempo") usPerBeat = e.us;
    else if (e.kind === "on") open.set(`${e.track}/${e.ch}/${e.pitch}`, { start: seconds, pitch: e.pitch, track: e.track });
    else {
      const key = `${e.track}/${e.ch}/${e.pitch}`;
      const n = open.get(key);
      if (n) { notes.push({ ...n, end: seconds }); open.delete(key); }
    }
  }
  return notes;
}

function drawRoll(notes) {
  const cv = $("roll");
  const ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (!notes.length) return;
  const lo = Math.min(...notes.map((n) => n.pitch)) - 2;
  const hi = Math.max(...notes.map((n) => n.pitch)) + 2;
  const span = Math.max(...notes.map((n) => n.end)) || 1;
  const h = cv.height / (hi - lo + 1);
  const colours = ["#2f5d8a", "#b5542d", "#4d8a3a", "#8a3a7c"];
  for (const n of notes) {
    ctx.fillStyle = colours[(n.track || 0) % colours.length];
    ctx.fillRect((n.start / span) * cv.width, cv.height - (n.pitch - lo + 1) * h,
      Math.max(2, ((n.end - n.start) / span) * cv.width - 1), Math.max(2, h - 1));
  }
}

let audio = null;
function play(notes) {
  audio = audio || new AudioContext();
  const t0 = audio.currentTime + 0.05;
  for (const n of notes) {
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.type = "triangle";
    osc.frequency.value = 440 * 2 ** ((n.pitch - 69) / 12);
    const start = t0 + n.start;
    const end = t0 + Math.max(n.end, n.start + 0.05);
    gain.gain.setValueAtTime(0, start);
    gain.gain.linearRampToValueAtTime(0.12, start + 0.01);
    gain.gain.setTargetAtTime(0, end - 0.03, 0.03);
    osc.connect(gain).connect(audio.destination);
    osc.start(start);
    osc.stop(end + 0.2);
  }
}

// ---- streaming ---------------------------------------------------------------------------
async function* sse(response) {
  // server-sent events from a POST response: yields [event name, parsed `data:` payload]
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const lines = chunk.split(/\r?\n/);
      const name = (lines.find((l) => l.startsWith("event:")) || "").slice(6).trim();
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield [name, JSON.parse(data)];
    }
  }
}

function eventKind(name, ev) {
  // the gateway names each event (`event: step`, data = that part of GenerateEvent)
  if (name) return [name, ev];
  if (typeof ev.type === "string") return [ev.type, ev];
  for (const k of ["accepted", "step", "block", "final", "error"]) if (k in ev) return [k, ev[k]];
  return [null, ev];
}

async function generate() {
  showError("");
  let request;
  try {
    request = await buildRequest();
  } catch (err) {
    showError(err.message);
    return;
  }
  run = newRun(request);
  $("canvas").replaceChildren();
  $("output").textContent = "";
  $("usage").textContent = "";
  $("midi-actions").hidden = true;
  $("roll").hidden = mode !== "midi";
  drawRoll([]);
  $("go").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "sending…";
  controller = new AbortController();
  try {
    const response = await fetch("v1/generate?stream=true", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const [name, ev] of sse(response)) {
      const [kind, body] = eventKind(name, ev);
      if (kind === "accepted") $("status").textContent = `job ${field(body, "job_id") || ""}`;
      else if (kind === "step") onStep(body);
      else if (kind === "block" && mode === "midi") {
        run.midiTokens.push(...String(field(body, "text") || "").split(/\s+/).filter(Boolean));
      } else if (kind === "final") finish(body.generation || body);
      else if (kind === "error") throw new Error(formatError(body));
    }
    if (!run.final) throw new Error("the stream ended without a result");
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
    $("status").textContent = err.name === "AbortError" ? "stopped" : "failed";
  } finally {
    $("go").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

function formatError(e) {
  const err = e.error || e;
  const where = err.param || err.field;
  const code = err.code || err.type || "";
  return `${code ? code + ": " : ""}${err.message || JSON.stringify(err)}${where && !(err.message || "").startsWith(where) ? ` (${where})` : ""}`;
}

async function errorText(response) {
  try {
    return formatError(await response.json());
  } catch {
    return `HTTP ${response.status}`;
  }
}

function finish(final) {
  run.final = final;
  const usage = field(final, "usage") || {};
  const secs = (performance.now() - run.t0) / 1000;
  const generated = field(usage, "generated_tokens") || run.committed;
  $("tps").textContent = (generated / Math.max(secs, 1e-3)).toFixed(1);
  $("usage").textContent = JSON.stringify({ usage, params: field(final, "params") || {} }, null, 2);
  $("status").textContent = `done in ${secs.toFixed(2)} s`;
  if (mode === "midi") {
    const bytes = b64ToBytes(field(final, "midi"));
    const notes = parseMidi(bytes);
    drawRoll(notes);
    $("output").textContent = `${bytes.length} bytes, ${notes.length} notes`;
    const link = $("download");
    if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([bytes], { type: "audio/midi" }));
    $("midi-actions").hidden = false;
    $("play").onclick = () => play(notes);
  } else {
    $("output").textContent = field(final, "text") || "";
  }
}

// ---- wiring ------------------------------------------------------------------------------
function maskSelection(event) {
  const area = $("template");
  if (!(event.ctrlKey && event.key.toLowerCase() === "m")) return;
  event.preventDefault();
  const { selectionStart: a, selectionEnd: b, value } = area;
  const n = Math.max(1, Math.round((b - a) / 4));
  area.value = `${value.slice(0, a)}[MASK:${n}]${value.slice(b)}`;
  area.selectionStart = area.selectionEnd = a + `[MASK:${n}]`.length;
}

async function init() {
  for (const b of document.querySelectorAll("#modes button")) b.onclick = () => setMode(b.dataset.mode);
  $("go").onclick = generate;
  $("stop").onclick = () => controller && controller.abort();
  $("replay").oninput = (e) => run && draw(Number(e.target.value));
  $("template").addEventListener("keydown", maskSelection);
  setMode("text");
  try {
    const r = await fetch("v1/pieces");
    if (r.ok) pieces = (await r.json()).pieces;
  } catch { /* the canvas shows ids */ }
  try {
    const r = await fetch("v1/models");
    if (r.ok) $("model").textContent = `model: ${((await r.json()).data || []).map((m) => m.id).join(", ")}`;
  } catch { /* not fatal */ }
}

init();
