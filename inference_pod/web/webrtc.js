// A live session over WebRTC (POST /webrtc/offer): the pod sends the avatar as a video track and its voice as
// an audio track, stamped on the session's timeline, and a <video> element plays both: the browser's jitter
// buffer and RTP timestamps keep lips and voice in sync, so the page's own playout (playout.js) is not used.
//
// The same interface as transport.js's WebSocketSession, with these differences:
//   new WebRtcSession({ apiKey, video });  // the <video> element that plays the session
//   onFrame is never called (the video element shows the frames); instead onEvent gets, every STATS_MS,
//   { type: "media", voiced, voiceSeconds, framesDecoded, framesDropped, jitterMs } read from getStats();
//   sendAudio(pcm16) goes over the data channel as binary, as on the WebSocket: the microphone's too.
// The microphone is not sent as a track: its RTP and the data channel's `clear` are separate streams, so on
// Stop the voice already on its way (and in the pod's decoder) reached the session after the clear and the
// avatar spoke on; on the one ordered data channel nothing sent before Stop comes after the clear.
// start() rejects with an error whose `fallback` is true when WebRTC cannot connect here (no offer route on
// an older pod, no RTCPeerConnection, ICE that does not connect within ICE_TIMEOUT_MS): the page then uses
// the WebSocket; auth, origin, capacity and draining errors have `fallback` false (the WebSocket's would match).
const ICE_TIMEOUT_MS = 5000;
const STATS_MS = 200;
const VOICE_LEVEL = 0.01; // RMS (0..1) above which the avatar's audio counts as voice; idle frames are silent
const VOICE_HOLD_MS = 500; // speaking lasts this long past the last voiced stretch: words have short gaps
const EVENT_TYPES = { cleared: "cleared", playback_finished: "playback_finished", session_ended: "ended" };
// Auth, origin, capacity and draining: the WebSocket would be refused the same. Anything else (404 from a pod
// with no WebRTC door, an offer it cannot answer) is worth trying the WebSocket for.
const REFUSED = new Set([401, 403, 429, 503]);

class CannotConnect extends Error {
  constructor(message) {
    super(message);
    this.fallback = true;
  }
}

export class WebRtcSession {
  constructor({ apiKey = "", video }) {
    this.apiKey = apiKey;
    this.video = video;
    this.pc = null;
    this.channel = null;
    this.open = false;
    this.timer = null;
    this.level = { energy: 0, duration: 0, voicedUntil: 0, voiceSeconds: 0 };
    this.onFrame = () => {};
    this.onEvent = () => {};
  }

  async start({ model }) {
    if (typeof RTCPeerConnection === "undefined") throw new CannotConnect("this browser has no WebRTC");
    const pc = (this.pc = new RTCPeerConnection());
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const channel = (this.channel = pc.createDataChannel("control"));
    channel.binaryType = "arraybuffer";
    const stream = new MediaStream();
    pc.ontrack = (event) => {
      stream.addTrack(event.track);
      this.video.srcObject = stream;
      this.play();
    };
    const started = new Promise((resolve, reject) => {
      channel.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "session_started") {
          this.open = true;
          resolve(message);
        } else if (message.type === "error") {
          if (!this.open) reject(new Error(`${message.code}: ${message.message}`));
          else this.over({ type: "error", code: message.code, message: message.message });
        } else if (message.type === "media_started") {
          this.onEvent({ type: "media_started", tick: message.tick, codec: message.codec });
        } else if (message.type in EVENT_TYPES) {
          if (message.type === "session_ended") this.over(null);
          this.onEvent({ ...message, type: EVENT_TYPES[message.type] });
        }
      };
      channel.onclose = () => reject(new CannotConnect("the WebRTC data channel closed before the session started"));
    });
    pc.onconnectionstatechange = () => {
      if (this.open && (pc.connectionState === "failed" || pc.connectionState === "closed")) {
        this.over({ type: "closed", code: pc.connectionState, reason: "WebRTC connection" });
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    const response = await fetch("/webrtc/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(this.apiKey ? { "X-API-Key": this.apiKey } : {}) },
      body: JSON.stringify({ model_name: model, sdp: pc.localDescription.sdp, type: "offer" }),
    }).catch(() => null);
    if (response === null) { this.close(); throw new CannotConnect("POST /webrtc/offer failed"); }
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      this.close();
      const words = answer.code ? `${answer.code}: ${answer.error}` : `POST /webrtc/offer: HTTP ${response.status}`;
      throw REFUSED.has(response.status) ? new Error(words) : new CannotConnect(words);
    }
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    let timeout;
    const connectTimeout = new Promise((resolve, reject) => {
      timeout = setTimeout(() => reject(new CannotConnect(`WebRTC did not connect within ${ICE_TIMEOUT_MS / 1000} s`)),
                           ICE_TIMEOUT_MS);
    });
    try {
      const message = await Promise.race([started, connectTimeout]);
      this.timer = setInterval(() => this.readStats(), STATS_MS);
      return message;
    } catch (err) {
      this.close();
      throw err;
    } finally {
      clearTimeout(timeout);
    }
  }

  // Autoplay rules may refuse sound before the user clicks: play muted then, with sound after a click.
  play() {
    this.video.play().catch(() => {
      this.video.muted = true;
      this.video.play().catch(() => {});
    });
  }

  unmute() {
    this.video.muted = false;
    this.play();
  }

  sendAudio(pcm16) { if (this.open && this.channel.readyState === "open") this.channel.send(pcm16); }

  clear() { this.send({ type: "clear" }); }

  flush() { this.send({ type: "flush" }); }

  end() {
    if (this.open) this.send({ type: "session_end" });
    this.open = false;
    setTimeout(() => this.close(), 500); // the session_end leaves first
  }

  send(message) { if (this.open && this.channel.readyState === "open") this.channel.send(JSON.stringify(message)); }

  // The session is over: say so once (event null: it ended as asked), and let the connection go.
  over(event) {
    const wasOpen = this.open;
    this.open = false;
    clearInterval(this.timer);
    if (event && wasOpen) this.onEvent(event);
    setTimeout(() => this.close(), 0);
  }

  close() {
    clearInterval(this.timer);
    if (this.pc) this.pc.close();
    this.video.srcObject = null;
  }

  // What the player did since the last look: the audio's loudness as played (voice or silence), frames.
  async readStats() {
    if (!this.pc || this.pc.connectionState === "closed") return;
    const stats = await this.pc.getStats();
    const media = { type: "media", voiced: false, voiceSeconds: 0, framesDecoded: 0, framesDropped: 0, jitterMs: 0 };
    stats.forEach((report) => {
      if (report.type !== "inbound-rtp") return;
      if (report.kind === "audio") this.measureVoice(report);
      else if (report.kind === "video") {
        media.framesDecoded = report.framesDecoded || 0;
        media.framesDropped = report.framesDropped || 0;
        if (report.jitterBufferEmittedCount) {
          media.jitterMs = Math.round((1000 * report.jitterBufferDelay) / report.jitterBufferEmittedCount);
        }
      }
    });
    media.voiced = performance.now() < this.level.voicedUntil;
    media.voiceSeconds = this.level.voiceSeconds;
    if (this.open) this.onEvent(media);
  }

  measureVoice(report) {
    const energy = report.totalAudioEnergy || 0;
    const duration = report.totalSamplesDuration || 0;
    const seconds = duration - this.level.duration;
    if (seconds > 0) {
      const rms = Math.sqrt(Math.max(0, energy - this.level.energy) / seconds);
      if (rms > VOICE_LEVEL) {
        this.level.voicedUntil = performance.now() + VOICE_HOLD_MS;
        this.level.voiceSeconds += seconds;
      }
    }
    Object.assign(this.level, { energy, duration });
  }
}

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_TIMEOUT_MS); // what was gathered by then is offered
  });
}
