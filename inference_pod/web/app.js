// The live page: microphone or an audio file -> AudioWorklet (PCM16, 16 kHz) -> /ws live audio -> canvas.
// Plain browser APIs only; the protocol is docs/HTTP_API.md's WebSocket one (audio_start, PCM16, audio_end).
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLE_RATE = 16000;
const FPS = 25; // the demo's frame rate; the first frame message's model says the rest

const state = { ws: null, context: null, source: null, node: null, stream: null, startedAt: 0, frames: 0,
                arrivals: [], fps: FPS };

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadModels() {
  try {
    const response = await fetch("/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.message || `HTTP ${response.status}`);
    const select = $("model");
    select.innerHTML = "";
    const names = (body.models || []).map((m) => (typeof m === "string" ? m : m.name));
    for (const name of names) select.add(new Option(name, name));
    status(names.length ? `${names.length} model(s)` : "no models loaded on this pod", !names.length);
  } catch (err) {
    status(`could not list models: ${err.message}`, true);
  }
}

function openSocket(model) {
  const key = $("api-key").value.trim();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/ws${key ? `?api_key=${encodeURIComponent(key)}` : ""}`;
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = (event) => { if (state.ws === ws && event.code !== 1000) status(`connection closed (${event.code})`, true); };
  return new Promise((resolve, reject) => {
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "audio_start", model_name: model, sample_rate: SAMPLE_RATE, channels: 1,
                               format: "jpeg", request_id: "live" }));
      resolve(ws);
    };
    ws.onerror = () => reject(new Error("cannot connect to /ws (is the API key right?)"));
  });
}

function onMessage(message) {
  if (message.type === "frame") {
    drawFrame(message);
  } else if (message.type === "end") {
    status(`done: ${message.frames} frames`);
    state.ws.close(1000);
    state.ws = null;
  } else if (message.type === "error") {
    status(`${message.code}: ${message.message}`, true);
  }
}

async function drawFrame(message) {
  const now = performance.now();
  state.frames += 1;
  state.arrivals.push(now);
  while (state.arrivals.length && now - state.arrivals[0] > 1000) state.arrivals.shift();
  const blob = new Blob([Uint8Array.from(atob(message.frame), (c) => c.charCodeAt(0))], { type: "image/jpeg" });
  const bitmap = await createImageBitmap(blob);
  const canvas = $("screen");
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  // Frame n shows the voice at n / fps seconds after the audio started: how far behind are we?
  const delay = now - (state.startedAt + (1000 * message.frame_id) / state.fps);
  $("frames").textContent = String(state.frames);
  $("fps").textContent = state.arrivals.length > 1 ? state.arrivals.length.toFixed(0) : "-";
  $("delay").textContent = `${Math.max(0, delay).toFixed(0)} ms`;
  document.body.dataset.lastFrame = String(message.frame_id);
}

async function start(connectSource) {
  const model = $("model").value;
  if (!model) { status("choose a model first (Load models)", true); return; }
  stop(false);
  try {
    state.context = new AudioContext({ sampleRate: SAMPLE_RATE });
    await state.context.audioWorklet.addModule("web/worklet.js");
    state.ws = await openSocket(model);
    state.node = new AudioWorkletNode(state.context, "pcm16");
    const ws = state.ws;
    state.node.port.onmessage = (event) => { if (ws.readyState === WebSocket.OPEN) ws.send(event.data); };
    Object.assign(state, { frames: 0, arrivals: [], startedAt: performance.now() });
    state.source = await connectSource(state.context);
    state.source.connect(state.node);
    $("stop").disabled = false;
    $("mic").disabled = true;
  } catch (err) {
    status(err.message, true);
    stop(false);
  }
}

function stop(flush = true) {
  if (state.source) state.source.disconnect();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  if (state.context) state.context.close();
  if (flush && state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "audio_end" }));
  Object.assign(state, { source: null, stream: null, context: null, node: null });
  $("stop").disabled = true;
  $("mic").disabled = false;
}

async function microphone(context) {
  state.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  status("listening: speak");
  return context.createMediaStreamSource(state.stream);
}

function audioFile(file) {
  return async (context) => {
    const buffer = await context.decodeAudioData(await file.arrayBuffer());
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(context.destination); // hear it while it plays
    source.onended = () => stop(true);
    source.start();
    status(`playing ${file.name}`);
    return source;
  };
}

$("refresh").addEventListener("click", loadModels);
$("mic").addEventListener("click", () => start(microphone));
$("stop").addEventListener("click", () => stop(true));
$("file").addEventListener("change", (e) => { if (e.target.files[0]) start(audioFile(e.target.files[0])); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) start(audioFile(e.dataTransfer.files[0]));
});
loadModels();
