// The live page: a session opens as soon as the page connects, so the avatar idles from the start; Speak
// (the microphone) or Play file gives it a voice; Stop barges in. The session goes over WebRTC (webrtc.js:
// a <video> element plays its tracks) or, where WebRTC cannot connect, over the WebSocket (transport.js,
// whose frames and audio playout.js puts on one timeline); ?transport=webrtc or ?transport=ws forces one.
// The voices (voice.js) are the same for both.
import { Playout } from "./playout.js";
import { WebSocketSession } from "./transport.js";
import { decodeFile, microphone, playPcm } from "./voice.js";
import { WebRtcSession } from "./webrtc.js";

const $ = (id) => document.getElementById(id);
const SAMPLE_RATE = 16000;
const FORCED = new URLSearchParams(location.search).get("transport"); // "webrtc", "ws", or null: WebRTC first
const TRANSPORT_NAMES = { webrtc: "WebRTC", ws: "WebSocket" };

const page = { session: null, voice: null, connecting: 0, shown: 0, lookahead: 0 };
const playout = new Playout($("screen"), { sampleRate: SAMPLE_RATE, onShow: showFrame });

function report(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function setState(state) {
  $("state").textContent = state;
  document.body.dataset.state = state;
}

function updateControls() {
  const open = page.session !== null && page.session.open;
  $("mic").disabled = !open || page.voice !== null;
  $("file").disabled = !open;
  $("stop").disabled = !open;
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function listModels() {
  const response = await fetch("/models", { headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) throw new Error("this pod asks for an API key: type it, then Connect");
  if (!response.ok) throw new Error(`could not list models: ${body.message || `HTTP ${response.status}`}`);
  const names = (body.models || []).map((m) => (typeof m === "string" ? m : m.name));
  const select = $("model");
  const chosen = select.value;
  select.innerHTML = "";
  for (const name of names) select.add(new Option(name, name));
  if (names.includes(chosen)) select.value = chosen;
  if (!names.length) throw new Error("no models loaded on this pod");
}

// (Re)connects: lists the models and opens a session with the chosen one (the first, at the start).
async function connect({ relist = true } = {}) {
  const attempt = ++page.connecting;
  stopVoice();
  if (page.session) page.session.end();
  page.session = null;
  playout.restart();
  page.shown = 0;
  for (const id of ["frames", "shown-speaking", "shown-idle", "shown-repeated", "rebased", "dropped"]) {
    $(id).textContent = "0";
  }
  $("voice-s").textContent = "0.00 s";
  updateControls();
  setState("connecting");
  report("connecting");
  try {
    if (relist) await listModels();
    if (attempt !== page.connecting) return;
    const { started, transport, fellBack } = await openSession($("model").value, attempt);
    if (attempt !== page.connecting) return;
    page.lookahead = started.lookahead_s;
    if (transport === "ws") $("delay").textContent = `${Math.round(1000 * (started.lookahead_s + playout.delay))} ms`;
    report(`session with ${started.model} (${started.model_version}), ${started.fps} frames/s over ` +
           `${TRANSPORT_NAMES[transport]}${fellBack ? ` (fell back: ${fellBack})` : ""}`);
  } catch (err) {
    if (attempt !== page.connecting) return;
    page.session = null;
    setState("disconnected");
    report(err.message, true);
  }
  updateControls();
}

// WebRTC unless forced otherwise; the WebSocket where WebRTC cannot connect (fallback: an older pod, no route
// for UDP). Errors the WebSocket would share (a key, capacity) are not retried there.
async function openSession(model, attempt) {
  let fellBack = null;
  if (FORCED !== "ws") {
    try {
      const session = new WebRtcSession({ apiKey: $("api-key").value.trim(), video: $("video") });
      return { started: await begin(session, "webrtc", model), transport: "webrtc", fellBack };
    } catch (err) {
      if (FORCED === "webrtc" || !err.fallback || attempt !== page.connecting) throw err;
      fellBack = err.message;
    }
  }
  const session = new WebSocketSession({ apiKey: $("api-key").value.trim() });
  return { started: await begin(session, "ws", model), transport: "ws", fellBack };
}

async function begin(session, transport, model) {
  page.session = session;
  $("transport").textContent = TRANSPORT_NAMES[transport];
  document.body.dataset.transport = transport;
  session.onFrame = (frame) => { if (page.session === session) playout.push(frame); };
  session.onEvent = (event) => { if (page.session === session) onEvent(event); };
  return session.start({ model, sampleRate: SAMPLE_RATE });
}

// Over WebRTC the <video> element plays the frames: the page reads what it played (webrtc.js's getStats).
function showMedia(media) {
  $("frames").textContent = String(media.framesDecoded);
  $("dropped").textContent = String(media.framesDropped);
  $("voice-s").textContent = `${media.voiceSeconds.toFixed(2)} s`;
  $("delay").textContent = `${Math.round(1000 * page.lookahead + media.jitterMs)} ms`;
  document.body.dataset.framesDecoded = String(media.framesDecoded);
  setState(media.voiced ? "speaking" : "idle");
}

function showFrame(frame) {
  page.shown += 1;
  const counter = $(`shown-${frame.kind}`);
  if (counter) counter.textContent = String(Number(counter.textContent) + 1);
  $("frames").textContent = String(page.shown);
  $("rebased").textContent = String(playout.rebased);
  $("lag").textContent = `${Math.round(1000 * playout.lag)} ms`;
  $("voice-s").textContent = `${(playout.voiceSamples / SAMPLE_RATE).toFixed(2)} s`;
  document.body.dataset.lastTick = String(frame.tick);
  // A repeated frame (the pod fell behind its clock) keeps the state, or is speaking if it plays voice.
  if (frame.kind === "speaking" || frame.kind === "idle") setState(frame.kind);
  else if (frame.voiced) setState("speaking");
}

function onEvent(event) {
  if (event.type === "media") {
    showMedia(event);
  } else if (event.type === "media_started") {
    setState("idle");
  } else if (event.type === "cleared") {
    playout.cleared(event.tick);
    report(`stopped: ${(event.played_samples / SAMPLE_RATE).toFixed(2)} s of the voice had played`);
  } else if (event.type === "playback_finished") {
    report(`played to the end (${(event.samples / SAMPLE_RATE).toFixed(2)} s)`);
  } else if (event.type === "error" || event.type === "closed") { // the session is over: say why, once
    stopVoice();
    page.session = null;
    playout.reset();
    setState("disconnected");
    report(event.type === "error" ? `${event.code}: ${event.message} (Connect to start again)`
      : `the connection closed (${event.code}${event.reason ? `: ${event.reason}` : ""}): Connect again`, true);
  }
  updateControls();
}

function stopVoice() {
  if (page.voice) page.voice.stop();
  page.voice = null;
}

// Stop: the voice stops sending, what is scheduled goes silent, and the session drops its queued audio.
function bargeIn() {
  if (!page.session) return;
  stopVoice();
  playout.bargeIn();
  page.session.clear();
  updateControls();
}

async function speak(startVoice, what) {
  const session = page.session;
  if (!session) return;
  if (page.voice) bargeIn();
  try {
    if (session.unmute) session.unmute(); // a click allows sound: over WebRTC the <video> plays the voice,
    await playout.context.resume(); // over the WebSocket Web Audio does (frames follow its clock from now)
    page.voice = await startVoice((pcm) => session.sendAudio(pcm));
    report(what);
  } catch (err) {
    report(err.message, true);
  }
  updateControls();
}

function playFile(file) {
  speak(async (send) => playPcm(await decodeFile(file), send, () => {
    if (page.session) page.session.flush();
    page.voice = null;
    updateControls();
  }), `playing ${file.name}`).catch(() => {});
}

$("controls").addEventListener("submit", (e) => { e.preventDefault(); connect(); });
$("model").addEventListener("change", () => connect({ relist: false }));
$("mic").addEventListener("click", () => speak((send) => microphone(playout.context, send), "listening: speak"));
$("stop").addEventListener("click", bargeIn);
$("file").addEventListener("change", (e) => {
  if (e.target.files[0]) playFile(e.target.files[0]);
  e.target.value = ""; // the same file again is a change too
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0] && page.session) playFile(e.dataTransfer.files[0]);
});
window.addEventListener("pagehide", () => { if (page.session) page.session.end(); });
connect();
