// Plays a session's frames and their audio on one timeline, so the voice is heard as its lips move.
//
// Frame k presents at `pts` seconds of the session's timeline with the audio that plays with it. The first
// frame fixes where that timeline sits on the audio clock (now + a small playout delay, for the network's
// jitter); each frame's audio is scheduled with Web Audio at that time and its image is drawn when the audio
// clock (minus the output's latency) reaches it. A frame that arrives too late moves the timeline later
// rather than letting picture and sound drift apart.
const PLAYOUT_DELAY_S = 0.2;
const MIN_LEAD_S = 0.02; // a frame due sooner than this after it arrives is late

export class Playout {
  constructor(canvas, { sampleRate = 16000, onShow = () => {} } = {}) {
    this.canvas = canvas;
    this.sampleRate = sampleRate;
    this.onShow = onShow; // (frame) for each frame whose time has come, in order
    this.context = new AudioContext({ sampleRate });
    this.context.onstatechange = () => this.reset(); // its clock starts (or stops): anchor again
    this.offset = null; // audio-clock seconds of the timeline's 0
    this.queue = []; // frames waiting for their time: { frame, at, bitmap }
    this.sources = new Set(); // scheduled audio not yet played
    this.skipThrough = -1; // frames up to this tick were barged in on: neither shown nor heard
    this.rebased = 0; // times a late frame moved the timeline later
    this.voiceSamples = 0; // returned audio scheduled (not silence)
    this.lag = 0; // how long after its time (= when its audio is heard) frames are drawn: a moving average, s
    this.timer = setInterval(() => this.draw(), 10);
  }

  get delay() { return PLAYOUT_DELAY_S; }

  // Audio clock while Web Audio runs (it is what the listener hears), the page's clock until then
  // (before any click, autoplay rules keep the context suspended: the frames still show).
  now() {
    if (this.context.state === "running") {
      return this.context.currentTime - (this.context.outputLatency || 0) - (this.context.baseLatency || 0);
    }
    return performance.now() / 1000;
  }

  push(frame) {
    if (frame.tick <= this.skipThrough) return;
    const now = this.now();
    if (this.offset === null || this.offset + frame.pts < now + MIN_LEAD_S) {
      if (this.offset !== null) this.rebased += 1;
      // On a whole sample, so one frame's audio ends exactly where the next one's begins.
      this.offset = Math.round((now + PLAYOUT_DELAY_S - frame.pts) * this.sampleRate) / this.sampleRate;
    }
    const at = this.offset + frame.pts;
    if (this.context.state === "running" && frame.voiced) this.schedule(frame.audio, at);
    const entry = { frame, at, bitmap: null };
    createImageBitmap(frame.image).then((bitmap) => { entry.bitmap = bitmap; }, () => { entry.bitmap = "broken"; });
    this.queue.push(entry);
  }

  schedule(pcm16, at) {
    const buffer = this.context.createBuffer(1, pcm16.length, this.sampleRate);
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < pcm16.length; i++) samples[i] = pcm16[i] / 0x8000;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    // Output latency is already in `at` (now() subtracts it), so schedule on the raw context clock.
    source.start(at + (this.context.outputLatency || 0) + (this.context.baseLatency || 0));
    source.onended = () => this.sources.delete(source);
    this.voiceSamples += pcm16.length;
    this.sources.add(source);
  }

  // Barge-in: silence what is scheduled and drop what waits; frames still on their way up to the tick the
  // session reports as its last before the clear (`cleared(tick)`) are dropped as they come.
  bargeIn() {
    this.skipThrough = Infinity;
    this.silence();
    this.drop();
  }

  cleared(lastTick) { this.skipThrough = lastTick; }

  silence() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
  }

  drop() {
    this.queue.forEach(release);
    this.queue = [];
  }

  reset() {
    this.silence();
    this.drop();
    this.offset = null;
  }

  // Another session: its ticks start again at 0.
  restart() {
    this.reset();
    Object.assign(this, { skipThrough: -1, rebased: 0, voiceSamples: 0, lag: 0 });
  }

  draw() {
    const now = this.now();
    let due = null;
    while (this.queue.length && this.queue[0].at <= now && this.queue[0].bitmap !== null) {
      if (due !== null) release(due); // its time passed while a later one's came too: show the later one
      due = this.queue.shift();
      this.onShow(due.frame);
    }
    if (due === null || due.bitmap === "broken") return;
    const { width, height } = due.bitmap;
    if (this.canvas.width !== width || this.canvas.height !== height) Object.assign(this.canvas, { width, height });
    this.canvas.getContext("2d").drawImage(due.bitmap, 0, 0);
    this.lag += 0.1 * (now - due.at - this.lag);
    release(due);
  }

  close() {
    clearInterval(this.timer);
    this.reset();
    this.context.close();
  }
}

function release(entry) {
  if (entry.bitmap && entry.bitmap !== "broken") entry.bitmap.close();
}
