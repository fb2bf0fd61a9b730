// lorafleet web page: one file, no framework, no build step, no CDN.
//
// It is a client of the native JSON API like the CLI is: the API key typed once is kept in
// localStorage and sent as `Authorization: Bearer` on every fetch (downloads and the live event
// stream too, via fetch, since a link or an EventSource cannot carry the header). Data is
// inserted with textContent only, never innerHTML, so a job message cannot inject markup.
//
// Views: #/ jobs, #/new create a job, #/jobs/<id> one job (live through SSE: events and
// progress frames), #/fleet workers and queue (admin keys).
//
// Extending the job page: code loaded after this file can register
//   window.lorafleet.onJob.push((job, container) => { ... })
// to render into its own element inside `container` (#job-extensions) each time the job view
// refreshes; `window.lorafleet.api(path, options)` is the authenticated fetch.
"use strict";

const KEY_STORAGE = "lorafleet.apiKey";
const POLL_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const LORA_FIELDS = ["r", "alpha", "dropout", "target_modules"];
const TRAINING_FIELDS = [
  "epochs", "max_steps", "batch_size", "learning_rate", "max_seq_length", "packing",
  "eval_every_steps", "checkpoint_every_steps", "seed",
];

const LABELS = { r: "rank (r)", max_seq_length: "max sequence length", lr: "learning rate" };

const $ = (id) => document.getElementById(id);
let timer = null;
let lastEventId = 0;
let currentJobId = null;
let stream = null; // AbortController of the job page's live stream
let schemaCache = null;
let estimateTimer = null;
let estimateSeq = 0;

class AuthError extends Error {}
class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

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
    throw new HttpError(response.status, message);
  }
  return response;
}

async function getJson(path) {
  return (await api(path)).json();
}

async function sendJson(path, method, body) {
  const response = await api(path, {
    method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return response.json();
}

window.lorafleet = { api, getJson, onJob: [] };

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

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  let s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(s).padStart(2, "0")} s`;
  return `${s} s`;
}

function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 2 : 0)} ${units[unit]}`;
}

function fmtCount(count) {
  if (count === null || count === undefined) return "–";
  if (count >= 1e9) return `${(count / 1e9).toFixed(1)}B`;
  if (count >= 1e6) return `${(count / 1e6).toFixed(1)}M`;
  if (count >= 1e3) return `${(count / 1e3).toFixed(1)}K`;
  return String(count);
}

function progressOf(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return { fraction: 1, text: p.total_steps ? `${p.total_steps}/${p.total_steps}` : "done" };
  if (p.step !== null && p.step !== undefined && p.total_steps) {
    return { fraction: Math.min(1, p.step / p.total_steps), text: `${p.step}/${p.total_steps}` };
  }
  if (job.status === "queued") {
    return { fraction: 0, text: job.queue_position ? `#${job.queue_position} in queue` : "waiting" };
  }
  return { fraction: 0, text: "–" };
}

function statusBadge(node, status) {
  node.textContent = status;
  node.className = `status status-${status}`;
}

// ---------------------------------------------------------------------------------- views
const VIEWS = ["key-view", "jobs-view", "new-view", "job-view", "fleet-view"];

function show(view) {
  for (const id of VIEWS) $(id).hidden = id !== view;
  $("change-key").hidden = view === "key-view";
  $("nav").hidden = view === "key-view";
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
  if (stream !== null) stream.abort();
  stream = null;
}

function poll(fn, every = POLL_MS) {
  if (timer !== null) clearInterval(timer);
  const tick = () => fn().catch(handleError);
  tick();
  timer = setInterval(tick, every);
}

function handleError(error) {
  if (error instanceof AuthError) showKeyForm("That key was refused; enter a valid one.");
  else console.error(error);
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

// ---------------------------------------------------------------------------------- new job
async function schemas() {
  if (schemaCache === null) {
    const doc = await (await fetch("/openapi.json")).json();
    schemaCache = doc.components.schemas;
  }
  return schemaCache;
}

function plainType(prop) {
  // pydantic writes `X | None` as anyOf [X, null]; the form cares about X.
  const options = prop.anyOf ? prop.anyOf.filter((p) => p.type !== "null") : [prop];
  return options[0] || {};
}

function fieldInput(block, name, prop) {
  const inner = plainType(prop);
  const id = `${block}.${name}`;
  const wrap = el("div", { class: "field" });
  const label = el("label", { for: id }, LABELS[name] || name.replace(/_/g, " "));
  let input;
  if (inner.type === "boolean") {
    input = el("input", { id, type: "checkbox", "data-kind": "boolean" });
    input.checked = prop.default === true;
  } else if (inner.type === "integer" || inner.type === "number") {
    input = el("input", { id, type: "number", "data-kind": inner.type,
      step: inner.type === "integer" ? "1" : "any" });
    for (const key of ["minimum", "maximum"]) {
      if (inner[key] !== undefined) input.setAttribute(key === "minimum" ? "min" : "max", inner[key]);
    }
    if (prop.default !== null && prop.default !== undefined) input.value = prop.default;
    else input.placeholder = "default";
  } else {
    input = el("input", { id, type: "text", "data-kind": "list" });
    input.placeholder = "the model's default";
  }
  input.dataset.block = block;
  input.dataset.name = name;
  const def = prop.default === null || prop.default === undefined ? "server default" : `default ${prop.default}`;
  const help = el("p", { class: "help" }, `${prop.description || ""} (${def})`);
  wrap.append(label, input, help);
  return wrap;
}

async function buildForm() {
  const all = await schemas();
  const blocks = [["lora", "LoraSettings", LORA_FIELDS, "lora-fields"],
    ["training", "TrainingSettings", TRAINING_FIELDS, "training-fields"]];
  for (const [block, schemaName, names, container] of blocks) {
    const fieldset = $(container);
    fieldset.querySelectorAll(".field").forEach((node) => node.remove());
    const props = all[schemaName].properties;
    for (const name of names) {
      if (props[name]) fieldset.append(fieldInput(block, name, props[name]));
    }
  }
  $("new-job").addEventListener("input", scheduleEstimate);
  $("new-job").addEventListener("change", scheduleEstimate);
}

let filePickerFill = 0;
let latestFilePickerFill = Promise.resolve();
const wantedPick = {};

function fillFilePickers(selectTrain, selectValid) {
  // Fills may overlap (the form opening while an upload finishes): only the newest answer is
  // applied, and it selects every file an upload asked for, even one an older, superseded fill
  // was started for. A superseded fill resolves when the newest one has applied.
  if (selectTrain) wantedPick["train-pick"] = selectTrain;
  if (selectValid) wantedPick["valid-pick"] = selectValid;
  const mine = ++filePickerFill;
  const fill = (async () => {
    const page = await getJson("/files?limit=200");
    if (mine !== filePickerFill) return latestFilePickerFill;
    for (const id of ["train-pick", "valid-pick"]) {
      const select = $(id);
      const keep = wantedPick[id] || select.value;
      delete wantedPick[id];
      select.querySelectorAll("option[value^='file-']").forEach((o) => o.remove());
      for (const f of page.data) {
        const option = el("option", { value: f.id }, `${f.filename} · ${f.rows} rows · ${f.format} · ${f.id}`);
        option.dataset.format = f.format;
        select.append(option);
      }
      select.value = keep || "";
      if (select.selectedIndex < 0) select.value = "";
    }
  })();
  latestFilePickerFill = fill;
  return fill;
}

async function fillModels() {
  const page = await getJson("/models");
  const select = $("base-model");
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, "– pick a base model –"));
  for (const m of page.data) {
    const text = m.error ? `${m.id} (unusable: ${m.error})`
      : `${m.id} · ${fmtCount(m.parameters)} params · context ${m.context_length || "?"}` +
        ` · ${m.chat_template ? "chat template" : "no chat template"}`;
    const option = el("option", { value: m.id }, text);
    if (m.error) option.disabled = true;
    option.dataset.model = JSON.stringify(m);
    select.append(option);
  }
  if (current) select.value = current;
  else if (page.data.length === 1 && !page.data[0].error) select.value = page.data[0].id;
  describeModel();
}

function describeModel() {
  const option = $("base-model").selectedOptions[0];
  const info = $("model-info");
  if (!option || !option.dataset.model) { info.textContent = ""; return; }
  const m = JSON.parse(option.dataset.model);
  info.textContent = `${m.model_type || "model"} · ${fmtCount(m.parameters)} parameters · ` +
    `up to ${m.context_length || "?"} tokens per sequence · ` +
    (m.chat_template ? "chat rows use its chat template" : "no chat template: chat rows render as 'Role: content'");
}

async function uploadInto(input, selectId, purpose) {
  const file = input.files[0];
  if (!file) return;
  $("new-error").textContent = `uploading ${file.name}…`;
  const form = new FormData();
  form.append("file", file);
  form.append("purpose", purpose);
  try {
    const record = await (await api("/files", { method: "POST", body: form })).json();
    await fillFilePickers(selectId === "train-pick" ? record.id : null,
      selectId === "valid-pick" ? record.id : null);
    $("new-error").textContent = "";
    scheduleEstimate();
  } catch (error) {
    $("new-error").textContent = `upload refused: ${error.message}`;
  } finally {
    input.value = "";
  }
}

function jobBody() {
  const body = { base_model: $("base-model").value, lora: {}, training: {} };
  const train = $("train-pick").value;
  if (train) body.training_file = train;
  // Preference pairs train with DPO (method defaults to supervised, which refuses them).
  const picked = $("train-pick").selectedOptions[0];
  if (picked && picked.dataset.format === "preference") body.method = { type: "dpo" };
  const valid = $("valid-pick").value;
  if (valid) body.validation_file = valid;
  const suffix = $("suffix").value.trim();
  if (suffix) body.suffix = suffix;
  for (const input of document.querySelectorAll("#new-job [data-block]")) {
    const target = body[input.dataset.block];
    const kind = input.dataset.kind;
    if (kind === "boolean") target[input.dataset.name] = input.checked;
    else if (input.value.trim() === "") continue;
    else if (kind === "integer" || kind === "number") target[input.dataset.name] = Number(input.value);
    else if (input.value.trim() === "all-linear") target[input.dataset.name] = "all-linear";
    else target[input.dataset.name] = input.value.split(",").map((s) => s.trim()).filter(Boolean);
  }
  return body;
}

function scheduleEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(() => runEstimate().catch(handleError), 300);
}

async function runEstimate() {
  const box = $("estimate");
  const body = jobBody();
  if (!body.base_model) {
    box.textContent = "Pick a model to see the estimate.";
    delete box.dataset.fits;
    return;
  }
  const seq = ++estimateSeq;
  try {
    const answer = await sendJson("/estimate", "POST", body);
    if (seq !== estimateSeq) return; // a newer estimate is on its way
    const parts = [];
    const per = answer.memory_bytes.total;
    parts.push(`${fmtBytes(per)} per training process (${answer.world_size} process(es), ${answer.precision})`);
    parts.push(`${fmtCount(answer.parameters.trainable)} trainable of ${fmtCount(answer.parameters.total)} parameters`);
    if (answer.total_steps) parts.push(`${answer.total_steps} steps`);
    if (answer.tokens_per_epoch) parts.push(`${fmtCount(answer.tokens_per_epoch)} tokens per epoch`);
    box.replaceChildren(el("strong", {}, answer.fits === false ? "Does not fit: " : "Estimate: "),
      document.createTextNode(parts.join(" · ")));
    box.append(el("div", { class: "muted" }, answer.reason));
    for (const warning of answer.warnings || []) box.append(el("div", { class: "warning" }, `⚠ ${warning}`));
    box.dataset.fits = String(answer.fits);
    box.className = answer.fits === false ? "estimate bad" : "estimate";
  } catch (error) {
    if (error instanceof AuthError) throw error;
    if (seq !== estimateSeq) return;
    box.replaceChildren(el("strong", {}, "Cannot run as set: "), document.createTextNode(error.message));
    box.dataset.fits = "false";
    box.className = "estimate bad";
  }
}

async function submitJob(event) {
  event.preventDefault();
  const body = jobBody();
  if (!body.training_file) { $("new-error").textContent = "pick or upload a training file"; return; }
  if (!body.base_model) { $("new-error").textContent = "pick a base model"; return; }
  $("submit-job").disabled = true;
  try {
    const job = await sendJson("/jobs", "POST", body);
    location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    if (error instanceof AuthError) throw error;
    $("new-error").textContent = error.message;
  } finally {
    $("submit-job").disabled = false;
  }
}

async function openNewJob(from) {
  show("new-view");
  $("new-error").textContent = "";
  if (!$("lora-fields").querySelector(".field")) await buildForm();
  await Promise.all([fillFilePickers(), fillModels()]);
  if (from) prefill(from);
  scheduleEstimate();
}

function prefill(job) {
  $("base-model").value = job.base_model;
  describeModel();
  for (const [id, file] of [["train-pick", job.training_file], ["valid-pick", job.validation_file]]) {
    $(id).value = file || "";
    if ($(id).selectedIndex < 0) $(id).value = ""; // the file was deleted since
  }
  $("suffix").value = job.suffix || "";
  for (const input of document.querySelectorAll("#new-job [data-block]")) {
    const value = (job[input.dataset.block] || {})[input.dataset.name];
    if (input.dataset.kind === "boolean") input.checked = Boolean(value);
    else if (value === null || value === undefined) input.value = "";
    else input.value = Array.isArray(value) ? value.join(", ") : value;
  }
}

// ---------------------------------------------------------------------------------- one job
function detail(dl, name, value) {
  dl.append(el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "–" : value));
}

function renderProgress(status, p, job) {
  const fraction = status === "succeeded" ? 1
    : (p.step !== null && p.step !== undefined && p.total_steps ? Math.min(1, p.step / p.total_steps) : 0);
  $("job-bar").style.width = `${(fraction * 100).toFixed(1)}%`;
  const parts = [];
  if (status === "queued" && job && job.queue_position) parts.push(`position ${job.queue_position} in the queue`);
  if (p.step !== null && p.step !== undefined && p.total_steps) parts.push(`step ${p.step} of ${p.total_steps}`);
  if (p.train_loss !== null && p.train_loss !== undefined) parts.push(`loss ${fmtLoss(p.train_loss)}`);
  if (p.eval_loss !== null && p.eval_loss !== undefined) parts.push(`eval loss ${fmtLoss(p.eval_loss)}`);
  if (p.reward_accuracy !== null && p.reward_accuracy !== undefined) {
    parts.push(`reward accuracy ${Number(p.reward_accuracy).toFixed(2)}, margin ${fmtLoss(p.reward_margin)}`);
  }
  if (p.eval_reward_accuracy !== null && p.eval_reward_accuracy !== undefined) {
    parts.push(`eval reward accuracy ${Number(p.eval_reward_accuracy).toFixed(2)}`);
  }
  if (p.epoch !== null && p.epoch !== undefined) parts.push(`epoch ${Number(p.epoch).toFixed(2)}`);
  if (p.tokens_per_second && !FINAL.has(status)) parts.push(`${Math.round(p.tokens_per_second).toLocaleString()} tokens/s`);
  if (p.eta_seconds !== null && p.eta_seconds !== undefined && status === "running") {
    parts.push(`about ${fmtDuration(p.eta_seconds)} left`);
  }
  $("job-progress").textContent = parts.join(" · ");
  $("job-progress").dataset.step = p.step === null || p.step === undefined ? "" : String(p.step);
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
  renderProgress(job.status, job.progress || {}, job);

  const dl = $("job-details");
  dl.replaceChildren();
  detail(dl, "Base model", job.base_model);
  detail(dl, "Fine-tuned model", job.fine_tuned_model);
  detail(dl, "Training file", job.training_file);
  detail(dl, "Validation file", job.validation_file);
  const targets = [].concat(job.lora.target_modules || "model default").join(", ");
  detail(dl, "LoRA", `r ${job.lora.r} · alpha ${job.lora.alpha} · dropout ${job.lora.dropout} · ${targets}`);
  const t = job.training;
  detail(dl, "Steps", t.max_steps ? `${t.max_steps} (max_steps)` : `${t.epochs} epoch(s)`);
  detail(dl, "Learning rate", `${t.learning_rate} · ${t.lr_scheduler} · warmup ${t.warmup_ratio}`);
  detail(dl, "Batch", `${t.batch_size} per device × accumulation ${t.gradient_accumulation_steps}`);
  detail(dl, "Sequence length", `${t.max_seq_length}${t.packing ? " · packed" : ""}`);
  detail(dl, "Precision · seed", `${t.precision} · ${t.seed}`);
  detail(dl, "Attempts", `${job.attempts} of ${job.max_attempts}`);
  detail(dl, "Trained tokens", job.trained_tokens === null ? null : job.trained_tokens.toLocaleString());
  detail(dl, "Created", fmtTime(job.created_at));
  detail(dl, "Finished", fmtTime(job.finished_at));
  if (job.deleted_at) detail(dl, "Deleted", fmtTime(job.deleted_at));

  $("job-failure").hidden = !job.error;
  $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("show-logs").onclick = () => showLogs(job);

  const download = $("download-adapter");
  download.disabled = job.status !== "succeeded" || Boolean(job.deleted_at);
  download.onclick = () => downloadBlob(`/jobs/${job.id}/adapter`, `${job.id}-adapter.tar.gz`);
  const cancel = $("cancel-job");
  cancel.hidden = FINAL.has(job.status) || job.cancel_requested;
  cancel.onclick = () => api(`/jobs/${job.id}/cancel`, { method: "POST" }).then(() => refreshJob(job.id));
  $("clone-job").onclick = () => { location.hash = `#/new?from=${job.id}`; };

  drawChart($("loss-chart"), metrics.data);
  renderCheckpoints(job.id, checkpoints.data);
  for (const hook of window.lorafleet.onJob) {
    try { hook(job, $("job-extensions")); } catch (error) { console.error(error); }
  }
  if (stream === null) await appendEvents(job.id); // the live stream delivers them otherwise
  if (FINAL.has(job.status)) {
    await appendEvents(job.id);
    stopPolling(); // nothing will change any more
    $("job-view").dataset.settled = job.status; // lets tests (and scripts) wait for the end state
  }
}

async function showLogs(job) {
  // GET /jobs/{id}/logs?attempt=N returns the attempt's rank logs as text; servers without the
  // route (older releases) answer 404/405, and the page says so instead of failing.
  const pre = $("job-logs");
  pre.hidden = false;
  pre.textContent = "loading…";
  try {
    const attempt = job.attempts || 1;
    const text = await (await api(`/jobs/${job.id}/logs?attempt=${attempt}`)).text();
    pre.textContent = text || "(the log is empty)";
  } catch (error) {
    pre.textContent = error instanceof HttpError && [404, 405].includes(error.status)
      ? `No logs available for this job on this server (${error.message}).`
      : `Could not load the logs: ${error.message}`;
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

function addEvent(event) {
  if (event.id <= lastEventId) return;
  const li = el("li", { class: `level-${event.level}`, "data-event-id": event.id });
  li.append(el("span", { class: "muted" }, `${new Date(event.created_at).toLocaleTimeString()} `));
  li.append(document.createTextNode(event.message));
  $("events").append(li);
  lastEventId = event.id;
  $("events").scrollTop = $("events").scrollHeight;
}

async function appendEvents(jobId) {
  const page = await getJson(`/jobs/${jobId}/events?after=${lastEventId}&limit=500`);
  page.data.forEach(addEvent);
}

async function follow(jobId) {
  // The SSE stream through fetch (EventSource cannot send the key): events as they happen and
  // `event: progress` frames for the bar. When it ends (job final, or a dropped connection)
  // the 2 s polling of the job object carries on alone.
  const controller = new AbortController();
  stream = controller;
  try {
    const response = await api(`/jobs/${jobId}/events?after=${lastEventId}`, {
      headers: { Accept: "text/event-stream" }, signal: controller.signal,
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message", data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data || currentJobId !== jobId) continue;
        const payload = JSON.parse(data);
        if (kind === "progress") renderProgress(payload.status, payload, null);
        else addEvent(payload);
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") handleError(error);
  } finally {
    if (stream === controller) stream = null;
  }
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
    $("job-failure").hidden = false;
  }
}

// ---------------------------------------------------------------------------------- fleet
async function refreshFleet() {
  try {
    const [workers, queue] = await Promise.all([getJson("/workers"), getJson("/queue")]);
    $("fleet-error").textContent = "";
    $("workers").querySelector("tbody").replaceChildren(...workers.data.map((w) => {
      const tr = el("tr", { "data-worker-id": w.id });
      const status = el("span");
      statusBadge(status, w.status);
      const statusCell = el("td");
      statusCell.append(status);
      const devices = w.gpus ? `${w.gpus} × ${w.gpu_type || "GPU"}` : `CPU · ${w.procs} process(es)`;
      const memory = w.gpus ? `${fmtBytes(w.gpu_memory_bytes)} per GPU` : fmtBytes(w.host_memory_bytes);
      const jobCell = el("td");
      if (w.current_job) jobCell.append(el("span", {}, w.current_job));
      tr.append(el("td", {}, w.id), el("td", {}, w.hostname), statusCell, el("td", {}, devices),
        el("td", {}, memory), jobCell, el("td", {}, fmtTime(w.last_heartbeat)));
      return tr;
    }));
    const now = Date.now();
    $("queue").querySelector("tbody").replaceChildren(...queue.data.map((q) => row(
      { "data-job-id": q.id },
      [q.position, q.id, q.owner, q.base_model, q.priority,
        q.gpus_required ? `${q.gpus_required}${q.gpu_type ? " × " + q.gpu_type : ""}` : "any",
        fmtDuration((now - new Date(q.created_at).getTime()) / 1000)])));
    $("queue-empty").hidden = queue.data.length > 0;
  } catch (error) {
    if (error instanceof HttpError && error.status === 403) {
      $("fleet-error").textContent = "The fleet view needs an admin key (lorafleet keys create --admin).";
      stopPolling();
      return;
    }
    throw error;
  }
}

function row(attrs, values) {
  const tr = el("tr", attrs);
  for (const value of values) tr.append(el("td", {}, value));
  return tr;
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
  stopPolling();
  if (!apiKey()) return showKeyForm();
  const hash = location.hash;
  const match = hash.match(/^#\/jobs\/([A-Za-z0-9_-]+)$/);
  if (match) {
    currentJobId = match[1];
    delete $("job-view").dataset.settled;
    lastEventId = 0;
    $("events").replaceChildren();
    $("loss-chart").replaceChildren();
    $("job-logs").hidden = true;
    $("job-extensions").replaceChildren();
    show("job-view");
    appendEvents(match[1]).then(() => { if (currentJobId === match[1]) follow(match[1]); }).catch(handleError);
    poll(() => refreshJob(match[1]));
    return;
  }
  currentJobId = null;
  if (hash.startsWith("#/new")) {
    const from = new URLSearchParams(hash.split("?")[1] || "").get("from");
    (from ? getJson(`/jobs/${from}`) : Promise.resolve(null))
      .then((job) => openNewJob(job)).catch(handleError);
  } else if (hash === "#/fleet") {
    show("fleet-view");
    poll(refreshFleet, 3000);
  } else {
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
$("new-job").addEventListener("submit", (event) => submitJob(event).catch(handleError));
$("train-upload").addEventListener("change", () => uploadInto($("train-upload"), "train-pick", "fine-tune"));
$("valid-upload").addEventListener("change", () => uploadInto($("valid-upload"), "valid-pick", "validation"));
$("base-model").addEventListener("change", describeModel);
window.addEventListener("hashchange", route);
route();
