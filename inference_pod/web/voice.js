// Voices for a session: the microphone, or an audio file played in real time as a voice would speak it.
// Each hands 16 kHz mono PCM16 chunks to `send` and returns { stop() }.
const SAMPLE_RATE = 16000;
const CHUNK = 640; // 40 ms: one frame's audio
const FILE_LEAD_S = 0.1; // a file is sent this far ahead of real time, so timer jitter never leaves a gap
const withWorklet = new WeakSet(); // contexts that have loaded worklet.js (a processor registers once)

// The microphone, through an AudioWorklet (worklet.js) running in `context` (16 kHz: the browser resamples).
export async function microphone(context, send) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  if (!withWorklet.has(context)) {
    await context.audioWorklet.addModule("web/worklet.js");
    withWorklet.add(context);
  }
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "pcm16");
  node.port.onmessage = (event) => send(new Int16Array(event.data));
  source.connect(node);
  return {
    stop() {
      source.disconnect();
      node.port.onmessage = null;
      stream.getTracks().forEach((track) => track.stop());
    },
  };
}

// Decodes any file the browser can (WAV, MP3, OGG ...) to 16 kHz mono PCM16.
export async function decodeFile(file) {
  const decoded = await new OfflineAudioContext(1, 1, SAMPLE_RATE).decodeAudioData(await file.arrayBuffer());
  const mono = new OfflineAudioContext(1, decoded.length, SAMPLE_RATE); // mixes the channels down
  const source = mono.createBufferSource();
  source.buffer = decoded;
  source.connect(mono.destination);
  source.start();
  const floats = (await mono.startRendering()).getChannelData(0);
  return Int16Array.from(floats, (sample) => Math.max(-1, Math.min(1, sample)) * 0x7fff);
}

// Sends `pcm` in real time (never faster than it plays), then calls `done` (the page flushes the session).
export function playPcm(pcm, send, done) {
  const startedAt = performance.now();
  let sent = 0;
  const timer = setInterval(() => {
    const due = Math.min(pcm.length, ((performance.now() - startedAt) / 1000 + FILE_LEAD_S) * SAMPLE_RATE);
    while (sent < due) {
      send(pcm.slice(sent, sent + CHUNK));
      sent += CHUNK;
    }
    if (sent >= pcm.length) {
      clearInterval(timer);
      done();
    }
  }, 20);
  return { stop() { clearInterval(timer); } };
}
