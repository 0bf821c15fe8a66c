// aiodagger's dashboard: one websocket of JSON messages (a "hello", then "update"s a few
// times a second), drawn with the DOM, an SVG and a canvas. No library, nothing fetched
// from elsewhere. Names and tracebacks come from user code: they are only ever set as
// text, never as HTML.
"use strict";
(() => {
  const STREAM_WINDOW = 10;   // seconds of runs the stream shows
  const RUNS_KEEP = 5000;     // runs held for the stream
  const LANE_ROWS = 8;        // rows a lane splits into for overlapping runs
  const ROW_HEIGHT = 7;
  const LABEL_WIDTH = 190;

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  };
  const bytes = (n) => {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  };
  const hue = (name) => {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return h % 360;
  };

  // The token, when the page was opened with ?token=: kept here for the websocket (a
  // cookie may not reach it inside a notebook's iframe), and taken out of the address
  // bar of a top-level page, which has the cookie now.
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token !== null && window.top === window) history.replaceState(null, "", location.pathname);

  const state = {
    runs: [], runSeq: 0, errorSeq: 0, errors: [], graph: null,
    now: 0, nowAt: performance.now(), workers: [], dirtyStream: true,
  };

  // -- connection -----------------------------------------------------------------------
  let retry = 500;
  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const query = token !== null ? "?token=" + encodeURIComponent(token) : "";
    const ws = new WebSocket(scheme + location.host + "/ws" + query);
    ws.onopen = () => { retry = 500; setConn("live", "live"); };
    ws.onmessage = (event) => receive(JSON.parse(event.data));
    ws.onclose = () => {
      setConn("down", "disconnected: retrying");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 10000);
    };
  }
  function setConn(cls, text) {
    const conn = $("conn");
    conn.className = "conn " + cls;
    conn.textContent = text;
  }

  function receive(msg) {
    state.now = msg.now;
    state.nowAt = performance.now();
    if (msg.type === "hello") { state.runs = []; state.runSeq = 0; }
    for (const run of msg.runs) {
      if (run[0] > state.runSeq) { state.runs.push(run); state.runSeq = run[0]; }
    }
    if (state.runs.length > RUNS_KEEP) state.runs.splice(0, state.runs.length - RUNS_KEEP);
    state.dirtyStream = true;
    $("stream-note").textContent = msg.runs_dropped
      ? `(${msg.runs_dropped} runs not drawn: too many to send)` : "";
    state.workers = msg.workers;
    renderTotals(msg.totals, msg.lag);
    renderWorkers(msg.workers);
    renderProgress(msg.functions, msg.totals);
    if (msg.graph) renderGraph(msg.graph);
    if (msg.errors) renderErrors(msg.errors);
  }

  // -- header ---------------------------------------------------------------------------
  function renderTotals(t, lag) {
    const items = [
      ["workers", t.workers], ["in flight", t.in_flight], ["finished", t.finished],
      ["failed", t.failed], ["cancelled", t.cancelled], ["moved", bytes(t.bytes_moved)],
      ["spilled", bytes(t.spilled)], ["loop lag p99", lag.p99.toFixed(1) + " ms"],
    ];
    const dl = $("totals");
    dl.replaceChildren(...items.map(([k, v]) => {
      const div = el("div", { "data-key": k });
      div.append(el("dt", {}, k), el("dd", {}, String(v)));
      return div;
    }));
  }

  // -- workers --------------------------------------------------------------------------
  function renderWorkers(workers) {
    const maxUsed = Math.max(1, ...workers.map((w) => w.memory_limit || w.memory_used));
    const maxSpill = Math.max(1, ...workers.map((w) => w.spilled_bytes));
    const rows = workers.map((w) => {
      const tr = el("tr", { "data-worker-id": String(w.id) });
      tr.append(el("td", {}, String(w.id)));
      tr.append(el("td", { title: w.address }, `${w.host} · ${w.pid}`));
      tr.append(el("td", { class: "status-" + w.status }, w.status));
      const procs = el("td");
      for (const p of w.processors) procs.append(el("span", { class: "chip" }, p));
      tr.append(procs);
      tr.append(el("td", {}, String(w.tasks_running)));
      const limit = w.memory_limit || maxUsed;
      const memText = `${bytes(w.memory_used)} / ${w.memory_limit ? bytes(w.memory_limit) : "no limit"}`;
      tr.append(barCell("mem", w.memory_used / limit, memText));
      tr.append(barCell("spill", w.spilled_bytes / maxSpill, bytes(w.spilled_bytes)));
      return tr;
    });
    $("workers").tBodies[0].replaceChildren(...rows);
  }
  function barCell(cls, fraction, text) {
    const td = el("td");
    const bar = el("div", { class: "bar" });
    const fill = el("span", { class: cls });
    fill.style.width = (100 * Math.min(1, Math.max(0, fraction || 0))).toFixed(1) + "%";
    bar.append(fill, el("span", { class: "label" }, text));
    td.append(bar);
    return td;
  }

  // -- progress per function ------------------------------------------------------------
  function renderProgress(functions, totals) {
    $("progress-note").textContent = totals.running_known ? "" : "(running: shown once the scheduler reports dispatches)";
    const rows = functions.map((f) => {
      const total = Math.max(1, f.spawned);
      const done = f.finished + f.failed + f.cancelled;
      const row = el("div", { class: "fn", "data-fn": f.name, "data-done": String(done),
                              "data-spawned": String(f.spawned) });
      row.append(el("span", { class: "name", title: f.name }, f.name));
      const bar = el("div", { class: "bar" });
      let left = 0;
      for (const part of ["finished", "failed", "cancelled", "running"]) {
        if (!f[part]) continue;
        const seg = el("span", { class: part });
        seg.style.left = (100 * left / total).toFixed(2) + "%";
        seg.style.width = (100 * f[part] / total).toFixed(2) + "%";
        left += f[part];
        bar.append(seg);
      }
      row.append(bar);
      row.append(el("span", { class: "counts" },
        `${done}/${f.spawned} done · ${f.running} running · ${f.waiting} waiting` + (f.failed ? ` · ${f.failed} failed` : "")));
      return row;
    });
    $("progress").replaceChildren(...(rows.length ? rows : [el("p", { class: "empty" }, "no tasks yet")]));
  }

  // -- task graph: layered by depth within the window -----------------------------------
  function renderGraph(nodes) {
    const depth = new Map();
    const users = new Map();
    const layers = [];
    for (const [id, , deps] of nodes) {  // spawn order: inputs come before their users
      let d = 0;
      for (const dep of deps) {
        if (!depth.has(dep)) continue;
        d = Math.max(d, depth.get(dep) + 1);
        users.get(dep).push(id);
      }
      depth.set(id, d);
      users.set(id, []);
      (layers[d] = layers[d] || []).push(id);
    }
    // From the deepest layer up, each node goes next to the first of its users already
    // placed, so that the inputs of one task sit together and edges cross less.
    const slot = new Map();
    for (let d = layers.length - 1; d >= 0; d--) {
      const layer = layers[d];
      if (!layer) continue;
      const key = (id) => Math.min(Infinity, ...users.get(id).map((u) => slot.get(u)));
      const keys = new Map(layer.map((id, i) => [id, [key(id), i]]));
      layer.sort((a, b) => (keys.get(a)[0] - keys.get(b)[0]) || (keys.get(a)[1] - keys.get(b)[1]));
      layer.forEach((id, i) => slot.set(id, i));
    }
    const ROWS = 25, DX = 26, DY = 14, R = 4.5;
    const pos = new Map();
    let x = 0;
    for (const layer of layers) {
      if (!layer) continue;
      layer.forEach((id, i) => pos.set(id, [12 + (x + Math.floor(i / ROWS)) * DX, 10 + (i % ROWS) * DY]));
      x += Math.ceil(layer.length / ROWS) + 0.6;
    }
    const width = Math.max(120, 24 + x * DX), height = 20 + Math.min(ROWS, Math.max(1, ...layers.map((l) => (l ? l.length : 0)))) * DY;
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    svg.style.maxHeight = Math.max(120, height * 1.6) + "px";
    for (const [id, , deps] of nodes) {
      const [x2, y2] = pos.get(id);
      for (const dep of deps) {
        const p = pos.get(dep);
        if (p) svg.append(svgEl("line", { x1: p[0], y1: p[1], x2, y2 }));
      }
    }
    for (const [id, name, , st, worker] of nodes) {
      const [cx, cy] = pos.get(id);
      const c = svgEl("circle", { cx, cy, r: R, class: "st-" + st, "data-task": String(id) });
      const title = svgEl("title");
      title.textContent = `${name} #${id}: ${st}` + (worker !== null ? ` on worker ${worker}` : "");
      c.append(title);
      svg.append(c);
    }
    $("graph").replaceChildren(svg);
    $("graph-note").textContent = `(last ${nodes.length} tasks)`;
  }

  // -- errors ---------------------------------------------------------------------------
  function renderErrors(errors) {
    for (const e of errors) {
      if (e.seq > state.errorSeq) { state.errors.push(e); state.errorSeq = e.seq; }
    }
    if (state.errors.length > 50) state.errors.splice(0, state.errors.length - 50);
    const items = state.errors.slice().reverse().map((e) => {
      const d = el("details", { class: "error", "data-task": String(e.task) });
      d.append(el("summary", {}, `${e.name}${e.task >= 0 ? " #" + e.task : ""}: ${e.error}`));
      d.append(el("pre", {}, e.traceback));
      return d;
    });
    $("errors").replaceChildren(...(items.length ? items : [el("p", { class: "empty" }, "none")]));
    $("errors-note").textContent = state.errors.length ? `(${state.errors.length} most recent)` : "";
  }

  // -- task stream: a lane per worker and processor, a bar per run ----------------------
  function drawStream() {
    const canvas = $("stream");
    const now = state.now + (performance.now() - state.nowAt) / 1000;
    const from = now - STREAM_WINDOW;
    const lanes = new Map();
    for (const w of state.workers) for (const p of w.processors) lanes.set(p, []);
    let drawn = 0;
    for (const run of state.runs) {
      if (run[6] < from) continue;
      const key = run[4];
      if (!lanes.has(key)) lanes.set(key, []);
      lanes.get(key).push(run);
      drawn++;
    }
    const layout = [];
    let y = 4;
    for (const [key, runs] of lanes) {
      const ends = [];
      const placed = runs.map((run) => {
        // 2 ms of slack: times from worker processes are moved onto this clock by an estimate
        let row = ends.findIndex((end) => end <= run[5] + 0.002);
        if (row < 0) row = ends.length < LANE_ROWS ? ends.length : LANE_ROWS - 1;
        ends[row] = Math.max(ends[row] || 0, run[6]);
        return [run, row];
      });
      const rows = Math.max(1, ends.length);
      layout.push([key, y, rows, placed]);
      y += rows * ROW_HEIGHT + 8;
    }
    const dpr = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth || 800;
    const cssHeight = Math.max(40, y + 14);
    if (canvas.width !== Math.round(cssWidth * dpr) || canvas.height !== Math.round(cssHeight * dpr)) {
      canvas.width = Math.round(cssWidth * dpr);
      canvas.height = Math.round(cssHeight * dpr);
      canvas.style.height = cssHeight + "px";
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    const plot = cssWidth - LABEL_WIDTH - 8;
    const sx = (t) => LABEL_WIDTH + (t - from) / STREAM_WINDOW * plot;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (const [key, top, rows, placed] of layout) {
      ctx.fillStyle = "#1c232b";
      ctx.fillRect(LABEL_WIDTH, top, plot, rows * ROW_HEIGHT);
      ctx.fillStyle = "#8793a1";
      ctx.fillText(key, 4, top + rows * ROW_HEIGHT / 2, LABEL_WIDTH - 8);
      for (const [run, row] of placed) {
        const x0 = Math.max(LABEL_WIDTH, sx(run[5]));
        const w = Math.max(1, sx(run[6]) - x0);
        ctx.fillStyle = run[7] ? `hsl(${hue(run[2])}, 60%, 55%)` : "#f85149";
        ctx.fillRect(x0, top + row * ROW_HEIGHT, w, ROW_HEIGHT - 1);
      }
    }
    ctx.fillStyle = "#8793a1";
    for (let s = 0; s <= STREAM_WINDOW; s += 2) {
      ctx.fillText(s ? `-${s}s` : "now", sx(now - s) - (s ? 12 : 20), cssHeight - 6);
    }
    canvas.dataset.runs = String(drawn);
    canvas.dataset.lanes = String(layout.length);
  }

  connect();
  // Redrawn on a timer, not per message: a few frames a second is plenty for bars that
  // last seconds, and a hidden tab's timers slow down by themselves.
  setInterval(() => { if (state.dirtyStream || state.runs.length) drawStream(); }, 150);
})();
