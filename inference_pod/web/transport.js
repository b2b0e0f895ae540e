// A live session over the pod's WebSocket (/ws: session_start, binary PCM16, clear, flush, session_end).
//
// The page talks to a session only through this interface, so another transport (WebRTC) can stand in:
//   const session = new WebSocketSession({ apiKey });
//   session.onFrame = (frame) => ...;  // { tick, pts, kind, audio: Int16Array, voiced, image: Blob, width, height }
//   session.onEvent = (event) => ...;  // { type: "cleared" | "playback_finished" | "ended" | "error" | "closed", ... }
//                                      // ("error" and "closed" end the session)
//   const started = await session.start({ model, sampleRate });  // { fps, sample_rate, samples_per_tick, lookahead_s, ... }
//   session.sendAudio(pcm16); session.clear(); session.flush(); session.end();
const EVENT_TYPES = { cleared: "cleared", playback_finished: "playback_finished", session_ended: "ended" };

export class WebSocketSession {
  constructor({ apiKey = "" } = {}) {
    this.apiKey = apiKey;
    this.ws = null;
    this.open = false; // between session_started and session_ended (or the socket's close)
    this.onFrame = () => {};
    this.onEvent = () => {};
  }

  // Connects and opens the session; resolves with the session_started message, rejects with the pod's words.
  start({ model, sampleRate = 16000 }) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = this.apiKey ? `?api_key=${encodeURIComponent(this.apiKey)}` : "";
    const ws = (this.ws = new WebSocket(`${scheme}//${location.host}/ws${query}`));
    ws.binaryType = "arraybuffer";
    return new Promise((resolve, reject) => {
      let started = false;
      ws.onopen = () => ws.send(JSON.stringify({ type: "session_start", model_name: model, sample_rate: sampleRate,
                                                 channels: 1, format: "jpeg" }));
      ws.onerror = () => { if (!started) reject(new Error("cannot connect to /ws (is the API key right?)")); };
      ws.onclose = (event) => {
        const wasOpen = this.open;
        this.open = false;
        if (!started) reject(new Error(`connection closed before the session started (${event.code})`));
        else if (wasOpen) this.onEvent({ type: "closed", code: event.code, reason: event.reason });
      };
      ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "session_frame") {
          this.onFrame(decodeFrame(message));
        } else if (message.type === "session_started") {
          started = this.open = true;
          resolve(message);
        } else if (message.type === "error") {
          if (!started) {
            reject(new Error(`${message.code}: ${message.message}`));
            return;
          }
          this.open = false; // a session that fails is over (the pod ends it)
          ws.close(1000);
          this.onEvent({ type: "error", code: message.code, message: message.message });
        } else if (message.type in EVENT_TYPES) {
          if (message.type === "session_ended") {
            this.open = false;
            ws.close(1000);
          }
          this.onEvent({ ...message, type: EVENT_TYPES[message.type] });
        }
      };
    });
  }

  sendAudio(pcm16) { if (this.open) this.ws.send(pcm16); }

  clear() { this.send({ type: "clear" }); }

  flush() { this.send({ type: "flush" }); }

  end() {
    if (this.open) this.send({ type: "session_end" });
    else if (this.ws) this.ws.close(1000);
  }

  send(message) { if (this.open) this.ws.send(JSON.stringify(message)); }
}

function bytesOf(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

function decodeFrame(message) {
  const bytes = bytesOf(message.audio);
  const audio = new Int16Array(bytes.buffer, 0, bytes.length >> 1); // PCM16 little-endian, as browsers' are
  return { tick: message.tick, pts: message.pts, kind: message.kind, width: message.width, height: message.height,
           audio, voiced: audio.some((sample) => sample !== 0), // idle frames carry silence
           image: new Blob([bytesOf(message.frame)], { type: `image/${message.format === "png" ? "png" : "jpeg"}` }) };
}
