/* magistream playground: one session over the realtime WebSocket API (docs/realtime.md),
 * played live through Media Source Extensions. No build step, no dependencies.
 *
 * Element ids (tests/server/test_playground.py relies on them):
 *   #prompt #mode #image #chunks #seed #token   the request (#chunks 0 = until stopped)
 *   #start #stop #send-prompt                   start; send {"cancel": {}}; push #prompt's text
 *   #status     text and data-status: idle, connecting, queued, running, finished,
 *               cancelled, failed
 *   #error      why the server refused or the session failed ("INVALID_ARGUMENT: ..."), or a
 *               close code in words; hidden when there is nothing to say
 *   #video      the live <video>
 *   #timeline   one .chunk cell per chunk with data-index and data-version (the prompt version
 *               that steered it; "" and class .pending until it arrives, .playing while shown)
 *   #timeline-entries  the prompt timeline: li[data-version][data-from-chunk], text = prompt
 *   #next-prompt  where the last pushed prompt lands ("v2 lands at chunk 3"), or why refused
 *   #session #ttfc #period   the session id, time to first chunk, chunk period vs real time
 *   #download   <a download="magistream-<session id>.mp4">: init + every media segment, in
 *               order; shown once the session has ended
 * window.playground is the state object below (status, sessionId, chunksReceived, lastAck,
 * chunks, timeline, ...), for tests and the console.
 */
"use strict";

const GRPC_CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

// Standard close codes a person may meet here, in words (RFC 6455 section 7.4.1).
const CLOSE_WORDS = {
  1000: "the connection closed normally",
  1001: "the server is going away",
  1002: "protocol error",
  1003: "the server cannot accept this kind of data",
  1005: "the connection closed without a status",
  1006: "connection lost, or the server could not be reached (check the address and token)",
  1007: "the server received malformed data",
  1008: "the server refused the connection (policy)",
  1009: "a message was too big",
  1011: "the server hit an internal error",
  1012: "the server is restarting",
  1013: "the server is overloaded; try again later",
  1015: "the TLS handshake failed",
};

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("controls"), prompt: $("prompt"), mode: $("mode"), image: $("image"),
  imageLabel: $("image-label"), chunks: $("chunks"), seed: $("seed"), token: $("token"),
  start: $("start"), stop: $("stop"), sendPrompt: $("send-prompt"), status: $("status"),
  error: $("error"), video: $("video"), timeline: $("timeline"),
  entries: $("timeline-entries"), nextPrompt: $("next-prompt"), session: $("session"),
  ttfc: $("ttfc"), period: $("period"), download: $("download"),
};

// Everything about the current session; replaced by freshState() on each start.
function freshState() {
  return {
    status: "idle",
    sessionId: "",
    params: null,
    chunksReceived: 0,
    chunks: [], // by index: {index, version, text, firstFrame, frameCount, fps, arrivedMs}
    timeline: [], // every accepted entry, in version order: {version, fromChunk, text}
    lastAck: null, // the last promptAck, with the text that was sent
    sentPrompts: [], // texts awaiting their ack (acks come in the order sent)
    expected: [], // binary messages announced by chunk events: "init" / "media"
    initSegment: null,
    mediaSegments: [],
    startedMs: 0,
    ttfcMs: null,
    periodS: null,
    error: "",
    finished: null,
    stopping: false,
    ended: false,
    downloadUrl: "",
  };
}

let state = freshState();
let ws = null;
const media = {source: null, buffer: null, mime: "", queue: [], playing: false, eos: false};
window.playground = state;

// ---- the request -----------------------------------------------------------------------------

async function buildRequest() {
  const text = ui.prompt.value.trim();
  if (!text) throw new Error("write a prompt first");
  const chunks = ui.chunks.value.trim();
  if (!/^\d+$/.test(chunks)) throw new Error(`chunks must be a whole number, got "${chunks}"`);
  const numChunks = Number(chunks);
  const i2v = ui.mode.value === "i2v";
  const request = {
    mode: i2v ? "GENERATION_MODE_I2V" : "GENERATION_MODE_T2V",
    timeline: [{fromChunk: 0, text}],
    numChunks,
  };
  if (numChunks === 0) request.unbounded = true; // until Stop; the server says if it allows it
  const seed = ui.seed.value.trim();
  if (seed && !(/^\d+$/.test(seed) && BigInt(seed) < 2n ** 64n)) {
    throw new Error(`seed must be a whole number below 2^64, or empty; got "${seed}"`);
  }
  if (seed) request.seed = seed; // uint64: a string in protobuf JSON
  if (i2v) {
    const file = ui.image.files[0];
    if (!file) throw new Error("i2v needs a start image: pick a PNG or JPEG");
    request.image = bytesToBase64(new Uint8Array(await file.arrayBuffer()));
  }
  return request;
}

function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// The token rides in a subprotocol because a browser cannot set headers on a WebSocket.
function bearerProtocol(token) {
  const b64 = bytesToBase64(new TextEncoder().encode(token));
  return "magistream.bearer." + b64.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// ---- the connection --------------------------------------------------------------------------

async function start() {
  let request;
  try {
    request = await buildRequest();
  } catch (e) {
    state.error = ""; // a new complaint about the form replaces the last one
    showError(`check the form: ${e.message}`);
    return;
  }
  reset();
  state.startedMs = performance.now();
  setStatus("connecting");
  openMedia();

  const url = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host +
    "/v1/realtime";
  const protocols = ["magistream.v1"];
  const token = ui.token.value.trim();
  if (token) protocols.push(bearerProtocol(token));
  const socket = new WebSocket(url, protocols);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => socket.send(JSON.stringify({start: request}));
  socket.onmessage = (event) => { if (ws === socket) onMessage(event.data); };
  socket.onclose = (event) => { if (ws === socket) onClose(event); };
  ws = socket;
  setButtons();
}

function stop() {
  state.stopping = true;
  if (ws && ws.readyState === WebSocket.OPEN && state.sessionId) {
    ws.send(JSON.stringify({cancel: {}})); // `finished` (CANCELLED) and close 1000 follow
  } else if (ws) {
    ws.close(1000); // not started yet: closing cancels
  }
}

function sendPrompt() {
  const text = ui.prompt.value.trim();
  if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({prompt: {text}}));
  state.sentPrompts.push(text);
  setNextPrompt("prompt sent, waiting for the server's answer", "waiting");
}

function onMessage(data) {
  if (typeof data !== "string") {
    onBinary(new Uint8Array(data));
    return;
  }
  let message;
  try {
    message = JSON.parse(data);
  } catch (e) {
    showError("the server sent a text message that is not JSON: " + data.slice(0, 200));
    return;
  }
  if (message.started) onStarted(message.started);
  else if (message.chunk) onChunk(message.chunk);
  else if (message.promptAck) onAck(message.promptAck);
  else if (message.finished) onFinished(message.finished);
  else if (message.error) onError(message.error);
  // `frame` (RAW_RGB24) is never asked for here.
}

function onStarted(started) {
  state.sessionId = started.sessionId;
  state.params = started.params;
  state.timeline = (started.params.timeline || []).map((e) => ({
    version: e.version, fromChunk: e.fromChunk, text: e.text,
  }));
  ui.session.textContent = started.sessionId;
  if (started.params.widthPx && started.params.heightPx) {
    ui.video.style.aspectRatio = `${started.params.widthPx} / ${started.params.heightPx}`;
  }
  for (let i = 0; i < started.params.numChunks; i++) cell(i);
  drawTimeline();
  if (started.queuePosition > 0) setStatus("queued", `queued, position ${started.queuePosition}`);
  else setStatus("running");
}

function onChunk(chunk) {
  const now = performance.now();
  const index = chunk.chunkIndex;
  state.chunks[index] = {
    index,
    version: chunk.promptVersion,
    text: chunk.promptText,
    firstFrame: Number(chunk.firstFrameIndex),
    frameCount: chunk.frameCount,
    fps: chunk.fps,
    arrivedMs: now,
  };
  state.chunksReceived += 1;
  if (chunk.initSegmentSize > 0) state.expected.push({kind: "init", size: chunk.initSegmentSize});
  if (chunk.mediaSegmentSize > 0) {
    state.expected.push({kind: "media", size: chunk.mediaSegmentSize});
  }
  if (state.status !== "running") setStatus("running");
  drawTimeline();
  drawTimings(chunk);
  const ack = state.lastAck;
  if (ack && ack.promptVersion > 0 && chunk.promptVersion === ack.promptVersion &&
      index >= ack.fromChunk) {
    setNextPrompt(`prompt v${ack.promptVersion} landed at chunk ${ack.fromChunk}`, "landed");
  }
}

function onBinary(bytes) {
  const next = state.expected.shift();
  if (!next) {
    showError(`the server sent ${bytes.length} bytes of media no chunk event announced`);
    return;
  }
  if (bytes.length !== next.size) {
    showError(`the ${next.kind} segment has ${bytes.length} bytes, the chunk said ${next.size}`);
  }
  if (next.kind === "init") {
    state.initSegment = bytes;
    try {
      media.mime = `video/mp4; codecs="${codecFromInit(bytes)}"`;
    } catch (e) {
      showError(e.message);
      return;
    }
  } else {
    state.mediaSegments.push(bytes);
  }
  media.queue.push(bytes);
  pump();
}

function onAck(ack) {
  const text = state.sentPrompts.shift() || "";
  state.lastAck = {...ack, text};
  if (ack.promptVersion > 0) {
    state.timeline.push({version: ack.promptVersion, fromChunk: ack.fromChunk, text});
    setNextPrompt(`next prompt (v${ack.promptVersion}) lands at chunk ${ack.fromChunk}`,
      "accepted");
    drawTimeline();
  } else {
    setNextPrompt(`prompt refused: ${ack.rejection || "no reason given"}`, "refused");
  }
}

function onFinished(finished) {
  state.finished = finished;
  const stats = finished.stats || {};
  if (finished.state === "SESSION_STATE_FINISHED") {
    setStatus("finished", `finished: ${stats.chunksDone} chunks, ${stats.framesDone} frames`);
  } else if (finished.state === "SESSION_STATE_CANCELLED") {
    setStatus("cancelled", `cancelled after ${stats.chunksDone} chunks`);
  } else {
    setStatus("failed");
    const code = GRPC_CODES[finished.statusCode] || `status ${finished.statusCode}`;
    showError(`the session failed: ${code}: ${finished.statusMessage || "no message"}`);
  }
  endSession();
}

function onError(error) {
  let text = `${error.code}: ${error.message}`;
  if (Number(error.retryAfterMs) > 0) {
    text += ` (retry in ${(Number(error.retryAfterMs) / 1000).toFixed(1)} s)`;
  }
  showError(text);
  setStatus("failed");
}

function onClose(event) {
  ws = null;
  if (!state.finished) {
    if (state.stopping && (event.code === 1000 || event.code === 1005)) {
      setStatus("cancelled");
    } else if (!state.error) {
      showError(closeInWords(event));
      setStatus("failed");
    } else {
      setStatus("failed");
    }
  }
  endSession();
}

function closeInWords(event) {
  const code = event.code;
  let words = CLOSE_WORDS[code];
  if (!words && code >= 4000 && code < 4000 + GRPC_CODES.length) words = GRPC_CODES[code - 4000];
  words = words || "the connection closed";
  const reason = event.reason ? `: ${event.reason}` : "";
  return `${words}${reason} (close code ${code})`;
}

function endSession() {
  state.ended = true;
  state.sentPrompts = [];
  setButtons();
  pump(); // endOfStream once the queued segments are in
  makeDownload();
}

// ---- Media Source Extensions -----------------------------------------------------------------

function openMedia() {
  const source = new MediaSource();
  media.source = source;
  ui.video.src = URL.createObjectURL(source);
  source.addEventListener("sourceopen", () => {
    URL.revokeObjectURL(ui.video.src);
    pump();
  }, {once: true});
}

// Appends one queued segment at a time (a SourceBuffer takes one while not `updating`);
// `updateend` calls it again. Ends the stream once the session has ended and all is in.
function pump() {
  const source = media.source;
  if (!source || source.readyState !== "open") return;
  if (!media.buffer) {
    if (!media.mime) return; // no init segment yet
    if (!MediaSource.isTypeSupported(media.mime)) {
      showError(`this browser cannot play ${media.mime}`);
      return;
    }
    media.buffer = source.addSourceBuffer(media.mime);
    media.buffer.addEventListener("updateend", onUpdateEnd);
    media.buffer.addEventListener("error", () => showError("the browser could not decode a segment"));
  }
  if (media.buffer.updating) return;
  if (media.queue.length > 0) {
    try {
      media.buffer.appendBuffer(media.queue.shift());
    } catch (e) {
      showError(`the browser refused a segment: ${e.message}`);
    }
  } else if (state.ended && !media.eos) {
    media.eos = true;
    source.endOfStream();
  }
}

function onUpdateEnd() {
  const video = ui.video;
  if (!media.playing && media.buffer.buffered.length > 0) {
    media.playing = true; // as soon as there is something to show
    video.play().catch(() => {}); // a browser that blocks autoplay leaves the controls to the user
  }
  // Long (unbounded) sessions: let go of what was watched long ago, so appends keep fitting.
  const buffered = media.buffer.buffered;
  if (buffered.length > 0 && video.currentTime - buffered.start(0) > 120) {
    media.buffer.remove(0, video.currentTime - 60);
    return; // its own updateend pumps
  }
  pump();
}

// The codec string from the init segment's avcC box: avc1.PPCCLL = profile_idc, the
// constraint flags and level_idc, as hex (RFC 6381 section 3.3).
function codecFromInit(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const moov = boxes(view, 0, bytes.length).find((b) => b.type === "moov");
  if (!moov) throw new Error("the init segment has no moov box");
  for (const trak of boxes(view, moov.start, moov.end).filter((b) => b.type === "trak")) {
    let box = trak;
    for (const type of ["mdia", "minf", "stbl", "stsd"]) {
      box = box && boxes(view, box.start, box.end).find((b) => b.type === type);
    }
    if (!box) continue;
    // stsd: version+flags, entry_count, then sample entries
    for (const entry of boxes(view, box.start + 8, box.end)) {
      if (entry.type !== "avc1" && entry.type !== "avc3") continue;
      // a VisualSampleEntry's fields take 78 bytes before its child boxes
      const avcC = boxes(view, entry.start + 78, entry.end).find((b) => b.type === "avcC");
      if (!avcC) throw new Error(`the ${entry.type} sample entry has no avcC box`);
      const hex = (k) => view.getUint8(avcC.start + k).toString(16).padStart(2, "0");
      return `${entry.type}.${hex(1)}${hex(2)}${hex(3)}`;
    }
  }
  throw new Error("the init segment has no H.264 (avc1) video track");
}

// The boxes between from and to: [{type, start (payload), end}].
function boxes(view, from, to) {
  const found = [];
  let pos = from;
  while (pos + 8 <= to) {
    let size = view.getUint32(pos);
    const type = String.fromCharCode(
      view.getUint8(pos + 4), view.getUint8(pos + 5), view.getUint8(pos + 6), view.getUint8(pos + 7));
    let header = 8;
    if (size === 1) { // 64-bit largesize
      size = Number(view.getBigUint64(pos + 8));
      header = 16;
    } else if (size === 0) {
      size = to - pos; // to the end
    }
    if (size < header || pos + size > to) break;
    found.push({type, start: pos + header, end: pos + size});
    pos += size;
  }
  return found;
}

// ---- drawing ---------------------------------------------------------------------------------

function reset() {
  if (ws) {
    const old = ws;
    ws = null;
    old.close(1000);
  }
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state = freshState();
  window.playground = state;
  Object.assign(media, {source: null, buffer: null, mime: "", queue: [], playing: false, eos: false});
  ui.video.removeAttribute("src");
  ui.video.load();
  ui.timeline.replaceChildren();
  ui.entries.replaceChildren();
  ui.error.hidden = true;
  ui.error.textContent = "";
  ui.session.textContent = ui.ttfc.textContent = ui.period.textContent = "–";
  ui.download.hidden = true;
  ui.download.removeAttribute("href");
  setNextPrompt("", "");
}

function setStatus(status, text) {
  state.status = status;
  ui.status.dataset.status = status;
  ui.status.textContent = text || status;
  setButtons();
}

function setButtons() {
  const live = ws !== null && !state.ended;
  ui.start.disabled = live;
  ui.stop.disabled = !live;
  ui.sendPrompt.disabled = !(live && state.sessionId);
}

function showError(text) {
  state.error = state.error ? `${state.error}\n${text}` : text;
  ui.error.textContent = state.error;
  ui.error.hidden = false;
}

function setNextPrompt(text, kind) {
  ui.nextPrompt.textContent = text;
  ui.nextPrompt.dataset.kind = kind;
}

// The timeline as the server applies it: a newer entry replaces every older one that starts
// at or after its own first chunk; chunk i follows the entry with the largest fromChunk <= i.
function effectiveTimeline() {
  const live = [];
  for (const entry of [...state.timeline].sort((a, b) => a.version - b.version)) {
    for (let k = live.length - 1; k >= 0; k--) {
      if (live[k].fromChunk >= entry.fromChunk) live.splice(k, 1);
    }
    live.push(entry);
  }
  return live.sort((a, b) => a.fromChunk - b.fromChunk);
}

function plannedVersion(index, live) {
  let version = 0;
  for (const entry of live) if (entry.fromChunk <= index) version = entry.version;
  return version;
}

function cell(index) {
  let el = ui.timeline.querySelector(`.chunk[data-index="${index}"]`);
  if (!el) {
    for (let i = ui.timeline.children.length; i <= index; i++) {
      el = document.createElement("div");
      el.className = "chunk pending";
      el.dataset.index = String(i);
      el.dataset.version = "";
      ui.timeline.append(el);
    }
  }
  return el;
}

function hue(version) {
  return (version * 137.508 + 200) % 360; // golden angle: neighbouring versions differ
}

function drawTimeline() {
  const live = effectiveTimeline();
  const count = Math.max(ui.timeline.children.length, state.chunks.length);
  for (let i = 0; i < count; i++) {
    const el = cell(i);
    const chunk = state.chunks[i];
    if (chunk) {
      el.classList.remove("pending");
      el.dataset.version = String(chunk.version);
      el.style.setProperty("--hue", hue(chunk.version));
      el.textContent = `v${chunk.version}`;
      el.title = `chunk ${i}: v${chunk.version} "${chunk.text}"`;
    } else {
      const planned = plannedVersion(i, live);
      el.style.setProperty("--hue", hue(planned));
      el.textContent = "";
      el.title = `chunk ${i}: pending (planned: v${planned})`;
    }
  }
  const items = state.timeline.map((entry) => {
    const li = document.createElement("li");
    li.dataset.version = String(entry.version);
    li.dataset.fromChunk = String(entry.fromChunk);
    li.style.setProperty("--hue", hue(entry.version));
    if (!live.includes(entry)) li.classList.add("superseded");
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = `v${entry.version}`;
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = `from chunk ${entry.fromChunk}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = entry.text;
    li.append(tag, from, text);
    return li;
  });
  ui.entries.replaceChildren(...items);
}

function drawTimings(chunk) {
  const arrived = state.chunks.filter(Boolean).map((c) => c.arrivedMs).sort((a, b) => a - b);
  if (state.ttfcMs === null) {
    state.ttfcMs = arrived[0] - state.startedMs;
    ui.ttfc.textContent = `${(state.ttfcMs / 1000).toFixed(2)} s`;
  }
  if (arrived.length < 2 || !chunk.fps) return;
  const periodS = (arrived[arrived.length - 1] - arrived[0]) / (arrived.length - 1) / 1000;
  const chunkS = chunk.frameCount / chunk.fps;
  state.periodS = periodS;
  ui.period.textContent = `${periodS.toFixed(2)} s per ${chunkS.toFixed(2)} s chunk: ` +
    `${(chunkS / periodS).toFixed(2)}x real time`;
}

// Marks the chunk on screen, so the picture and its prompt tag line up.
function markPlaying() {
  const t = ui.video.currentTime;
  for (const el of ui.timeline.children) {
    const chunk = state.chunks[Number(el.dataset.index)];
    const on = chunk && t >= chunk.firstFrame / chunk.fps &&
      t < (chunk.firstFrame + chunk.frameCount) / chunk.fps;
    el.classList.toggle("playing", Boolean(on));
  }
}

function makeDownload() {
  if (!state.initSegment || state.mediaSegments.length === 0 || state.downloadUrl) return;
  const blob = new Blob([state.initSegment, ...state.mediaSegments], {type: "video/mp4"});
  state.downloadUrl = URL.createObjectURL(blob);
  ui.download.href = state.downloadUrl;
  ui.download.download = `magistream-${state.sessionId || "session"}.mp4`;
  ui.download.textContent =
    `Download MP4 (${state.mediaSegments.length} chunks, ${(blob.size / 1024).toFixed(0)} KiB)`;
  ui.download.hidden = false;
}

// ---- wiring ----------------------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
ui.stop.addEventListener("click", stop);
ui.sendPrompt.addEventListener("click", sendPrompt);
ui.mode.addEventListener("change", () => { ui.imageLabel.hidden = ui.mode.value !== "i2v"; });
ui.video.addEventListener("timeupdate", markPlaying);
ui.imageLabel.hidden = ui.mode.value !== "i2v";
setButtons();
