// Drives static/vmcloud.js against a live API (argv: base URL, admin token, path to vmcloud.js)
// and prints one JSON object of what it saw, for tests/api/test_static.py to check.
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
  process.stdout.write(JSON.stringify(seen));
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error));
  process.exit(1);
});
