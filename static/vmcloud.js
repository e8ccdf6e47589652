/*
 * vmcloud.js - a small client for the vmcloud REST API, with no dependencies and no build step.
 *
 * A worker page holds one VM handle (a capability: whoever has it may use that VM) and needs four
 * things: know when its handle has a VM and what the VM offers (handle-status), follow the pages
 * the worker visits (last-event-id + a fetch-events long-poll loop), keep the handle alive
 * (renew-expire) and give it back (release).  Those routes allow cross-origin calls (CORS), so the
 * page may live on the application's own site:
 *
 *   <script src="https://vmcloud.example/static/vmcloud.js"></script>
 *   const vm = vmcloud.handle("https://vmcloud.example", handle);
 *   const status = await vm.waitAssigned({timeout: 60000}); // {assigned: true, vmid, vm: {...}, ...}
 *   // (rejects with vmcloud.LostError if the VM died first, vmcloud.TimeoutError after the timeout)
 *   const follow = vm.followEvents(ev => console.log(ev.data.url));
 *   await vm.renewExpire(10 * 60 * 1000);
 *   ...
 *   follow.stop(); await vm.release();
 *
 * The monitor page uses the admin half (vmcloud.admin(base, token)); those routes need the
 * admin token and are meant for the operator, never for a worker's browser.
 *
 * Loaded by a <script> tag it defines window.vmcloud; under CommonJS (node) it is module.exports.
 */
(function (root, factory) {
  "use strict";
  var api = factory();
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  } else {
    root.vmcloud = api;
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  /** An error answer of the API: HTTP status, stable code ("unknown-handle", ...) and message. */
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message + " (" + status + " " + code + ")");
      this.name = "ApiError";
      this.status = status;
      this.code = code;
    }
  }

  /**
   * waitAssigned's end when the handle's VM died (handle-status said assigned: false with lost): the
   * pool never gives a handle that lost its VM another one, so waiting longer is pointless.
   * lost is {vmid, reason, time} from handle-status; status is the whole answer.  The handle is
   * still known: release it.
   */
  class LostError extends Error {
    constructor(handle, status) {
      const lost = status.lost || {};
      super("the VM " + lost.vmid + " of handle " + handle + " was lost: " + lost.reason);
      this.name = "LostError";
      this.handle = handle;
      this.lost = lost;
      this.status = status;
    }
  }

  /** waitAssigned's end when options.timeout ms passed without a VM; timeout is that figure. */
  class TimeoutError extends Error {
    constructor(timeout) {
      super("no VM assigned within " + timeout + " ms");
      this.name = "TimeoutError";
      this.timeout = timeout;
    }
  }

  function abortError() {
    const error = new Error("aborted");
    error.name = "AbortError";
    return error;
  }

  function trimBase(base) {
    return (base || "").replace(/\/+$/, "");
  }

  /** One request; resolves to parsed JSON, text, or null (204/202), rejects with ApiError. */
  async function call(base, method, path, options) {
    options = options || {};
    const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
    const init = { method: method, headers: headers, signal: options.signal };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(trimBase(base) + path, init);
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok) {
      let code = "http-" + response.status;
      let message = response.statusText || "request failed";
      if (type.indexOf("application/json") === 0) {
        try {
          const error = await response.json();
          code = error.error || code;
          message = error.message || message;
        } catch (ignored) {
          /* keep the status line */
        }
      }
      throw new ApiError(response.status, code, message);
    }
    if (response.status === 204 || response.status === 202) {
      return null;
    }
    return type.indexOf("application/json") === 0 ? response.json() : response.text();
  }

  function segment(value) {
    return encodeURIComponent(String(value));
  }

  /** Wait ms, or less if signal aborts; the abort listener goes when the wait ends (loops sleep often). */
  function sleep(ms, signal) {
    return new Promise(function (resolve) {
      if (signal && signal.aborted) {
        resolve();
        return;
      }
      let timer = null;
      const wake = function () {
        clearTimeout(timer);
        if (signal) {
          signal.removeEventListener("abort", wake);
        }
        resolve();
      };
      timer = setTimeout(wake, ms);
      if (signal) {
        signal.addEventListener("abort", wake);
      }
    });
  }

  const FIRST_RETRY_PAUSE = 1000;
  const MAX_RETRY_PAUSE = 30000;

  /**
   * The retry rule of the handle loops (followEvents, waitAssigned): call attempt() until it
   * answers.  A network error or a 5xx (the daemon restarting, a proxy in between) is tried again
   * after a pause that doubles from options.retryPause (1 s) up to 30 s, calling
   * options.onError(error) each time; an API "no" (any 4xx: unknown handle, bad request) is final
   * and rejects at once, as does an abort of signal.
   */
  async function retrying(attempt, options, signal) {
    let pause = options.retryPause || FIRST_RETRY_PAUSE;
    for (;;) {
      if (signal.aborted) {
        throw abortError();
      }
      try {
        return await attempt();
      } catch (error) {
        if (signal.aborted || (error instanceof ApiError && error.status < 500)) {
          throw error;
        }
        if (options.onError) {
          options.onError(error);
        }
        await sleep(pause, signal);
        pause = Math.min(pause * 2, MAX_RETRY_PAUSE);
      }
    }
  }

  /** A VM handle, as a worker page uses it. */
  class Handle {
    constructor(base, handle) {
      this.base = trimBase(base);
      this.handle = String(handle);
    }

    /** {assigned: false}, {assigned: false, lost: {vmid, reason, time}} or {assigned: true, vmid, vm, ...}. */
    status(signal) {
      return call(this.base, "GET", "/handle-status/" + segment(this.handle), { signal: signal });
    }

    /**
     * Poll handle-status every options.interval ms (1000) until the handle has a VM.
     *
     * Resolves with the status once assigned.  Rejects with:
     * - LostError when the handle's VM died first (handle-status has lost): no VM will come;
     * - TimeoutError when options.timeout ms (none by default) passed first;
     * - ApiError for a 4xx, e.g. status 404 / code "unknown-handle" (released, expired, never was);
     * - an AbortError when options.signal aborts.
     * Network errors and 5xx answers are retried as followEvents does (see retrying: a pause from
     * options.retryPause, 1 s, doubling up to 30 s; options.onError(error) for each).
     */
    async waitAssigned(options) {
      options = options || {};
      const interval = options.interval || 1000;
      const outer = options.signal;
      if (outer && outer.aborted) {
        throw abortError();
      }
      // One signal stops everything in flight, whether the caller aborted or the time ran out.
      const controller = new AbortController();
      const signal = controller.signal;
      const abort = function () {
        controller.abort();
      };
      if (outer) {
        outer.addEventListener("abort", abort);
      }
      const self = this;
      const poll = (async function () {
        for (;;) {
          const status = await retrying(function () {
            return self.status(signal);
          }, options, signal);
          if (status.assigned) {
            return status;
          }
          if (status.lost) {
            throw new LostError(self.handle, status);
          }
          await sleep(interval, signal);
          if (signal.aborted) {
            throw abortError();
          }
        }
      })();
      let timer = null;
      const contenders = [poll];
      if (options.timeout !== undefined && options.timeout !== null) {
        // A race, not only an abort: the timeout holds even if a fetch ignores its signal.
        contenders.push(
          new Promise(function (resolve, reject) {
            timer = setTimeout(function () {
              reject(new TimeoutError(options.timeout));
            }, Math.max(0, options.timeout));
          }),
        );
      }
      try {
        return await Promise.race(contenders);
      } catch (error) {
        if (outer && outer.aborted && !(error instanceof TimeoutError)) {
          throw abortError();
        }
        throw error;
      } finally {
        clearTimeout(timer);
        if (outer) {
          outer.removeEventListener("abort", abort);
        }
        controller.abort();
        poll.catch(function () {
          /* the loser of the race ends quietly */
        });
      }
    }

    /** Release the handle: the VM is cleaned and reused; the handle is unknown from then on. */
    release() {
      return call(this.base, "POST", "/release/" + segment(this.handle));
    }

    /** Release the handle ms milliseconds from now; a new call resets the timer. */
    renewExpire(ms) {
      const delay = Math.max(0, Math.floor(ms));
      return call(this.base, "POST", "/renew-expire/" + segment(this.handle) + "/" + delay);
    }

    /** The id to start fetching events after. */
    async lastEventId() {
      const answer = await call(this.base, "GET", "/last-event-id/" + segment(this.handle));
      return answer.lastId;
    }

    /** One long poll: {lastId, newEvents: [{id, time, data}]} after lastId, waiting up to wait s. */
    fetchEvents(lastId, wait, signal) {
      let path = "/fetch-events/" + segment(this.handle) + "/" + lastId;
      if (wait !== undefined) {
        path += "?wait=" + wait;
      }
      return call(this.base, "GET", path, { signal: signal });
    }

    /**
     * Call onEvent(event) for every event from now on, in order, until stop() or the handle ends.
     *
     * Network errors and 5xx answers are retried (see retrying: a pause from options.retryPause,
     * 1 s, doubling up to 30 s; options.onError(error) for each); a 4xx (the handle was released
     * or expired) ends the loop and calls options.onEnd(error), as does an exception thrown by
     * onEvent (retrying would deliver the same events again); stop() ends it with onEnd(null).
     * Returns {stop(), done}: done resolves when the loop has ended.
     */
    followEvents(onEvent, options) {
      options = options || {};
      const controller = new AbortController();
      const signal = controller.signal;
      const self = this;
      const done = (async function () {
        let lastId = options.lastId;
        try {
          while (!signal.aborted) {
            if (lastId === undefined) {
              lastId = await retrying(function () {
                return self.lastEventId();
              }, options, signal);
            }
            const answer = await retrying(function () {
              return self.fetchEvents(lastId, options.wait, signal);
            }, options, signal);
            for (const event of answer.newEvents) {
              onEvent(event);
            }
            lastId = answer.lastId;
          }
        } catch (error) {
          if (!signal.aborted) {
            if (options.onEnd) {
              options.onEnd(error);
            }
            return;
          }
        }
        if (options.onEnd) {
          options.onEnd(null);
        }
      })();
      return {
        stop: function () {
          controller.abort();
        },
        done: done,
      };
    }
  }

  // ---------------------------------------------------------------------------------------------
  // attach: the VM's screen and sound in an element (the console and audio proxies, issue #10).
  // Kept apart from the REST helpers above: it needs a browser (DOM, WebSocket, Web Audio) and
  // loads noVNC (ES modules under /static/novnc/) only when a page attaches.
  // ---------------------------------------------------------------------------------------------

  /** The absolute http(s) URL of path on base ("" is this page's own origin). */
  function absolute(base, path) {
    const origin = typeof location !== "undefined" ? location.href : "http://localhost/";
    return new URL(trimBase(base) + path, origin);
  }

  /** The ws(s) URL of path on base (https -> wss: behind TLS the sockets are TLS too). */
  function socketUrl(base, path) {
    const url = absolute(base, path);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  const rfbModules = {};

  /**
   * noVNC's RFB class, imported once per base (cross-origin needs CORS on /static/, which it has).
   * A failed import is forgotten, so the next attempt fetches again (a network blip while some 50
   * modules load, e.g. Chromium's ERR_NETWORK_CHANGED, must not break the page for good).
   */
  function loadRFB(base, moduleUrl) {
    const url = moduleUrl || absolute(base, "/static/novnc/core/rfb.js").href;
    if (!rfbModules[url]) {
      const loading = import(url).then(function (module) {
        return module.default;
      });
      rfbModules[url] = loading;
      loading.catch(function () {
        if (rfbModules[url] === loading) {
          delete rfbModules[url];
        }
      });
    }
    return rfbModules[url];
  }

  /** loadRFB, tried again after 0.5, 1, 2 and 4 s; the last failure is thrown. */
  async function loadRFBPatiently(base, moduleUrl, signal) {
    for (let pause = 500; ; pause *= 2) {
      try {
        return await loadRFB(base, moduleUrl);
      } catch (error) {
        if (pause > 4000 || (signal && signal.aborted)) {
          throw error;
        }
        await sleep(pause, signal);
      }
    }
  }

  /**
   * The AudioWorklet processor: a jitter buffer of a few tens of ms.  Frames from the decoder are
   * queued; playback starts once target ms are queued; beyond max ms the oldest are dropped, so a
   * stall never turns into lasting delay; an underrun plays silence and refills to the target; a
   * queue that creeps up (the VM's sound card and this one run at slightly different rates: +0.3 ms
   * a second measured) loses a quiet frame now and then, so the delay stays near the target.
   * It posts the level (RMS of what it played) every levelMs (50 ms): the page's meter, the tests' ears.
   */
  const WORKLET = `
class VmcloudJitter extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.target = Math.round(sampleRate * (o.targetMs || 60) / 1000);
    this.max = Math.round(sampleRate * (o.maxMs || 200) / 1000);
    this.every = Math.round(sampleRate * (o.levelMs || 50) / 1000);
    this.slack = Math.round(sampleRate * 0.03);
    this.smoothed = 0;
    this.queue = [];
    this.queued = 0;
    this.offset = 0;
    this.playing = false;
    this.sum = 0;
    this.count = 0;
    this.dropped = 0;
    this.port.onmessage = (e) => {
      const frame = e.data;
      this.queue.push(frame);
      this.queued += frame[0].length;
      while (this.queued - this.offset > this.max && this.queue.length > 1) {
        const old = this.queue.shift();
        this.queued -= old[0].length;
        this.dropped += old[0].length;
      }
    };
  }
  quiet(frame) {
    let sum = 0;
    for (const v of frame[0]) sum += v * v;
    return sum / frame[0].length < 1e-5;
  }
  process(inputs, outputs) {
    const out = outputs[0];
    const n = out[0].length;
    if (!this.playing && this.queued - this.offset >= this.target) this.playing = true;
    // The sender's clock and ours differ a little (a few hundred ppm), so the queue creeps; when it
    // stays 30 ms over the target, a quiet frame is skipped (no click, as nothing is heard then).
    this.smoothed += (this.queued - this.offset - this.smoothed) * 0.01;
    if (this.playing && this.offset === 0 && this.queue.length > 1 && this.smoothed > this.target + this.slack
        && this.quiet(this.queue[0])) {
      const skipped = this.queue.shift();
      this.queued -= skipped[0].length;
      this.smoothed -= skipped[0].length;
      this.dropped += skipped[0].length;
    }
    for (let i = 0; i < n; i++) {
      let frame = this.queue[0];
      if (!this.playing || !frame) {
        this.playing = false;
        for (const ch of out) ch[i] = 0;
        continue;
      }
      for (let c = 0; c < out.length; c++) {
        const v = frame[Math.min(c, frame.length - 1)][this.offset];
        out[c][i] = v;
        if (c === 0) { this.sum += v * v; }
      }
      this.count++;
      this.offset++;
      if (this.offset >= frame[0].length) {
        this.queue.shift();
        this.queued -= frame[0].length;
        this.offset = 0;
      }
    }
    if (this.count >= this.every) {
      this.port.postMessage({ level: Math.sqrt(this.sum / this.count),
        buffered: (this.queued - this.offset) / sampleRate * 1000, dropped: this.dropped });
      this.sum = 0;
      this.count = 0;
    }
    return true;
  }
}
registerProcessor("vmcloud-jitter", VmcloudJitter);
`;

  /** Whether this browser decodes Opus with WebCodecs (else the sound comes as PCM). */
  async function opusDecodable() {
    if (typeof AudioDecoder === "undefined") {
      return false;
    }
    try {
      const support = await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: 48000, numberOfChannels: 2 });
      return !!support.supported;
    } catch (ignored) {
      return false;
    }
  }

  function decodeBase64(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) {
      bytes[i] = raw.charCodeAt(i);
    }
    return bytes;
  }

  /**
   * The VM's sound in this page: a WebSocket of Opus packets (WebCodecs) or PCM, into the jitter
   * worklet.  start() must run from a user gesture the first time (autoplay policy).
   */
  class SoundPlayer {
    constructor(url, options) {
      this.url = url;
      this.options = options;
      this.context = null;
      this.node = null;
      this.socket = null;
      this.decoder = null;
      this.level = 0;
      this.buffered = 0;
      this.codec = null;
      this.stopped = false;
      this.timestamp = 0;
      this.onLevel = options.onLevel || null;
    }

    async start() {
      if (!this.context) {
        this.context = new AudioContext({ sampleRate: 48000, latencyHint: "interactive" });
        const module = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
        await this.context.audioWorklet.addModule(module);
        URL.revokeObjectURL(module);
        this.node = new AudioWorkletNode(this.context, "vmcloud-jitter", {
          numberOfInputs: 0,
          outputChannelCount: [2],
          processorOptions: {
            targetMs: this.options.jitterMs || 60,
            maxMs: this.options.maxDelayMs || 200,
            levelMs: this.options.levelMs || 50,
          },
        });
        const self = this;
        this.node.port.onmessage = function (e) {
          self.level = e.data.level;
          self.buffered = e.data.buffered;
          if (self.onLevel) {
            self.onLevel(e.data);
          }
        };
        this.node.connect(this.context.destination);
        this.pcm = !(await opusDecodable());
        this.open();
      }
      if (this.context.state === "suspended") {
        await this.context.resume();
      }
      return this.context.state;
    }

    open() {
      if (this.stopped) {
        return;
      }
      const self = this;
      const socket = new WebSocket(this.url + (this.pcm ? "?format=pcm" : ""), ["binary"]);
      socket.binaryType = "arraybuffer";
      this.socket = socket;
      socket.onmessage = function (e) {
        if (typeof e.data === "string") {
          self.configure(JSON.parse(e.data));
        } else {
          self.feed(new Uint8Array(e.data));
        }
      };
      socket.onclose = function (e) {
        self.socket = null;
        if (!self.stopped && self.options.onClose) {
          self.options.onClose(e.code, e.reason);
        }
      };
    }

    configure(format) {
      if (format.type !== "format") {
        return;
      }
      this.codec = format.codec;
      this.channels = format.channels || 1;
      if (this.decoder) {
        this.decoder.close();
        this.decoder = null;
      }
      if (format.codec === "opus") {
        const node = this.node;
        this.decoder = new AudioDecoder({
          output: function (data) {
            const planes = [];
            for (let c = 0; c < data.numberOfChannels; c++) {
              const plane = new Float32Array(data.numberOfFrames);
              data.copyTo(plane, { planeIndex: c, format: "f32-planar" });
              planes.push(plane);
            }
            data.close();
            node.port.postMessage(planes, planes.map(function (p) { return p.buffer; }));
          },
          error: function (error) {
            if (typeof console !== "undefined") {
              console.warn("vmcloud: Opus decoder error", error);
            }
          },
        });
        this.decoder.configure({
          codec: "opus",
          sampleRate: format.sampleRate,
          numberOfChannels: format.channels,
          description: format.head ? decodeBase64(format.head) : undefined,
        });
        this.timestamp = 0;
      }
    }

    feed(bytes) {
      if (this.codec === "opus" && this.decoder && this.decoder.state === "configured") {
        this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: bytes }));
        this.timestamp += 20000;
      } else if (this.codec === "pcm") {
        const samples = new Int16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >> 1);
        const plane = new Float32Array(samples.length);
        for (let i = 0; i < samples.length; i++) {
          plane[i] = samples[i] / 32768;
        }
        this.node.port.postMessage([plane], [plane.buffer]);
      }
    }

    stop() {
      this.stopped = true;
      if (this.socket) {
        this.socket.close(1000);
      }
      if (this.decoder && this.decoder.state !== "closed") {
        this.decoder.close();
      }
      if (this.context) {
        this.context.close();
      }
    }
  }

  /**
   * handle.attach(element, options): the VM's screen (noVNC, scaled to element) and, with
   * options.audio, its sound.  Resolves to an Attachment once the screen is connecting:
   *
   *   const view = await vm.attach(document.getElementById("screen"), {
   *     audio: true,                 // play the VM's sound (needs one click: view.startSound())
   *     viewOnly: false,             // true: input is dropped by the controller too
   *     onState: (state, detail) => ...,  // "waiting" | "connecting" | "connected" | "reconnecting"
   *                                       // | "lost" (the VM died: detail.lost) | "ended" (released,
   *                                       // expired: detail.error) | "detached"
   *     onLevel: (report) => ...,    // {level, buffered, dropped} of the sound played, every levelMs
   *                                  // (default 50); jitterMs (60) and maxDelayMs (200) size its buffer
   *   });
   *   view.detach();
   *
   * The screen reconnects by itself after a network blip (1 s, doubling to 10 s) while the
   * handle holds its VM; it stops on a lost VM or an ended handle, and says so through onState.
   * options.signal (an AbortSignal) detaches too.
   */
  Handle.prototype.attach = async function (element, options) {
    options = options || {};
    const handle = this;
    const attachment = {
      state: "waiting",
      rfb: null,
      sound: null,
      detached: false,
      status: null,
      /** Disconnect the screen and the sound (the handle stays the application's to release). */
      detach: function () {
        if (!attachment.detached) {
          stop();
          setState("detached", {});
        }
      },
      /** Start (or resume) the sound: call it from a click or key handler the first time. */
      startSound: function () {
        return attachment.sound ? attachment.sound.start() : Promise.resolve("none");
      },
    };
    function stop() {
      attachment.detached = true;
      clearTimeout(attachment.timer);
      if (attachment.rfb) {
        attachment.rfb.disconnect();
      }
      if (attachment.sound) {
        attachment.sound.stop();
      }
      element.removeEventListener("pointerdown", gesture, true);
      element.removeEventListener("keydown", gesture, true);
    }
    function setState(state, detail) {
      attachment.state = state;
      if (options.onState) {
        options.onState(state, detail || {});
      }
    }
    function gesture() {
      if (attachment.sound && !attachment.detached) {
        attachment.sound.start().catch(function () {});
      }
    }
    if (options.signal) {
      options.signal.addEventListener("abort", attachment.detach);
    }
    setState("waiting", {});
    const status = await this.waitAssigned({ signal: options.signal, timeout: options.timeout });
    attachment.status = status;
    const RFB = await loadRFBPatiently(this.base, options.rfbModule, options.signal);
    let pause = 1000;

    /** After a disconnect: is the VM still ours?  Then come back, else say why not. */
    async function afterDisconnect() {
      let current;
      try {
        current = await handle.status();
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) {
          stop();
          setState("ended", { error: error });
          return;
        }
        current = null; // the controller is unreachable for now: try again
      }
      if (current && current.lost) {
        stop();
        setState("lost", { lost: current.lost });
        if (options.onLost) {
          options.onLost(current.lost);
        }
        return;
      }
      if (current && current.assigned) {
        attachment.status = current;
      }
      setState("reconnecting", { pause: pause });
      attachment.timer = setTimeout(connect, pause);
      pause = Math.min(pause * 2, 10000);
    }

    function connect() {
      if (attachment.detached) {
        return;
      }
      const vm = attachment.status.vm || {};
      // handle-status says where the console is (the controller's proxy path for this handle)
      const path = vm.console + (options.viewOnly ? "?view_only=1" : "");
      setState("connecting", {});
      const rfb = new RFB(element, socketUrl(handle.base, path), {
        credentials: { password: vm.vncPassword || "" },
        wsProtocols: ["binary"],
        shared: true,
      });
      rfb.scaleViewport = options.scale !== false;
      rfb.resizeSession = false;
      rfb.viewOnly = !!options.viewOnly;
      rfb.background = options.background || "#222";
      rfb.addEventListener("connect", function () {
        pause = 1000;
        setState("connected", {});
      });
      rfb.addEventListener("credentialsrequired", function () {
        rfb.sendCredentials({ password: (attachment.status.vm || {}).vncPassword || "" });
      });
      rfb.addEventListener("disconnect", function (e) {
        if (attachment.rfb === rfb) {
          attachment.rfb = null;
        }
        if (!attachment.detached) {
          afterDisconnect();
        }
      });
      attachment.rfb = rfb;
    }

    connect();
    const audioPath = (status.vm || {}).audio;
    if (options.audio && audioPath) {
      attachment.sound = new SoundPlayer(socketUrl(this.base, audioPath), {
        jitterMs: options.jitterMs,
        maxDelayMs: options.maxDelayMs,
        levelMs: options.levelMs,
        onLevel: options.onLevel,
        onClose: function () {
          // the screen's disconnect handling says why; the sound follows it back
          setTimeout(function () {
            if (!attachment.detached && attachment.state !== "lost" && attachment.sound) {
              attachment.sound.open();
            }
          }, 1000);
        },
      });
      element.addEventListener("pointerdown", gesture, true);
      element.addEventListener("keydown", gesture, true);
      attachment.sound.start().catch(function () {
        /* suspended until a gesture: startSound() or a click on the screen */
      });
    }
    return attachment;
  };

  /** The admin routes, for the operator's monitor page; every call sends the bearer token. */
  class Admin {
    constructor(base, token) {
      this.base = trimBase(base);
      this.token = token || "";
    }

    call(method, path, body) {
      const headers = this.token ? { Authorization: "Bearer " + this.token } : {};
      return call(this.base, method, path, { headers: headers, body: body });
    }

    allStatus() {
      return this.call("GET", "/all-status");
    }

    setPoolSize(min, max, lingerMs) {
      return this.call("POST", "/set-pool-size/" + min + "/" + max + "/" + lingerMs);
    }

    /** options: {cookies: [{name, value, domain, path, secure, httpOnly, expires}], window, audio}. */
    async prepareBatch(size, homepage, options) {
      const answer = await this.call("POST", "/prepare-batch/" + size + "/" + segment(homepage), options);
      return answer.batch;
    }

    async lock(batch) {
      const answer = await this.call("POST", "/lock/" + segment(batch));
      return answer.handle;
    }

    cancelBatch(batch) {
      return this.call("POST", "/cancel-batch/" + segment(batch));
    }

    shutdown() {
      return this.call("POST", "/shutdown");
    }
  }

  return {
    ApiError: ApiError,
    LostError: LostError,
    TimeoutError: TimeoutError,
    Handle: Handle,
    Admin: Admin,
    handle: function (base, handle) {
      return new Handle(base, handle);
    },
    admin: function (base, token) {
      return new Admin(base, token);
    },
  };
});
