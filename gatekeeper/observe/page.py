"""The `/` page of `--metrics`: one self-contained HTML file (no CDN, no build
step) that polls `/farm` (this box's `/status`, and each `--peer`'s as this box
last fetched it) every REFRESH seconds and draws the last minutes.

The history lives in the browser only (gatekeeper keeps none): a page opened
just now starts with an empty chart.
"""

from __future__ import annotations

# Every 2 s: a human sees a job start or end within a blink, and the page costs
# the server one /status (about 25 µs) per open tab per 2 s.
REFRESH_MS = 2000
# Ten minutes of points at 2 s each.
HISTORY_POINTS = 300

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>gatekeeper</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .6em; }
.tiles { display: flex; gap: 1em; flex-wrap: wrap; }
.tile { border: 1px solid #ccc; border-radius: 6px; padding: .6em 1em; min-width: 11em; }
.tile b { font-size: 1.6em; }
#state.up { color: #080; } #state.drain { color: #b60; } #state.down { color: #c00; }
#error { color: #c00; }
canvas { border: 1px solid #ddd; margin-top: 1em; width: 100%; max-width: 900px; }
table { border-collapse: collapse; margin-top: 1em; }
td, th { padding: .15em .8em .15em 0; text-align: left; }
.legend span { margin-right: 1.2em; }
tr.paused td { color: #b00; font-weight: bold; }
</style></head>
<body>
<h1>gatekeeper <span id="version"></span>: <span id="state">?</span>
 <span id="reason"></span></h1>
<div id="error"></div>
<div class="tiles">
 <div class="tile">running<br><b id="running">?</b> / <span id="max_jobs">?</span></div>
 <div class="tile">queued<br><b id="queued">?</b> <span id="hold"></span><br>
  <span id="queued_kernel">?</span> KiB in the kernel</div>
 <div class="tile">available memory<br><b id="available">?</b> MiB<br>
  min free <span id="min_free">?</span> MiB, reserved <span id="reserved">?</span> MiB</div>
 <div class="tile">admitted<br><b id="admitted">?</b></div>
 <div class="tile">paused<br><b id="paused">-</b><br><span id="pauses"></span></div>
</div>
<canvas id="chart" width="900" height="260"></canvas>
<div class="legend"><span style="color:#06c">&#9632; running</span>
<span style="color:#c60">&#9632; queued</span>
<span style="color:#393">&#9632; available memory (right scale, MiB)</span>
<span style="color:#999">- - min free</span></div>
<table><thead><tr><th>job</th><th>state</th><th>for</th><th>paused</th>
<th>estimate</th><th>charged now</th></tr></thead>
<tbody id="jobs"></tbody></table>
<table><thead><tr><th>queued peer</th><th>waiting</th></tr></thead>
<tbody id="queue"></tbody></table>
<div id="farm_view" hidden>
<h2>farm</h2>
<table><thead><tr><th>box</th><th>state</th><th>running</th><th>queued</th><th>paused</th>
<th>available</th><th>seen</th></tr></thead><tbody id="farm"></tbody></table>
<table><thead><tr><th>box</th><th>job</th><th>state</th><th>for</th><th>estimate</th>
<th>charged now</th></tr></thead><tbody id="farm_jobs"></tbody></table>
</div>
<script>
"use strict";
const REFRESH = @REFRESH@, KEEP = @KEEP@, MiB = 1048576;
const history = [];
const $ = (id) => document.getElementById(id);
const mib = (n) => (n === null || n === undefined) ? "?" : String(Math.round(n / MiB));

function draw() {
  const c = $("chart"), g = c.getContext("2d"), w = c.width, h = c.height, pad = 30;
  g.clearRect(0, 0, w, h);
  if (history.length < 1) return;
  const jobsMax = Math.max(1, ...history.map(p => Math.max(p.max_jobs, p.running + p.queued)));
  const memMax = Math.max(1, ...history.map(p => Math.max(p.available || 0, p.min_free)));
  const x = (i) => pad + (w - 2 * pad) * (KEEP - history.length + i) / (KEEP - 1);
  const yJobs = (v) => h - pad - (h - 2 * pad) * v / jobsMax;
  const yMem = (v) => h - pad - (h - 2 * pad) * v / memMax;
  g.strokeStyle = "#ddd"; g.beginPath(); g.moveTo(pad, h - pad); g.lineTo(w - pad, h - pad);
  g.stroke();
  g.fillStyle = "#666"; g.font = "11px sans-serif";
  g.fillText(String(jobsMax) + " jobs", 2, pad - 8);
  g.fillText(String(Math.round(memMax / MiB)) + " MiB", w - 70, pad - 8);
  g.fillText("last " + Math.round(KEEP * REFRESH / 60000) + " min", pad, h - 8);
  const line = (color, key, y, dash) => {
    g.strokeStyle = color; g.setLineDash(dash || []); g.beginPath();
    history.forEach((p, i) => {
      const v = p[key]; if (v === null || v === undefined) return;
      if (i === 0) g.moveTo(x(i), y(v)); else g.lineTo(x(i), y(v));
    });
    g.stroke(); g.setLineDash([]);
  };
  line("#393", "available", yMem); line("#999", "min_free", yMem, [4, 4]);
  line("#06c", "running", yJobs); line("#c60", "queued", yJobs);
}

function row(texts, cls) {
  const tr = document.createElement("tr");
  if (cls) tr.className = cls;
  for (const text of texts) {
    const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
  }
  return tr;
}

function show(s) {
  $("version").textContent = s.version;
  $("state").textContent = s.health.state;
  $("state").className = s.health.state;
  $("reason").textContent = s.health.reason ? "(" + s.health.reason + ")" : "";
  $("running").textContent = s.running;
  $("max_jobs").textContent = s.max_jobs;
  $("queued").textContent = s.queued;
  $("hold").textContent = s.hold ? "held for " + s.hold : "";
  $("queued_kernel").textContent = s.queued_kernel_bytes == null ? "?"
    : Math.round(s.queued_kernel_bytes / 1024);
  $("available").textContent = mib(s.available_bytes);
  $("min_free").textContent = mib(s.min_free_bytes);
  $("reserved").textContent = mib(s.reserved_bytes);
  $("admitted").textContent = s.admitted_total;
  const p = s.pausing;
  $("paused").textContent = p ? p.paused : "off";
  $("pauses").textContent = p ? p.pauses_total + " pauses, " + p.cuts_total + " cut" : "";
  $("jobs").replaceChildren(...(s.jobs || []).map(j => row(
    [j.job || j.peer, j.state, j.running_seconds.toFixed(1) + " s",
     j.pauses ? j.paused_seconds.toFixed(1) + " s (" + j.pauses + ")" : "",
     mib(j.estimate_bytes) + " MiB" + (j.estimate_from ? " (" + j.estimate_from + ")" : ""),
     mib(j.charge_bytes) + " MiB"],
    j.state === "paused" ? "paused" : "")));
  $("queue").replaceChildren(...s.queue.map(q => row(
    [q.peer, q.waiting_seconds.toFixed(1) + " s"])));
  history.push({running: s.running, queued: s.queued, max_jobs: s.max_jobs,
                available: s.available_bytes, min_free: s.min_free_bytes});
  while (history.length > KEEP) history.shift();
  draw();
}

function num(v) { return typeof v === "number" ? v : null; }

function showFarm(peers) {
  // Every field of a peer's status came over the network twice: shown as text
  // only (textContent), numbers checked before they are formatted.
  $("farm_view").hidden = peers.length === 0;
  const boxes = [], jobs = [];
  for (const p of peers) {
    const s = (p && typeof p.status === "object" && p.status) || {};
    const h = (typeof s.health === "object" && s.health) || {};
    const pausing = (typeof s.pausing === "object" && s.pausing) || null;
    const name = String(p.address);
    boxes.push(row([name, p.ok ? String(h.state || "?") : "not answering: " + String(p.error),
                    String(num(s.running) ?? "?") + " / " + String(num(s.max_jobs) ?? "?"),
                    String(num(s.queued) ?? "?"),
                    pausing ? String(num(pausing.paused) ?? "?") : "off",
                    mib(num(s.available_bytes)) + " MiB",
                    num(p.age_seconds) === null ? "never" : p.age_seconds + " s ago"],
                   p.ok ? "" : "paused"));
    for (const j of Array.isArray(s.jobs) ? s.jobs : []) {
      if (!j || typeof j !== "object") continue;
      jobs.push(row([name, String(j.job || j.peer || "?"), String(j.state || "?"),
                     (num(j.running_seconds) ?? 0).toFixed(1) + " s",
                     mib(num(j.estimate_bytes)) + " MiB", mib(num(j.charge_bytes)) + " MiB"],
                    j.state === "paused" ? "paused" : ""));
    }
  }
  $("farm").replaceChildren(...boxes);
  $("farm_jobs").replaceChildren(...jobs);
}

async function poll() {
  try {
    const r = await fetch("/farm", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const farm = await r.json();
    show(farm.self);
    showFarm(Array.isArray(farm.peers) ? farm.peers : []);
    $("error").textContent = "";
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("error").textContent = "cannot read /farm: " + e.message;
  }
  setTimeout(poll, REFRESH);
}
poll();
</script>
</body></html>
""".replace("@REFRESH@", str(REFRESH_MS)).replace("@KEEP@", str(HISTORY_POINTS))

PAGE_BYTES = PAGE.encode()


def page() -> bytes:
    return PAGE_BYTES
