// Drives static/vmcloud.js against a live API (argv: base URL, admin token, path to vmcloud.js),
// then drives the handle loops against a scripted fetch for the outcomes a live pool is slow to
// show (a lost VM, a timeout, network errors, 5xx), and prints one JSON object of what it saw,
// for tests/api/test_static.py to check.
"use strict";

const [base, token, library] = process.argv.slice(2);
const vmcloud = require(library);

async function main() {
  const seen = {};
  const admin = vmcloud.admin(base, token);
  seen.batch = await admin.prepareBatch(2, "https://example.com/a%20b?x=1&y=%2F#top", {
    cookies: [{ name: "sid", value: "v" }],
    audio: true,
  });
  seen.handle = await admin.lock(seen.batch);
  try {
    await vmcloud.admin(base, "wrong").allStatus();
    seen.wrongToken = "accepted";
  } catch (error) {
    seen.wrongToken = { isApiError: error instanceof vmcloud.ApiError, status: error.status, code: error.code };
  }

  const vm = vmcloud.handle(base + "/", seen.handle);
  seen.status = await vm.waitAssigned({ interval: 20 });
  await vm.renewExpire(1500.7);
  seen.events = [];
  await new Promise((resolve) => {
    const follow = vm.followEvents(
      (event) => {
        seen.events.push(event);
        follow.stop();
      },
      { wait: 2, onEnd: (error) => { seen.followEnd = error === null ? "stopped" : error.code; resolve(); } },
    );
  });
  await vm.release();
  try {
    await vm.status();
    seen.afterRelease = "still known";
  } catch (error) {
    seen.afterRelease = error.code;
  }
  seen.scripted = await scripted();
  const hung = Object.keys(seen.scripted).filter((name) => seen.scripted[name].hung);
  // A loop that never ended keeps node alive: say so and leave; otherwise node ends by itself
  // once nothing is pending (no timer or request left behind).
  process.stdout.write(JSON.stringify(seen), () => hung.length && process.exit(0));
}

// A fetch answering from a script, one step per request (the last step repeats): an object is a
// 200 JSON answer, [status, object] an error answer, an Error a network failure (fetch rejects),
// "hang" a request that never answers and ignores its signal.  fake.asked lists the URLs.
function scriptedFetch(script) {
  const asked = [];
  const fake = async function (url, init) {
    asked.push(url);
    const step = script.length > 1 ? script.shift() : script[0];
    if (step === "hang") {
      return new Promise(() => {});
    }
    if (step instanceof Error) {
      throw step;
    }
    if (init && init.signal && init.signal.aborted) {
      throw new DOMException("aborted", "AbortError");
    }
    const [status, body] = Array.isArray(step) ? step : [200, step];
    return new Response(JSON.stringify(body), { status: status, headers: { "Content-Type": "application/json" } });
  };
  fake.asked = asked;
  return fake;
}

// What a promise came to, as JSON-friendly data; "hung" if it took more than 2 s (a loop that
// never ends must fail the check, not hang it).
async function outcome(promise) {
  const started = Date.now();
  let timer;
  const hung = new Promise((resolve) => {
    timer = setTimeout(() => resolve({ hung: true }), 2000);
  });
  const result = await Promise.race([
    promise.then(
      (value) => ({ value: value }),
      (error) => ({
        error: {
          name: error.name,
          status: error.status,
          code: error.code,
          lost: error.lost,
          timeout: error.timeout,
          isApiError: error instanceof vmcloud.ApiError,
          isLostError: Boolean(vmcloud.LostError) && error instanceof vmcloud.LostError,
          isTimeoutError: Boolean(vmcloud.TimeoutError) && error instanceof vmcloud.TimeoutError,
        },
      }),
    ),
    hung,
  ]);
  clearTimeout(timer);
  result.ms = Date.now() - started;
  return result;
}

async function scripted() {
  const realFetch = globalThis.fetch;
  const found = {};
  const vm = vmcloud.handle("http://vmcloud.test", "h1");
  const run = async (name, script, act) => {
    const fake = scriptedFetch(script);
    globalThis.fetch = fake;
    try {
      found[name] = await outcome(act());
    } finally {
      globalThis.fetch = realFetch;
    }
    found[name].asked = fake.asked.length;
  };
  const lost = { vmid: "vm3", reason: "the server vanished", time: 1796410000123 };
  await run("lost", [{ assigned: false }, { assigned: false, lost: lost }], () => vm.waitAssigned({ interval: 1 }));
  await run("timeout", [{ assigned: false }], () => vm.waitAssigned({ interval: 5, timeout: 60 }));
  await run("hungTimeout", ["hang"], () => vm.waitAssigned({ timeout: 30 }));
  const errors = [];
  await run(
    "retried",
    [
      new TypeError("fetch failed"),
      new TypeError("fetch failed"),
      [503, { error: "internal", message: "restarting" }],
      { assigned: false },
      { assigned: true, vmid: "vm7" },
    ],
    () => vm.waitAssigned({ interval: 1, retryPause: 2, onError: (error) => errors.push(error.name) }),
  );
  found.retried.errors = errors;
  await run("unknown", [[404, { error: "unknown-handle", message: "no handle h1" }]], () =>
    vm.waitAssigned({ interval: 1, retryPause: 1 }),
  );
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 30);
  await run("aborted", [{ assigned: false }], () => vm.waitAssigned({ interval: 1000, signal: controller.signal }));

  const followErrors = [];
  await run(
    "follow",
    [
      new TypeError("fetch failed"),
      { lastId: 1 },
      [502, { error: "bad-gateway", message: "proxy" }],
      { lastId: 2, newEvents: [{ id: 2, time: 1.5, data: { action: "page-load" } }] },
      [404, { error: "unknown-handle", message: "released" }],
    ],
    () =>
      new Promise((resolve) => {
        const events = [];
        vm.followEvents((event) => events.push(event.id), {
          retryPause: 1,
          onError: (error) => followErrors.push(error.name),
          onEnd: (error) => resolve({ events: events, end: error && error.code }),
        });
      }),
  );
  found.follow.errors = followErrors;
  return found;
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error));
  process.exit(1);
});
