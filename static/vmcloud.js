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
 *   const status = await vm.waitAssigned();           // {assigned: true, vmid, vm: {...}, ...}
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

  function sleep(ms, signal) {
    return new Promise(function (resolve) {
      const timer = setTimeout(resolve, ms);
      if (signal) {
        signal.addEventListener("abort", function () {
          clearTimeout(timer);
          resolve();
        });
      }
    });
  }

  /** A VM handle, as a worker page uses it. */
  class Handle {
    constructor(base, handle) {
      this.base = trimBase(base);
      this.handle = String(handle);
    }

    /** {assigned: false} or {assigned: true, vmid, vm: {...}, expires, expireTime}. */
    status(signal) {
      return call(this.base, "GET", "/handle-status/" + segment(this.handle), { signal: signal });
    }

    /** Poll handle-status until the handle has a VM (a lock may wait for a READY VM). */
    async waitAssigned(options) {
      options = options || {};
      const interval = options.interval || 1000;
      for (;;) {
        if (options.signal && options.signal.aborted) {
          throw new Error("aborted");
        }
        const status = await this.status(options.signal);
        if (status.assigned) {
          return status;
        }
        await sleep(interval, options.signal);
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
     * Network errors and 5xx answers are retried with a growing pause (up to 30 s); a 4xx (the
     * handle was released or expired) ends the loop and calls options.onEnd(error).
     * Returns {stop(), done}: done resolves when the loop has ended.
     */
    followEvents(onEvent, options) {
      options = options || {};
      const controller = new AbortController();
      const self = this;
      const done = (async function () {
        let lastId = options.lastId;
        let pause = 1000;
        while (!controller.signal.aborted) {
          try {
            if (lastId === undefined) {
              lastId = await self.lastEventId();
            }
            const answer = await self.fetchEvents(lastId, options.wait, controller.signal);
            for (const event of answer.newEvents) {
              onEvent(event);
            }
            lastId = answer.lastId;
            pause = 1000;
          } catch (error) {
            if (controller.signal.aborted) {
              break;
            }
            if (error instanceof ApiError && error.status < 500) {
              if (options.onEnd) {
                options.onEnd(error);
              }
              return;
            }
            if (options.onError) {
              options.onError(error);
            }
            await sleep(pause, controller.signal);
            pause = Math.min(pause * 2, 30000);
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
