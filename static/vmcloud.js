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
