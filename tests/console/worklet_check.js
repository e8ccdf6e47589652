// Runs vmcloud.js's AudioWorklet processor (the jitter buffer) under node with a fake render loop
// and prints what it did in a few situations, as JSON, for tests/console/test_worklet.py.
"use strict";
const fs = require("fs");

const source = fs.readFileSync(process.argv[2], "utf8").split("const WORKLET = `")[1].split("`;")[0];
global.sampleRate = 48000;
let Processor = null;
global.AudioWorkletProcessor = class {
  constructor() {
    this.port = { postMessage: (message) => { this.report = message; } };
  }
};
global.registerProcessor = (name, processor) => { Processor = processor; };
eval(source);  // eslint-disable-line no-eval

const FRAME = 960;  // 20 ms, as WebCodecs decodes an Opus packet

function frame(loud) {
  const plane = new Float32Array(FRAME);
  if (loud) {
    for (let i = 0; i < FRAME; i++) plane[i] = 0.5 * Math.sin(i / 5);
  }
  return [plane, plane];
}

/** Plays `seconds` of render quanta while a sender sends frames at `rate` times ours, `ahead`
 * frames early at the start, its sound given by loud(frame number); during `gap` [from, to] (in
 * seconds) nothing comes, then all that was held back at once (TCP's way); `burst` more frames
 * at 1 s.  The buffer (ms) is sampled every second. */
function run({ seconds, rate = 1, ahead = 3, loud = () => false, gap = null, burst = 0 }) {
  const worklet = new Processor({ processorOptions: { targetMs: 60, maxMs: 200, levelMs: 50 } });
  const out = [[new Float32Array(128), new Float32Array(128)]];
  const buffered = [];
  let sent = 0, silentQuanta = 0;
  for (let q = 0; q < (seconds * 48000) / 128; q++) {
    const now = (q * 128) / 48000;
    const inGap = gap && now >= gap[0] && now < gap[1];
    const due = (now * rate) / 0.02 + ahead + (burst && now >= 1 ? burst : 0);
    while (!inGap && sent < due) {
      worklet.port.onmessage({ data: frame(loud(sent)) });
      sent++;
    }
    worklet.process([], out);
    if (inGap && !worklet.playing) silentQuanta++;
    if (q % 375 === 0 && worklet.report) buffered.push(Math.round(worklet.report.buffered));
  }
  return {
    buffered,
    dropped: Math.round((worklet.dropped / 48000) * 1000),
    silentQuanta,
    playingAtEnd: worklet.playing,
  };
}

const beeps = (n) => (n * 20) % 1000 < 300;  // 300 ms of tone every second
console.log(JSON.stringify({
  drift: run({ seconds: 120, rate: 1.003, loud: beeps }),
  steady: run({ seconds: 30, loud: beeps }),
  toneAlways: run({ seconds: 30, rate: 1.003, loud: () => true }),
  stall: run({ seconds: 5, loud: beeps, gap: [2, 2.4] }),
  burst: run({ seconds: 5, loud: beeps, burst: 25 }),
}));
