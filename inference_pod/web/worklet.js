// Turns the audio graph's float samples (mono, the context's 16 kHz) into 16-bit PCM chunks of about 40 ms.
const CHUNK = 640;

registerProcessor("pcm16", class extends AudioWorkletProcessor {
  constructor() {
    super();
    this.buffer = new Int16Array(CHUNK);
    this.filled = 0;
  }

  process([input]) {
    if (input.length) {
      for (const sample of input[0]) {
        this.buffer[this.filled++] = Math.max(-1, Math.min(1, sample)) * 0x7fff;
        if (this.filled === CHUNK) {
          this.port.postMessage(this.buffer.buffer, [this.buffer.buffer]);
          this.buffer = new Int16Array(CHUNK);
          this.filled = 0;
        }
      }
    }
    return true;
  }
});
