// lorafleet web page: one file, no framework, no build step, no CDN.
//
// It is a client of the native JSON API like the CLI is: the API key typed once is kept in
// localStorage and sent as `Authorization: Bearer` on every fetch (downloads too, via fetch +
// blob, since a plain link cannot carry the header). Views poll every 2 s; data is inserted with
// textContent only, never innerHTML, so a job message cannot inject markup.
"use strict";

const KEY_STORAGE = "lorafleet.apiKey";
const POLL_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let timer = null;
let lastEventId = 0;
let currentJobId = null;

class AuthError extends Error {}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${apiKey()}` }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) throw new AuthError("the API key was refused");
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      message = body.detail || (body.error && body.error.message) || message;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function getJson(path) {
  return (await api(path)).json();
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null && text !== undefined) node.textContent = String(text);
  return node;
}

function fmtLoss(value) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(4);
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function progressOf(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return { fraction: 1, text: p.total_steps ? `${p.total_steps}/${p.total_steps}` : "done" };
  if (p.step !== null && p.step !== undefined && p.total_steps) {
    return { fraction: Math.min(1, p.step / p.total_steps), text: `${p.step}/${p.total_steps}` };
  }
  return { fraction: 0, text: job.status === "queued" ? "waiting" : "–" };
}

function statusBadge(node, status) {
  node.textContent = status;
  node.className = `status status-${status}`;
}

// ---------------------------------------------------------------------------------- views
function show(view) {
  for (const id of ["key-view", "jobs-view", "job-view"]) $(id).hidden = id !== view;
  $("change-key").hidden = view === "key-view";
}

function showKeyForm(message) {
  stopPolling();
  show("key-view");
  $("key-error").textContent = message || "";
  $("api-key").focus();
}

function stopPolling() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function poll(fn) {
  stopPolling();
  const tick = () => fn().catch((error) => {
    if (error instanceof AuthError) showKeyForm("That key was refused; enter a valid one.");
    else console.error(error);
  });
  tick();
  timer = setInterval(tick, POLL_MS);
}

// ---------------------------------------------------------------------------------- job list
async function refreshJobs() {
  const page = await getJson("/jobs?limit=100");
  const body = $("jobs").querySelector("tbody");
  const rows = page.data.map((job) => {
    const tr = el("tr", { "data-job-id": job.id, "data-status": job.status });
    const link = el("a", { href: `#/jobs/${job.id}` }, job.id);
    const idCell = el("td");
    idCell.append(link);
    const status = el("span");
    statusBadge(status, job.status);
    const statusCell = el("td");
    statusCell.append(status);
    const progress = progressOf(job);
    const bar = el("div", { class: "bar" });
    const fill = el("div");
    fill.style.width = `${(progress.fraction * 100).toFixed(1)}%`;
    bar.append(fill);
    const progressCell = el("td");
    const wrap = el("div", { class: "progress-cell" });
    wrap.append(bar, el("span", { class: "progress-text" }, progress.text));
    progressCell.append(wrap);
    tr.append(
      idCell,
      el("td", {}, job.base_model),
      statusCell,
      progressCell,
      el("td", { class: "num" }, fmtLoss(job.progress && job.progress.train_loss)),
      el("td", {}, fmtTime(job.created_at)),
    );
    return tr;
  });
  body.replaceChildren(...rows);
  $("jobs-empty").hidden = rows.length > 0;
}

// ---------------------------------------------------------------------------------- one job
function detail(dl, name, value) {
  dl.append(el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "–" : value));
}

async function refreshJob(jobId) {
  const [job, metrics, checkpoints] = await Promise.all([
    getJson(`/jobs/${jobId}`),
    getJson(`/jobs/${jobId}/metrics`),
    getJson(`/jobs/${jobId}/checkpoints`),
  ]);
  if (currentJobId !== jobId) return; // the user navigated away meanwhile
  $("job-id").textContent = job.id;
  statusBadge($("job-status"), job.status);
  const progress = progressOf(job);
  $("job-bar").style.width = `${(progress.fraction * 100).toFixed(1)}%`;
  const p = job.progress || {};
  const parts = [`step ${progress.text}`];
  if (p.epoch !== null && p.epoch !== undefined) parts.push(`epoch ${Number(p.epoch).toFixed(2)}`);
  if (p.tokens_per_second) parts.push(`${Math.round(p.tokens_per_second)} tok/s`);
  if (p.eta_seconds && !FINAL.has(job.status)) parts.push(`ETA ${Math.round(p.eta_seconds)} s`);
  $("job-progress").textContent = parts.join(" · ");

  const dl = $("job-details");
  dl.replaceChildren();
  detail(dl, "Base model", job.base_model);
  detail(dl, "Training file", job.training_file);
  detail(dl, "Validation file", job.validation_file);
  detail(dl, "LoRA", `r=${job.lora.r} alpha=${job.lora.alpha} modules=${[].concat(job.lora.target_modules).join(",")}`);
  detail(dl, "Attempts", `${job.attempts} of ${job.max_attempts}`);
  detail(dl, "Trained tokens", job.trained_tokens);
  detail(dl, "Fine-tuned model", job.fine_tuned_model);
  detail(dl, "Created", fmtTime(job.created_at));
  detail(dl, "Finished", fmtTime(job.finished_at));
  $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";

  const download = $("download-adapter");
  download.disabled = job.status !== "succeeded";
  download.onclick = () => downloadBlob(`/jobs/${job.id}/adapter`, `${job.id}-adapter.tar.gz`);
  const cancel = $("cancel-job");
  cancel.hidden = FINAL.has(job.status) || job.cancel_requested;
  cancel.onclick = () => api(`/jobs/${job.id}/cancel`, { method: "POST" }).then(() => refreshJob(job.id));

  drawChart($("loss-chart"), metrics.data);
  renderCheckpoints(job.id, checkpoints.data);
  await appendEvents(job.id);
  if (FINAL.has(job.status)) {
    stopPolling(); // nothing will change any more
    $("job-view").dataset.settled = job.status; // lets tests (and scripts) wait for the end state
  }
}

function renderCheckpoints(jobId, rows) {
  const items = rows.map((ckpt) => {
    const li = el("li", { "data-step": ckpt.step });
    const loss = ckpt.metrics && ckpt.metrics.train_loss;
    const button = el("button", { type: "button", class: "small" }, "download");
    button.onclick = () => downloadBlob(
      `/jobs/${jobId}/checkpoints/${ckpt.step}/adapter`, `${jobId}-step${ckpt.step}-adapter.tar.gz`);
    li.append(el("span", {}, `step ${ckpt.step}`), el("span", { class: "muted" }, `train loss ${fmtLoss(loss)}`), button);
    return li;
  });
  if (!items.length) items.push(el("li", { class: "muted" }, "none yet"));
  $("checkpoints").replaceChildren(...items);
}

async function appendEvents(jobId) {
  // Events only grow: fetch past the last one seen instead of the whole history every 2 s.
  const page = await getJson(`/jobs/${jobId}/events?after=${lastEventId}&limit=500`);
  const list = $("events");
  for (const event of page.data) {
    const li = el("li", { class: `level-${event.level}`, "data-event-id": event.id });
    li.append(el("span", { class: "muted" }, `${new Date(event.created_at).toLocaleTimeString()} `));
    li.append(document.createTextNode(event.message));
    list.append(li);
    lastEventId = event.id;
  }
  if (page.data.length) list.scrollTop = list.scrollHeight;
}

async function downloadBlob(path, filename) {
  try {
    const blob = await (await api(path)).blob();
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    $("job-error").textContent = `download failed: ${error.message}`;
  }
}

// ---------------------------------------------------------------------------------- chart
// A small SVG line chart: train loss as a line, eval loss as a line with dots (evals are sparse).
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const raw = span / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function drawChart(chart, points) {
  const W = 720, H = 300, M = { left: 56, right: 16, top: 16, bottom: 40 };
  chart.replaceChildren();
  const train = points.filter((p) => p.train_loss !== null && p.train_loss !== undefined);
  const evals = points.filter((p) => p.eval_loss !== null && p.eval_loss !== undefined);
  if (!train.length && !evals.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no metrics yet"));
    chart.dataset.points = "0";
    return;
  }
  const steps = points.map((p) => p.step);
  const losses = train.map((p) => p.train_loss).concat(evals.map((p) => p.eval_loss));
  let [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  if (x0 === x1) x1 = x0 + 1;
  let [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  const pad = (y1 - y0) * 0.08 || 0.1;
  y0 -= pad; y1 += pad;
  const sx = (s) => M.left + ((s - x0) / (x1 - x0)) * (W - M.left - M.right);
  const sy = (v) => H - M.bottom - ((v - y0) / (y1 - y0)) * (H - M.top - M.bottom);

  for (const v of niceTicks(y0, y1, 5)) {
    chart.append(svg("line", { class: "grid", x1: M.left, x2: W - M.right, y1: sy(v), y2: sy(v) }));
    chart.append(svg("text", { x: M.left - 6, y: sy(v) + 4, "text-anchor": "end" }, v));
  }
  for (const s of niceTicks(x0, x1, 8).filter(Number.isInteger)) {
    chart.append(svg("text", { x: sx(s), y: H - M.bottom + 16, "text-anchor": "middle" }, s));
  }
  chart.append(svg("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }));
  chart.append(svg("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
  chart.append(svg("text", { x: (W + M.left) / 2, y: H - 6, "text-anchor": "middle" }, "step"));

  const line = (series, key) => series
    .map((p, i) => `${i ? "L" : "M"}${sx(p.step).toFixed(1)},${sy(p[key]).toFixed(1)}`).join(" ");
  if (train.length) {
    chart.append(svg("path", { class: "series-train", d: line(train, "train_loss"), "data-points": train.length }));
  }
  if (evals.length) {
    chart.append(svg("path", { class: "series-eval", d: line(evals, "eval_loss"), "data-points": evals.length }));
    for (const p of evals) chart.append(svg("circle", { class: "point-eval", cx: sx(p.step), cy: sy(p.eval_loss), r: 3 }));
  }
  const legend = svg("g", { transform: `translate(${W - M.right - 170},${M.top + 4})` });
  legend.append(svg("line", { class: "series-train", x1: 0, x2: 18, y1: 0, y2: 0 }));
  legend.append(svg("text", { x: 24, y: 4 }, `train (${train.length})`));
  legend.append(svg("line", { class: "series-eval", x1: 90, x2: 108, y1: 0, y2: 0 }));
  legend.append(svg("text", { x: 114, y: 4 }, `eval (${evals.length})`));
  chart.append(legend);
  chart.dataset.points = String(train.length + evals.length);
}

// ---------------------------------------------------------------------------------- routing
function route() {
  if (!apiKey()) return showKeyForm();
  const match = location.hash.match(/^#\/jobs\/([A-Za-z0-9_-]+)$/);
  if (match) {
    currentJobId = match[1];
    delete $("job-view").dataset.settled;
    lastEventId = 0;
    $("events").replaceChildren();
    $("loss-chart").replaceChildren();
    show("job-view");
    poll(() => refreshJob(match[1]));
  } else {
    currentJobId = null;
    show("jobs-view");
    poll(refreshJobs);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  route();
});
$("change-key").addEventListener("click", () => showKeyForm());
window.addEventListener("hashchange", route);
route();
