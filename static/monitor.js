/*
 * vmcloud monitor (static/monitor.html): the operator's live view of the pool.
 *
 * Following the pool: GET /all-status answers carry a state version; the page asks again with
 * ?since=<version>&wait=25, which the controller answers as soon as the version moves (a long poll:
 * changes show within a round trip, and an idle pool costs one request every 25 s).  A controller
 * whose answers carry no version is polled every 2 s instead.
 *
 * Drawing: every table is keyed (a VM by vmid, a handle by token...): an update patches the cells
 * whose text changed, moves rows only when the order changed, and adds or removes only the rows that
 * came or went.  The VM table filters, sorts and pages in memory, so only one page of rows (100 by
 * default) is ever in the document, whatever the pool's size.  Ages ("12 s ago") are kept fresh by a
 * one-second tick over the <time> elements on screen; the local clock time is their tooltip.
 *
 * Screens: a VM whose guest has "vnc" (FREE, WAIT, READY or OCCUPIED) shows a thumbnail from
 * GET /console/vm/{vmid}/screen.png, refreshed every few seconds while its row is on screen (two
 * requests at most in flight).  A click opens the live console, view only: noVNC over
 * /console/vm/{vmid}, where the controller logs in to the VM itself (with the operator's view-only
 * password its guest told it) and lets the page in with no password at all.  A console cut while
 * watching (a worker's release closes every viewer) comes back by itself; a VM the controller
 * cannot log in to (an older guest's FREE VM) says so, and a page without noVNC shows stills.
 *
 * Messages (errors included) stay until dismissed; the connection's state lives in the header.
 * For tests and curious operators, window.monitor holds the page's view (version, timings...).
 */
(function () {
  "use strict";

  const TOKEN_KEY = "vmcloud.token";
  const LONG_POLL_S = 25;
  const POLL_MS = 2000;
  const THUMB_EVERY_MS = 5000;
  const THUMB_PARALLEL = 2;
  const THUMB_WIDTH = 240;
  const STATES = ["CREATING", "BOOTING", "FREE", "WAIT", "READY", "OCCUPIED", "ERROR", "KILLING"];
  const DEAD = new Set(["ERROR", "KILLING"]);
  const SCREEN = new Set(["FREE", "WAIT", "READY", "OCCUPIED"]); // a guest that said HELLO, alive

  const $ = function (id) { return document.getElementById(id); };

  /** A text's sort key: lower case, digit runs zero-padded, so "vm9" < "vm10" with a plain compare. */
  function sortText(value) {
    return String(value).toLowerCase().replace(/\d+/g, function (digits) {
      return digits.length >= 15 ? digits : "000000000000000".slice(digits.length) + digits;
    });
  }

  const monitor = {
    version: null, updates: 0, timings: [], status: null, mode: "connecting", errors: 0,
  };
  window.monitor = monitor;

  // ------------------------------------------------------------------ talking to the controller

  let token = localStorage.getItem(TOKEN_KEY) || "";

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message + " (" + status + (code ? " " + code : "") + ")");
      this.name = "ApiError";
      this.status = status;
      this.code = code;
    }
  }

  /** One request with the admin token; JSON, text, a Blob (as: "blob") or null (204/202). */
  async function api(method, path, options) {
    options = options || {};
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const init = { method: method, headers: headers, signal: options.signal, cache: "no-store" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, init);
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok) {
      let code = "";
      let message = response.statusText || "request failed";
      if (type.indexOf("application/json") === 0) {
        try {
          const error = await response.json();
          code = error.error || code;
          message = error.message || message;
        } catch (ignored) { /* the status line says enough */ }
      }
      throw new ApiError(response.status, code, message);
    }
    if (options.as === "blob") return response.blob();
    if (response.status === 204 || response.status === 202) return null;
    if (type.indexOf("application/json") !== 0) return response.text();
    const body = await response.text();
    const parsing = performance.now();
    const parsed = JSON.parse(body);
    if (options.timed) monitor.parseMs = performance.now() - parsing;
    return parsed;
  }

  function seg(value) { return encodeURIComponent(String(value)); }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  // ------------------------------------------------------------------ messages

  const messageBox = $("messages");
  const shown = new Map(); // kind + text -> {node, count}

  /** A message that stays until its × is clicked; the same text again counts up instead of piling. */
  function say(kind, text) {
    const key = kind + "\n" + text;
    const when = new Date().toLocaleTimeString();
    const old = shown.get(key);
    if (old) {
      old.count += 1;
      old.times.textContent = "×" + old.count;
      old.when.textContent = when;
      messageBox.prepend(old.node);
      return old.node;
    }
    const node = el("div", "msg " + kind);
    node.setAttribute("role", kind === "error" ? "alert" : "status");
    const body = el("span", "text", text);
    const stamp = el("span", "when", when);
    const times = el("span", "times", "");
    const close = el("button", "", "×");
    close.type = "button";
    close.title = "dismiss";
    close.setAttribute("aria-label", "dismiss");
    close.addEventListener("click", function () {
      node.remove();
      shown.delete(key);
    });
    node.append(body, times, stamp, close);
    messageBox.prepend(node);
    shown.set(key, { node: node, count: 1, times: times, when: stamp });
    return node;
  }

  function failed(what, error) {
    say("error", what + " failed: " + (error && error.message ? error.message : String(error)));
  }

  /** Run an admin action; its outcome becomes a message; the next update shows its effect. */
  async function act(what, action) {
    try {
      const result = await action();
      say("ok", what + ": done" + (result !== null && result !== undefined && result !== "" ?
        " (" + (typeof result === "object" ? JSON.stringify(result) : result) + ")" : ""));
    } catch (error) {
      failed(what, error);
    }
  }

  // ------------------------------------------------------------------ small DOM helpers and time

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  let skew = 0; // the controller's clock minus ours (its "time" field), so ages use its clock

  function age(ms) {
    const s = Math.round((Date.now() + skew - ms) / 1000);
    const a = Math.abs(s);
    let text;
    if (a < 60) text = a + " s";
    else if (a < 3600) text = Math.floor(a / 60) + " min";
    else if (a < 86400) text = Math.floor(a / 3600) + " h " + Math.floor((a % 3600) / 60) + " min";
    else text = Math.floor(a / 86400) + " d " + Math.floor((a % 86400) / 3600) + " h";
    return s >= 0 ? text + " ago" : "in " + text;
  }

  function clockTime(ms) { return new Date(ms - skew).toLocaleString(); }

  /** A <time> showing an age, with the local clock time on hover; the tick keeps it fresh. */
  function timeNode(ms) {
    const node = el("time");
    if (ms === null || ms === undefined || ms <= 0) {
      node.textContent = "–";
      return node;
    }
    node.dataset.ms = String(ms);
    node.textContent = age(ms);
    return node; // its title, the local clock time, is set when the pointer comes (see below)
  }

  document.addEventListener("mouseover", function (event) {
    const node = event.target.closest && event.target.closest("time[data-ms]");
    if (node) node.title = clockTime(Number(node.dataset.ms));
  });

  function tick() {
    const nodes = document.querySelectorAll("time[data-ms]");
    for (let i = 0; i < nodes.length; i++) {
      const text = age(Number(nodes[i].dataset.ms));
      if (nodes[i].textContent !== text) nodes[i].textContent = text;
    }
    showUpdated();
  }

  function text(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) return value.join(", ");
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // ------------------------------------------------------------------ keyed tables

  /**
   * A table whose rows are keyed: update(rows) patches what changed.  Columns:
   * {id, label, value(row) -> sort value and (by default) text, kind: "text" | "num" | "mono" |
   *  "time" | "custom", sig(row) and render(td, row) for custom cells, sort: false to forbid}.
   */
  class KeyedTable {
    constructor(table, columns, options) {
      this.table = table;
      this.body = table.tBodies[0];
      this.columns = columns;
      this.key = options.key;
      this.pageSize = options.pageSize || 0; // 0: every row
      this.page = 0;
      this.filter = null;
      this.sortBy = options.sortBy || null;
      this.sortDir = options.sortDir || 1;
      this.empty = options.empty || "none";
      this.rows = new Map(); // key -> {tr, cells, sigs, data}
      this.total = 0;
      this.shownRows = [];
      this.emptyRow = null;
      this._head();
    }

    _head() {
      const tr = el("tr");
      const self = this;
      this.heads = this.columns.map(function (column) {
        const th = el("th", column.sort === false ? "nosort" : "", column.label);
        if (column.sort !== false) {
          th.tabIndex = 0;
          th.title = "sort by " + (column.label || column.id);
          const sort = function () { self.sortOn(column.id); };
          th.addEventListener("click", sort);
          th.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(); });
        }
        tr.appendChild(th);
        return th;
      });
      this.table.tHead.appendChild(tr);
      this._sortMarks();
    }

    _sortMarks() {
      const self = this;
      this.columns.forEach(function (column, i) {
        if (column.id === self.sortBy) {
          self.heads[i].setAttribute("aria-sort", self.sortDir > 0 ? "ascending" : "descending");
        } else {
          self.heads[i].removeAttribute("aria-sort");
        }
      });
    }

    sortOn(id) {
      this.sortDir = this.sortBy === id ? -this.sortDir : 1;
      this.sortBy = id;
      this._sortMarks();
      this.onChange();
    }

    onChange() { /* set by the owner: redraw from the last data */ }

    /** The rows to show, in order: filtered, sorted, one page. */
    _select(list) {
      let rows = this.filter ? list.filter(this.filter) : list.slice();
      const column = this.columns.find((c) => c.id === this.sortBy);
      if (column) {
        const dir = this.sortDir;
        const keyed = rows.map(function (row) {
          let v = column.value(row);
          if (v === undefined || v === "") v = null;
          else if (v !== null && typeof v !== "number") v = sortText(v);
          return { v: v, row: row };
        });
        keyed.sort(function (a, b) {
          if (a.v === b.v) return 0;
          if (a.v === null) return 1; // empty cells last, whichever the direction
          if (b.v === null) return -1;
          if (typeof a.v === "number" && typeof b.v === "number") return (a.v - b.v) * dir;
          return (String(a.v) < String(b.v) ? -1 : 1) * dir;
        });
        rows = keyed.map(function (k) { return k.row; });
      }
      this.total = rows.length;
      if (this.pageSize > 0) {
        const pages = Math.max(1, Math.ceil(rows.length / this.pageSize));
        this.page = Math.min(this.page, pages - 1);
        rows = rows.slice(this.page * this.pageSize, (this.page + 1) * this.pageSize);
      }
      return rows;
    }

    update(list) {
      const rows = this._select(list || []);
      this.shownRows = rows;
      const keep = new Set();
      for (let i = 0; i < rows.length; i++) {
        const k = this.key(rows[i]);
        keep.add(k);
        let entry = this.rows.get(k);
        if (!entry) {
          entry = this._create(k);
          this.rows.set(k, entry);
        }
        this._patch(entry, rows[i]);
      }
      for (const [k, entry] of this.rows) {
        if (!keep.has(k)) {
          entry.tr.remove();
          this.rows.delete(k);
          if (this.onRemove) this.onRemove(k, entry);
        }
      }
      // order: walk the body, moving a row only where it is not already in place
      let cursor = this.body.firstChild;
      if (cursor === this.emptyRow && cursor) cursor = cursor.nextSibling;
      for (let i = 0; i < rows.length; i++) {
        const tr = this.rows.get(this.key(rows[i])).tr;
        if (tr === cursor) {
          cursor = cursor.nextSibling;
        } else {
          this.body.insertBefore(tr, cursor);
        }
      }
      this._empty(rows.length === 0);
    }

    _empty(isEmpty) {
      if (isEmpty && !this.emptyRow) {
        this.emptyRow = el("tr", "empty");
        const td = el("td", "", this.empty);
        td.colSpan = this.columns.length;
        this.emptyRow.appendChild(td);
        this.body.appendChild(this.emptyRow);
      } else if (!isEmpty && this.emptyRow) {
        this.emptyRow.remove();
        this.emptyRow = null;
      }
    }

    _create(k) {
      const tr = el("tr");
      tr.dataset.key = k;
      const cells = this.columns.map(function (column) {
        const td = el("td", column.kind === "num" || column.kind === "mono" ? column.kind : column.className || "");
        tr.appendChild(td);
        return td;
      });
      return { key: k, tr: tr, cells: cells, sigs: new Array(this.columns.length), data: null };
    }

    _patch(entry, row) {
      entry.data = row;
      const columns = this.columns;
      for (let i = 0; i < columns.length; i++) {
        const column = columns[i];
        const td = entry.cells[i];
        if (column.kind === "custom") {
          const sig = column.sig(row);
          if (entry.sigs[i] !== sig) {
            entry.sigs[i] = sig;
            column.render(td, row, entry);
          }
        } else if (column.kind === "time") {
          const ms = column.value(row);
          const sig = ms === null || ms === undefined ? "" : String(ms);
          if (entry.sigs[i] !== sig) {
            entry.sigs[i] = sig;
            td.replaceChildren(timeNode(ms));
          }
        } else {
          const full = text(column.value(row));
          const value = column.text ? column.text(row) : full;
          if (entry.sigs[i] !== full + "\n" + value) {
            entry.sigs[i] = full + "\n" + value;
            td.textContent = value;
            td.title = full.length > 24 || full !== value ? full : ""; // the whole text, where cut
          }
        }
      }
    }
  }

  function stateBadge(td, row) {
    const badge = el("span", "badge s-" + row.state, row.state);
    td.replaceChildren(badge);
    if (row.recovering) td.appendChild(el("span", "tag", "recovering"));
    if (row.outdated) {  // booted from another image than new VMs: retired as replacements come up
      const old = el("span", "tag", "old");
      old.title = "booted from " + row.image + "; new VMs boot from another image";
      td.appendChild(old);
    }
  }

  function button(label, action, key, title) {
    const b = el("button", "link", label);
    b.type = "button";
    b.dataset.action = action;
    b.dataset.key = key;
    if (title) b.title = title;
    return b;
  }

  // ------------------------------------------------------------------ the tables of the page

  function hasScreen(vm) {
    return (vm.capabilities || []).indexOf("vnc") >= 0 && SCREEN.has(vm.state);
  }

  const vmTable = new KeyedTable($("vms"), [
    { id: "screen", label: "screen", kind: "custom", sort: false, className: "screen",
      sig: function (vm) { return hasScreen(vm) && thumbsOn() ? "live" : (vm.capabilities || []).indexOf("vnc") >= 0 ? "vnc " + vm.state + " " + thumbsOn() : "-"; },
      render: function (td, vm, entry) { thumbs.cell(td, vm, entry); } },
    { id: "vmid", label: "vmid", kind: "mono", value: function (vm) { return vm.vmid; } },
    { id: "state", label: "state", kind: "custom", value: function (vm) { return STATES.indexOf(vm.state); },
      sig: function (vm) { return vm.state + (vm.recovering ? "+r" : "") + (vm.outdated ? "+o" : ""); },
      render: stateBadge },
    { id: "since", label: "state since", kind: "time", value: function (vm) { return vm.since || null; } },
    { id: "batch", label: "batch", kind: "mono", value: function (vm) { return vm.batch; } },
    { id: "handle", label: "handle", kind: "mono", value: function (vm) { return vm.handle; },
      text: function (vm) { return vm.handle ? vm.handle.slice(0, 10) + "…" : ""; } },
    { id: "ip", label: "ip", kind: "mono", value: function (vm) { return vm.ip; } },
    { id: "capabilities", label: "has", value: function (vm) { return text(vm.capabilities); } },
    { id: "lastUsed", label: "last used", kind: "time", value: function (vm) { return vm.lastUsed || null; } },
    { id: "server", label: "server", kind: "mono", value: function (vm) { return vm.serverId; } },
    { id: "reason", label: "reason", value: function (vm) { return vm.reason; } },
    { id: "actions", label: "", kind: "custom", sort: false,
      sig: function (vm) { return vm.vmid + "|" + hasScreen(vm) + "|" + DEAD.has(vm.state); },
      render: function (td, vm) {
        td.replaceChildren();
        if (hasScreen(vm)) td.appendChild(button("watch", "watch", vm.vmid, "watch its screen live"));
        if (!DEAD.has(vm.state)) td.appendChild(button("terminate", "terminate", vm.vmid, "terminate this VM"));
      } },
  ], { key: function (vm) { return vm.vmid; }, pageSize: 100, sortBy: "vmid", empty: "no VMs" });

  const batchTable = new KeyedTable($("batches"), [
    { id: "id", label: "batch", kind: "mono", value: function (b) { return b.id; } },
    { id: "size", label: "size", kind: "num", value: function (b) { return b.size; } },
    { id: "homepage", label: "homepage", value: function (b) { return b.homepage; } },
    { id: "ready", label: "ready", kind: "num", value: function (b) { return b.ready; } },
    { id: "preparing", label: "preparing", kind: "num", value: function (b) { return b.preparing; } },
    { id: "occupied", label: "occupied", kind: "num", value: function (b) { return b.occupied; } },
    { id: "pendingLocks", label: "waiting locks", kind: "num", value: function (b) { return b.pendingLocks; } },
    { id: "createdAt", label: "created", kind: "time", value: function (b) { return b.createdAt || null; } },
    { id: "cancelled", label: "", kind: "custom", value: function (b) { return b.cancelled ? 1 : 0; },
      sig: function (b) { return b.id + "|" + !!b.cancelled; },
      render: function (td, b) {
        td.replaceChildren(b.cancelled ? el("span", "tag", "cancelled") : button("cancel", "cancel-batch", b.id, "no new locks from this batch"));
      } },
  ], { key: function (b) { return String(b.id); }, sortBy: "createdAt", empty: "no batches" });

  const handleTable = new KeyedTable($("handles"), [
    { id: "handle", label: "handle", kind: "mono", value: function (h) { return h.handle; },
      text: function (h) { return h.handle.slice(0, 12) + "…"; } },
    { id: "batch", label: "batch", kind: "mono", value: function (h) { return h.batch; } },
    { id: "vmid", label: "vmid", kind: "mono", value: function (h) { return h.vmid; } },
    { id: "createdAt", label: "created", kind: "time", value: function (h) { return h.createdAt || null; } },
    { id: "expireTime", label: "expires", kind: "time", value: function (h) { return h.expireTime || null; } },
    { id: "lost", label: "lost", value: function (h) { return h.lost; } },
    { id: "events", label: "events", kind: "num", value: function (h) { return h.events; },
      text: function (h) { return text(h.events) + (h.droppedEvents ? " (" + h.droppedEvents + " dropped)" : ""); } },
    { id: "actions", label: "", kind: "custom", sort: false, sig: function (h) { return h.handle; },
      render: function (td, h) {
        td.replaceChildren(button("events", "events", h.handle, "its page events"),
          button("release", "release", h.handle, "release: the VM is cleaned and reused"));
      } },
  ], { key: function (h) { return h.handle; }, sortBy: "createdAt", empty: "no handles" });

  const prepTable = new KeyedTable($("preps"), [
    { id: "batch", label: "batch", kind: "mono", value: function (p) { return p.batch; } },
    { id: "vmid", label: "vmid", kind: "mono", value: function (p) { return p.vmid; } },
    { id: "state", label: "state", value: function (p) { return p.state; } },
    { id: "since", label: "since", kind: "time", value: function (p) { return p.since || null; } },
  ], { key: function (p) { return p.key; }, empty: "no preparations" });

  const lockTable = new KeyedTable($("locks"), [
    { id: "handle", label: "handle", kind: "mono", value: function (p) { return p.handle; },
      text: function (p) { return String(p.handle).slice(0, 12) + "…"; } },
    { id: "batch", label: "batch", kind: "mono", value: function (p) { return p.batch; } },
    { id: "since", label: "waiting since", kind: "time", value: function (p) { return p.since || null; } },
  ], { key: function (p) { return p.handle; }, sortBy: "since", empty: "no locks waiting" });

  // ------------------------------------------------------------------ the VM table's controls

  const filterInput = $("vm-filter");
  const stateSelect = $("vm-state");
  const pageSize = $("page-size");
  STATES.forEach(function (s) { stateSelect.appendChild(el("option", "", s)); });

  function vmFilter() {
    const words = filterInput.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const state = stateSelect.value;
    if (!words.length && !state) return null;
    return function (vm) {
      if (state && vm.state !== state) return false;
      if (!words.length) return true;
      const hay = (vm.vmid + " " + vm.state + " " + (vm.batch || "") + " " + (vm.handle || "") + " " + (vm.ip || "") +
        " " + (vm.mac || "") + " " + (vm.serverId || "") + " " + (vm.identity || "") + " " + (vm.reason || "") +
        " " + text(vm.capabilities) + " " + (vm.image || "") + (vm.outdated ? " outdated" : "")).toLowerCase();
      for (let i = 0; i < words.length; i++) if (hay.indexOf(words[i]) < 0) return false;
      return true;
    };
  }

  function refilter() {
    vmTable.filter = vmFilter();
    vmTable.page = 0;
    redraw();
  }

  let filterTimer = null;
  filterInput.addEventListener("input", function () {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(refilter, 120);
  });
  stateSelect.addEventListener("change", refilter);
  pageSize.addEventListener("change", function () {
    vmTable.pageSize = Number(pageSize.value);
    vmTable.page = 0;
    redraw();
  });
  $("page-prev").addEventListener("click", function () {
    if (vmTable.page > 0) { vmTable.page -= 1; redraw(); }
  });
  $("page-next").addEventListener("click", function () {
    if ((vmTable.page + 1) * vmTable.pageSize < vmTable.total) { vmTable.page += 1; redraw(); }
  });
  $("thumbs-on").addEventListener("change", redraw);
  [vmTable, batchTable, handleTable, prepTable, lockTable].forEach(function (t) { t.onChange = redraw; });

  function thumbsOn() { return $("thumbs-on").checked; }

  // ------------------------------------------------------------------ drawing an answer

  function redraw() {
    if (monitor.status) draw(monitor.status);
  }

  function draw(s) {
    const started = performance.now();
    const vms = Array.isArray(s.vms) ? s.vms : [];
    drawCounts(vms);
    drawCapacity(s, vms);
    drawHealth(s.cloud, s.reconciler);
    drawPoolForm(s.poolSize || {});
    vmTable.update(vms);
    $("vms-count").textContent = "(" + vms.length + (vmTable.filter ? ", " + vmTable.total + " shown" : "") + ")";
    const first = vmTable.total ? vmTable.page * vmTable.pageSize + 1 : 0;
    $("page-info").textContent = first + "–" + Math.min(vmTable.total, (vmTable.page + 1) * vmTable.pageSize) +
      " of " + vmTable.total;
    batchTable.update(s.batches || []);
    $("batches-count").textContent = "(" + (s.batches || []).length + ")";
    handleTable.update(s.handles || []);
    $("handles-count").textContent = "(" + (s.handles || []).length + ")";
    const preps = (s.preps || []).map(function (p, i) {
      return Object.assign({ key: p.vmid ? "vm:" + p.vmid : "q:" + p.batch + ":" + i }, p);
    });
    prepTable.update(preps);
    $("preps-count").textContent = "(" + preps.length + ")";
    lockTable.update(s.pendingLocks || []);
    $("locks-count").textContent = "(" + (s.pendingLocks || []).length + ")";
    const patched = performance.now();
    void document.body.offsetHeight; // the layout this update costs, counted here and not hidden in the next frame
    const laidOut = performance.now();
    monitor.timings.push({ version: s.version, vms: vms.length, update: patched - started, total: laidOut - started,
      parse: monitor.parseMs });
    monitor.parseMs = null; // a redraw from memory (sort, filter, page) parsed nothing
    if (monitor.timings.length > 200) monitor.timings.shift();
    thumbs.schedule();
  }

  const countButtons = {};
  (function () {
    const box = $("counts");
    ["ALL"].concat(STATES).forEach(function (state) {
      const b = el("button", "");
      b.type = "button";
      b.dataset.state = state;
      const badge = el("span", state === "ALL" ? "" : "badge s-" + state, state === "ALL" ? "all" : state);
      const n = el("b", "", "0");
      b.append(badge, n);
      b.title = state === "ALL" ? "show every VM" : "show only " + state + " VMs";
      b.addEventListener("click", function () {
        stateSelect.value = state === "ALL" || stateSelect.value === state ? "" : state;
        refilter();
      });
      box.appendChild(b);
      countButtons[state] = { button: b, count: n };
    });
  })();

  function drawCounts(vms) {
    const counts = { ALL: vms.length };
    STATES.forEach(function (state) { counts[state] = 0; });
    for (let i = 0; i < vms.length; i++) counts[vms[i].state] = (counts[vms[i].state] || 0) + 1;
    Object.keys(countButtons).forEach(function (state) {
      const entry = countButtons[state];
      const n = String(counts[state] || 0);
      if (entry.count.textContent !== n) entry.count.textContent = n;
      entry.button.classList.toggle("zero", n === "0");
      entry.button.classList.toggle("active", state === (stateSelect.value || "ALL"));
    });
    monitor.counts = counts;
  }

  function drawCapacity(s, vms) {
    const size = s.poolSize || {};
    const counts = monitor.counts;
    const alive = vms.length - (counts.ERROR || 0) - (counts.KILLING || 0);
    const max = size.effectiveMax !== undefined ? size.effectiveMax : size.max || 0;
    const min = size.effectiveMin !== undefined ? size.effectiveMin : size.min || 0;
    const cap = size.maxPoolSize || max;
    const scale = Math.max(1, cap, max, vms.length);
    const bar = $("gauge").querySelector(".bar");
    const segments = STATES.filter(function (state) { return counts[state]; });
    const wanted = segments.map(function (state) { return state + counts[state]; }).join(" ");
    if (bar.dataset.sig !== wanted + "/" + scale) {
      bar.dataset.sig = wanted + "/" + scale;
      bar.replaceChildren.apply(bar, segments.map(function (state) {
        const part = el("span", "seg-" + state);
        part.style.width = (100 * counts[state] / scale) + "%";
        part.title = counts[state] + " " + state;
        return part;
      }));
    }
    $("gauge").querySelector(".mark.max").style.left = "calc(" + (100 * max / scale) + "% - 1px)";
    $("gauge").querySelector(".mark.min").style.left = "calc(" + (100 * min / scale) + "% - 1px)";
    $("gauge").setAttribute("aria-label", alive + " VMs of at most " + max);
    setText($("gauge-text"), alive + " VMs of at most " + max + (cap && cap !== max ? " (hard cap " + cap + ")" : "") +
      (vms.length > alive ? ", " + (vms.length - alive) + " on their way out" : ""));
    let sizeText = "asked: min " + text(size.min) + ", max " + text(size.max) + ", linger " + text(size.linger) + " ms";
    if (s.shuttingDown) sizeText = "shutting down: every VM goes, the pool holds 0 until the next set-pool-size (" + sizeText + ")";
    else if (size.effectiveMin !== undefined && (size.effectiveMin !== size.min || size.effectiveMax !== size.max)) {
      sizeText += "; in force: min " + size.effectiveMin + ", max " + size.effectiveMax;
    }
    setText($("size-text"), sizeText);
  }

  function setText(node, value) {
    if (node.textContent !== value) node.textContent = value;
  }

  function keyValues(box, pairs) {
    const sig = JSON.stringify(pairs);
    if (box.dataset.sig === sig) return;
    box.dataset.sig = sig;
    box.replaceChildren();
    pairs.forEach(function (pair) {
      box.appendChild(el("dt", "", pair[0]));
      const dd = el("dd");
      if (pair[2] === "time") dd.appendChild(timeNode(pair[1]));
      else dd.textContent = text(pair[1]);
      box.appendChild(dd);
    });
  }

  function drawHealth(cloud, reconciler) {
    const state = $("cloud-state");
    if (!cloud) {
      setText(state, "no report");
      state.className = "health";
      keyValues($("cloud"), []);
    } else {
      let verdict = "healthy";
      let kind = "ok";
      if (cloud.quotaExceeded) { verdict = "quota exceeded"; kind = "bad"; }
      else if (cloud.backingOff) { verdict = "backing off"; kind = "warn"; }
      else if (cloud.bootBackoffUntil) { verdict = "boots backing off"; kind = "warn"; }
      setText(state, verdict + (cloud.driver ? " · " + cloud.driver : ""));
      state.className = "health " + kind;
      const pairs = [];
      if (cloud.backoffUntil) pairs.push(["backing off until", cloud.backoffUntil, "time"]);
      if (cloud.quotaRetryAt) pairs.push(["quota retry", cloud.quotaRetryAt, "time"]);
      if (cloud.bootBackoffUntil) pairs.push(["boots again", cloud.bootBackoffUntil, "time"]);
      pairs.push(["failures", cloud.failures], ["quota refusals", cloud.quotaRefusals], ["boot failures", cloud.bootFailures]);
      pairs.push(["last error", cloud.lastError || "none"]);
      if (cloud.lastErrorAt) pairs.push(["last error at", cloud.lastErrorAt, "time"]);
      if (cloud.lastListingAt) pairs.push(["last listing", cloud.lastListingAt, "time"]);
      pairs.push(["strays", cloud.strays]);
      if (cloud.image) pairs.push(["new VMs boot", cloud.image]);
      if (cloud.outdatedVMs) pairs.push(["old-image VMs", cloud.outdatedVMs + " (being replaced)"]);
      const known = new Set(["driver", "backingOff", "backoffUntil", "quotaExceeded", "quotaRetryAt", "failures",
        "quotaRefusals", "bootFailures", "bootBackoffUntil", "lastError", "lastErrorAt", "lastListingAt", "strays",
        "image", "outdatedVMs"]);
      Object.keys(cloud).sort().forEach(function (k) { if (!known.has(k)) pairs.push([k, cloud[k]]); });
      keyValues($("cloud"), pairs);
    }
    const r = reconciler || {};
    const pairs = [["passes", r.passes], ["last pass", r.lastPassMs === undefined ? "" : r.lastPassMs + " ms"],
      ["slowest pass", r.slowestPassMs === undefined ? "" : r.slowestPassMs + " ms"]];
    Object.keys(r).sort().forEach(function (k) {
      if (["passes", "lastPassMs", "slowestPassMs"].indexOf(k) < 0) pairs.push([k, r[k]]);
    });
    keyValues($("reconciler"), pairs);
  }

  const poolForm = $("pool-form");
  let poolFormSig = "";

  /** The form shows what the pool says, unless the operator is typing in it. */
  function drawPoolForm(size) {
    const sig = [size.min, size.max, size.linger].join("/");
    if (sig === poolFormSig || poolForm.contains(document.activeElement)) return;
    poolFormSig = sig;
    ["min", "max", "linger"].forEach(function (k) {
      if (size[k] !== undefined) poolForm.elements[k].value = size[k];
    });
  }

  // ------------------------------------------------------------------ following the pool

  const connNode = $("conn");
  let longPolls = true; // until a controller refuses ?since=
  let lastAnswerAt = 0;
  let lastChangeAt = 0;
  let stopFollowing = null;

  function setMode(mode, detail) {
    monitor.mode = mode;
    connNode.dataset.state = mode;
    const labels = { live: "live", polling: "polling every 2 s", connecting: "connecting…",
      offline: "offline", unauthorized: "admin token needed" };
    setText(connNode, labels[mode] + (detail ? ": " + detail : ""));
    document.body.classList.toggle("stale", mode === "offline" || mode === "unauthorized");
  }

  /** How fresh the view is: in a long poll, since the last change (no answer means no change). */
  function showUpdated() {
    if (!lastAnswerAt) return;
    const live = monitor.mode === "live";
    const s = Math.round((Date.now() - (live ? lastChangeAt : lastAnswerAt)) / 1000);
    setText($("updated"), (monitor.version !== null ? "v" + monitor.version + " · " : "") +
      (live ? "changed " : "answered ") + (s < 2 ? "just now" : s < 120 ? s + " s ago" : Math.round(s / 60) + " min ago"));
  }

  function take(s) {
    lastAnswerAt = Date.now();
    if (typeof s.time === "number") skew = s.time - Date.now();
    const moved = s.version === undefined || s.version !== monitor.version || monitor.updates === 0;
    monitor.status = s;
    monitor.version = s.version === undefined ? null : s.version;
    if (moved) {
      lastChangeAt = lastAnswerAt;
      monitor.updates += 1;
      draw(s);
    }
    showUpdated();
  }

  /** The loop: long-poll on the version, or poll; back off while the controller is away. */
  function follow() {
    let stopped = false;
    let controller = null;
    (async function () {
      let pause = 1000;
      let wasDown = false;
      while (!stopped) {
        const since = longPolls ? monitor.version : null;
        const path = since === null ? "/all-status" : "/all-status?since=" + seg(since) + "&wait=" + LONG_POLL_S;
        const asked = Date.now();
        controller = new AbortController();
        try {
          const s = await api("GET", path, { signal: controller.signal, timed: true });
          if (stopped) return;
          if (wasDown) {
            say("ok", "in contact with the controller again");
            wasDown = false;
          }
          pause = 1000;
          take(s);
          if (s.version === undefined || !longPolls) {
            setMode("polling");
            await sleep(POLL_MS);
          } else {
            setMode("live");
            if (s.version === since && Date.now() - asked < 500) await sleep(POLL_MS); // a server that does not wait
          }
        } catch (error) {
          if (stopped) return;
          monitor.errors += 1;
          if (error instanceof ApiError && error.status === 401) {
            setMode("unauthorized");
            say("error", "The controller wants the admin token (type it in the header and Save): " + error.message);
            await sleep(10000);
          } else if (error instanceof ApiError && error.status === 400 && since !== null) {
            longPolls = false; // a controller that refuses ?since=: plain polling from now on
          } else {
            setMode("offline", error.message);
            if (!wasDown) say("error", "Lost contact with the controller: " + error.message);
            wasDown = true;
            await sleep(pause);
            pause = Math.min(pause * 2, 10000);
          }
        }
      }
    })();
    return function () {
      stopped = true;
      if (controller) controller.abort();
    };
  }

  function restart() {
    if (stopFollowing) stopFollowing();
    monitor.version = null;
    setMode("connecting");
    stopFollowing = follow();
  }

  // ------------------------------------------------------------------ thumbnails

  const thumbs = {
    visible: new Set(), // vmids whose screen cell is in the viewport
    urls: new Map(), // vmid -> object URL shown
    next: new Map(), // vmid -> when to fetch again (ms)
    busy: new Set(),
    observer: null,

    /** The screen cell of a VM row: a thumbnail box for a VM with a session, else a dash. */
    cell: function (td, vm, entry) {
      const vmid = vm.vmid;
      if (entry.thumb) this.observer.unobserve(entry.thumb);
      entry.thumb = null;
      this.drop(vmid);
      if (!(hasScreen(vm) && thumbsOn())) {
        const vnc = (vm.capabilities || []).indexOf("vnc") >= 0;
        const box = el("div", "thumb none", vnc && thumbsOn() ? "no screen" : "–");
        box.title = !vnc ? "no VNC server on this VM (yet)" :
          thumbsOn() ? "no screen while " + vm.state : "thumbnails are off";
        td.replaceChildren(box);
        return;
      }
      const box = el("div", "thumb live", "…");
      box.dataset.vmid = vmid;
      box.dataset.action = "watch";
      box.dataset.key = vmid;
      box.title = "click to watch live";
      td.replaceChildren(box);
      entry.thumb = box;
      this.observer.observe(box);
    },

    drop: function (vmid) {
      const url = this.urls.get(vmid);
      if (url) URL.revokeObjectURL(url);
      this.urls.delete(vmid);
      this.next.delete(vmid);
      this.visible.delete(vmid);
    },

    schedule: function () {
      const now = Date.now();
      for (const vmid of this.visible) {
        if (this.busy.size >= THUMB_PARALLEL) return;
        if (this.busy.has(vmid) || (this.next.get(vmid) || 0) > now) continue;
        this.fetch(vmid);
      }
    },

    fetch: async function (vmid) {
      this.busy.add(vmid);
      let wait = THUMB_EVERY_MS;
      try {
        const blob = await api("GET", "/console/vm/" + seg(vmid) + "/screen.png?width=" + THUMB_WIDTH, { as: "blob" });
        const entry = vmTable.rows.get(vmid);
        if (entry && entry.thumb && this.visible.has(vmid)) {
          const url = URL.createObjectURL(blob);
          let img = entry.thumb.querySelector("img");
          if (!img) {
            img = el("img");
            img.alt = "screen of " + vmid;
            entry.thumb.replaceChildren(img);
          }
          img.src = url;
          const old = this.urls.get(vmid);
          if (old) URL.revokeObjectURL(old);
          this.urls.set(vmid, url);
          entry.thumb.title = "screen at " + new Date().toLocaleTimeString() + "; click to watch live";
        } else {
          wait = 0;
        }
      } catch (error) {
        const entry = vmTable.rows.get(vmid);
        if (entry && entry.thumb && !entry.thumb.querySelector("img")) {
          entry.thumb.textContent = error.status === 409 ? "no login" : "no screen";
        }
        if (entry && entry.thumb) entry.thumb.title = error.message;
        wait = error.status === 503 ? 2 * THUMB_EVERY_MS : 3 * THUMB_EVERY_MS;
      } finally {
        this.busy.delete(vmid);
        this.next.set(vmid, Date.now() + wait);
      }
      this.schedule();
    },
  };

  thumbs.observer = new IntersectionObserver(function (changes) {
    changes.forEach(function (change) {
      const vmid = change.target.dataset.vmid;
      if (change.isIntersecting) thumbs.visible.add(vmid);
      else thumbs.visible.delete(vmid);
    });
    thumbs.schedule();
  });
  vmTable.onRemove = function (vmid, entry) {
    if (entry.thumb) thumbs.observer.unobserve(entry.thumb);
    thumbs.drop(vmid);
  };

  // ------------------------------------------------------------------ watching a screen live

  const viewer = {
    dialog: $("viewer"),
    rfb: null,
    timer: null,
    url: null,
    vmid: null,

    open: function (vmid) {
      this.close();
      this.vmid = vmid;
      const vm = (monitor.status.vms || []).find(function (v) { return v.vmid === vmid; }) || { vmid: vmid };
      $("viewer-vmid").textContent = vmid;
      $("viewer-state").replaceChildren(el("span", "badge s-" + vm.state, vm.state));
      $("viewer-note").textContent = "connecting…";
      $("viewer-screen").replaceChildren();
      this.dialog.showModal();
      this.console(vmid);
    },

    /**
     * The live console, view only: noVNC on the operator's socket.  The controller logs in to the
     * VM itself and offers the page RFB with no security: no password is ever in this page.
     */
    console: async function (vmid) {
      let RFB;
      try {
        RFB = (await import("/static/novnc/core/rfb.js")).default;
      } catch (error) {
        failed("loading noVNC", error);
        this.stills(vmid, "noVNC did not load: a screenshot every second");
        return;
      }
      if (this.vmid !== vmid) return;
      const url = new URL("/console/vm/" + seg(vmid), location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      if (token) url.searchParams.set("token", token); // a browser cannot set a header on a WebSocket
      $("viewer-screen").replaceChildren();
      const rfb = new RFB($("viewer-screen"), url.href, { wsProtocols: ["binary"], shared: true });
      rfb.viewOnly = true;
      rfb.scaleViewport = true;
      rfb.background = "#222";
      let connected = false;
      rfb.addEventListener("connect", function () {
        connected = true;
        $("viewer-note").textContent = "live, view only";
      });
      rfb.addEventListener("disconnect", function (e) {
        if (viewer.rfb !== rfb) return;
        viewer.rfb = null;
        if (viewer.vmid !== vmid) return;
        const vm = (monitor.status.vms || []).find(function (v) { return v.vmid === vmid; });
        if (!connected) {
          // refused before it opened (no login to this VM now, or the VM is gone): what screen.png says
          viewer.stills(vmid, "the live console did not open; a screenshot every second");
        } else if (vm && hasScreen(vm)) {
          // cut while watching (a release closes every viewer of the VM): back in a second
          $("viewer-note").textContent = "the console was cut; reconnecting…";
          viewer.timer = setTimeout(function () { if (viewer.vmid === vmid) viewer.console(vmid); }, 1000);
        } else {
          $("viewer-note").textContent = e.detail.clean ? "the console closed" : "the console was cut";
        }
      });
      this.rfb = rfb;
    },

    /** No live console to be had: a screenshot every second (the answer's error, if none). */
    stills: function (vmid, note) {
      $("viewer-note").textContent = note;
      const img = el("img");
      img.alt = "screen of " + vmid;
      $("viewer-screen").replaceChildren(img);
      const self = this;
      const again = async function () {
        if (self.vmid !== vmid) return;
        try {
          const blob = await api("GET", "/console/vm/" + seg(vmid) + "/screen.png?width=1280", { as: "blob" });
          if (self.vmid !== vmid) return;
          if (self.url) URL.revokeObjectURL(self.url);
          self.url = URL.createObjectURL(blob);
          img.src = self.url;
        } catch (error) {
          $("viewer-note").textContent = error.message;
        }
        self.timer = setTimeout(again, 1000);
      };
      again();
    },

    close: function () {
      this.vmid = null;
      clearTimeout(this.timer);
      if (this.rfb) {
        const rfb = this.rfb;
        this.rfb = null;
        rfb.disconnect();
      }
      if (this.url) URL.revokeObjectURL(this.url);
      this.url = null;
      if (this.dialog.open) this.dialog.close();
    },
  };
  viewer.dialog.addEventListener("close", function () { viewer.close(); });

  // ------------------------------------------------------------------ a handle's events

  const eventsView = {
    dialog: $("events"),
    stop: null,

    open: function (handle) {
      this.close();
      $("events-handle").textContent = handle.slice(0, 12) + "…";
      $("events-handle").title = handle;
      $("events-note").textContent = "loading…";
      const list = $("events-list");
      list.replaceChildren();
      this.dialog.showModal();
      const controller = new AbortController();
      let stopped = false;
      this.stop = function () { stopped = true; controller.abort(); };
      (async function () {
        let lastId = 0;
        let wait = 0;
        while (!stopped) {
          try {
            const answer = await api("GET", "/fetch-events/" + seg(handle) + "/" + lastId + "?wait=" + wait,
              { signal: controller.signal });
            (answer.newEvents || []).forEach(function (event) {
              const data = event.data || {};
              const tr = el("tr");
              tr.append(el("td", "num", event.id));
              const when = el("td");
              when.appendChild(timeNode(event.time));
              tr.append(when, el("td", "", data.action), el("td", "wrap", data.url), el("td", "wrap", data.title),
                el("td", "", data.tab));
              list.prepend(tr);
            });
            lastId = answer.lastId;
            $("events-note").textContent = list.children.length + " events; new ones appear as they come";
            wait = 10;
          } catch (error) {
            if (stopped) return;
            $("events-note").textContent = error.message;
            if (error instanceof ApiError && error.status < 500) return; // released, or not ours
            await sleep(2000);
          }
        }
      })();
    },

    close: function () {
      if (this.stop) this.stop();
      this.stop = null;
      if (this.dialog.open) this.dialog.close();
    },
  };
  eventsView.dialog.addEventListener("close", function () { eventsView.close(); });

  document.querySelectorAll("dialog [data-close]").forEach(function (b) {
    b.addEventListener("click", function () { b.closest("dialog").close(); });
  });

  // ------------------------------------------------------------------ buttons and forms

  /** One listener for every row button (rows come and go; their buttons carry action and key). */
  document.querySelector("main").addEventListener("click", function (event) {
    const target = event.target.closest("[data-action]");
    if (!target) return;
    const key = target.dataset.key;
    switch (target.dataset.action) {
      case "watch":
        viewer.open(key);
        break;
      case "terminate":
        if (confirm("Terminate VM " + key + "? Its handle, if any, loses it.")) {
          act("terminate VM " + key, function () { return api("POST", "/terminate-vm/" + seg(key)); });
        }
        break;
      case "cancel-batch":
        if (confirm("Cancel batch " + key + "? No new locks; VMs already locked stay until released.")) {
          act("cancel batch " + key, function () { return api("POST", "/cancel-batch/" + seg(key)); });
        }
        break;
      case "release":
        if (confirm("Release handle " + key.slice(0, 12) + "…? Its worker loses the VM.")) {
          act("release handle " + key.slice(0, 12) + "…", function () { return api("POST", "/release/" + seg(key)); });
        }
        break;
      case "events":
        eventsView.open(key);
        break;
    }
  });

  const tokenInput = $("token");
  tokenInput.value = token;
  $("token-form").addEventListener("submit", function (event) {
    event.preventDefault();
    token = tokenInput.value;
    localStorage.setItem(TOKEN_KEY, token);
    say("ok", token ? "Admin token saved in this browser" : "Admin token cleared");
    restart();
  });

  poolForm.addEventListener("submit", function (event) {
    event.preventDefault();
    const f = poolForm.elements;
    const path = "/set-pool-size/" + seg(f.min.value) + "/" + seg(f.max.value) + "/" + seg(f.linger.value);
    poolFormSig = "";
    document.activeElement.blur();
    act("set pool size " + f.min.value + "/" + f.max.value + "/" + f.linger.value, function () {
      return api("POST", path);
    });
  });

  $("batch-form").addEventListener("submit", function (event) {
    event.preventDefault();
    const f = event.target.elements;
    let options;
    if (f.options.value.trim()) {
      try {
        options = JSON.parse(f.options.value);
      } catch (error) {
        say("error", "The batch options are not JSON: " + error.message);
        return;
      }
    }
    act("prepare batch of " + f.size.value, async function () {
      const answer = await api("POST", "/prepare-batch/" + seg(f.size.value) + "/" + seg(f.homepage.value), { body: options });
      return answer && answer.batch !== undefined ? "batch " + answer.batch : answer;
    });
  });

  $("shutdown-form").addEventListener("submit", function (event) {
    event.preventDefault();
    if (confirm("Release every handle, cancel every batch and terminate every VM?")) {
      act("shutdown", function () { return api("POST", "/shutdown"); });
    }
  });

  // The page's own first layout, before any answer: an update's cost below is the update's alone.
  void document.body.offsetHeight;
  setInterval(tick, 1000);
  setInterval(function () { thumbs.schedule(); }, 1000);
  restart();
})();
