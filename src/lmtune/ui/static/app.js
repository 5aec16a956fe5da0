// lmtune ui: one page, four steps. Every action is a call of the JSON API in lmtune/ui/app.py; every text comes
// from texts.py (window.BOOT.texts), in the language chosen on the page.
"use strict";

const S = {
  lang: window.BOOT.lang,
  datasets: [], presets: {}, runs: [], quants: [], heldout: "", bundled: "",
  selected: new Set(JSON.parse(localStorage.getItem("lmtune.selected") || "[]")),
  inspect: null, clean: null, status: null, estimate: null, report: null, merge: null, export: null,
  chat: {base: [], tuned: []},
};
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- texts

function t(key, values) {
  let s = (window.BOOT.texts[S.lang] || {})[key];
  if (s === undefined) s = key;
  for (const [k, v] of Object.entries(values || {})) s = s.split("{" + k + "}").join(String(v));
  return s;
}

function applyTexts() {
  document.documentElement.lang = S.lang;
  document.title = t("title");
  document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t(el.dataset.t); });
  document.querySelectorAll("[data-t-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.tPlaceholder); });
  $("lang-vi").classList.toggle("active", S.lang === "vi");
  $("lang-en").classList.toggle("active", S.lang === "en");
}

function setLanguage(lang) {
  S.lang = lang;
  document.cookie = "lmtune_lang=" + lang + "; path=/; max-age=31536000; samesite=strict";
  applyTexts();
  renderAll();
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function duration(seconds) {
  if (seconds === undefined || seconds === null || !isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + " " + t("unit_s");
  if (seconds < 3600) return Math.floor(seconds / 60) + " " + t("unit_min") + " " + (seconds % 60) + " " + t("unit_s");
  return Math.floor(seconds / 3600) + " " + t("unit_h") + " " + Math.round((seconds % 3600) / 60) + " " + t("unit_min");
}

const num = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// ---------------------------------------------------------------- API and errors

// Every request carries the page token the server wrote into this page (window.BOOT.token): the server accepts
// no change (upload, train, stop, export, ...) without it, so that another site's page cannot make one.
function headers(extra) {
  return Object.assign({"X-Lmtune-Lang": S.lang, "X-Lmtune-Token": window.BOOT.token}, extra || {});
}

async function api(method, url, body) {
  const response = await fetch(url, {
    method, headers: headers({"Content-Type": "application/json"}),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = {error: "HTTP " + response.status}; }
  if (!response.ok) throw new Error(withHint(data) || "HTTP " + response.status);
  return data;
}

// The CLI's line, and where the page has the field it advises (the server's hint, in the page's language).
function withHint(data) {
  return data && data.error ? data.error + (data.hint ? "\n" + data.hint : "") : "";
}

function showError(message) {
  $("error-text").textContent = message;
  // which refusal it is, when it is the "a training is already running" one: it goes when that training ends
  $("error-text").dataset.key = message.startsWith(t("train_running").split("(")[0]) ? "train_running" : "";
  $("error").classList.remove("hidden");
}

function clearError() { $("error").classList.add("hidden"); $("error-text").textContent = ""; }

async function guarded(action) {
  clearError();
  try { return await action(); } catch (e) { showError(e.message); return null; }
}

// A slow action runs on the server; poll it until it is done (a reload finds it again).
async function runTask(kind, url, body, where) {
  if (where) where.textContent = t("working");
  const task = await api("POST", url, body);
  return pollTask(kind, where, task);
}

async function pollTask(kind, where, task) {
  while (task.state === "running") {
    await new Promise((r) => setTimeout(r, 600));
    task = await api("GET", "/api/task/" + kind);
  }
  if (where) where.textContent = "";
  if (task.state === "failed") throw new Error(withHint(task));
  return task.result;
}

// ---------------------------------------------------------------- tabs

function showTab(name) {
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("hidden", p.id !== "page-" + name));
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  localStorage.setItem("lmtune.tab", name);
  if (name === "try") loadReport();
}

// ---------------------------------------------------------------- data

function saveSelection() { localStorage.setItem("lmtune.selected", JSON.stringify([...S.selected])); }

// The columns and separator picked on the Data page (empty: detected), as train's data.* settings.
const SOURCE_FIELDS = {question_field: "field-question", answer_field: "field-answer",
                       messages_field: "field-messages", csv_delimiter: "field-delimiter"};

function sourceFields() {
  return Object.fromEntries(Object.entries(SOURCE_FIELDS).map(([key, id]) => [key, $(id).value.trim()]));
}

function renderDatasets() {
  const known = new Set(S.datasets.map((d) => d.path));
  for (const p of [...S.selected]) if (!known.has(p)) S.selected.delete(p);
  if (!S.selected.size && S.bundled) S.selected.add(S.bundled);
  saveSelection();
  const box = $("datasets");
  box.replaceChildren(...S.datasets.map((d) => {
    const input = el("input", {type: "checkbox", "data-path": d.path});
    input.checked = S.selected.has(d.path);
    input.addEventListener("change", () => {
      if (input.checked) S.selected.add(d.path); else S.selected.delete(d.path);
      saveSelection(); renderTrainData();
    });
    const label = d.bundled ? t(d.label || "use_bundled") : d.name;
    const remove = d.bundled ? "" : el("button", {type: "button", class: "remove-file", title: t("remove_file"),
      "aria-label": t("remove_file") + ": " + d.name, onclick: () => removeFile(d.path)}, "×");
    return el("div", {class: "dataset"}, el("label", {}, input, " ", label), " ", remove);
  }));
  renderTrainData();
  renderEvalData();  // an upload can be evaluated on at once, without a reload
}

function renderTrainData() {
  const names = S.datasets.filter((d) => S.selected.has(d.path)).map((d) => d.name);
  $("train-data").textContent = names.length ? names.join(", ") : t("no_data_selected");
}

async function upload(files) {
  await guarded(async () => {
    const added = [];
    for (const file of files) {
      const response = await fetch("/api/upload?name=" + encodeURIComponent(file.name), {
        method: "POST", headers: headers(), body: file});
      const data = await response.json();
      if (!response.ok) throw new Error(withHint(data));
      added.push(data.path);
    }
    await refreshState();
    S.selected = new Set(added);
    renderDatasets();
    await inspect();
  });
  $("upload").value = "";
}

async function removeFile(path) {
  await guarded(async () => {
    await api("POST", "/api/files/remove", {path});
    S.selected.delete(path);
    await refreshState();
    renderDatasets(); renderEvalData();
  });
}

async function inspect() {
  S.inspect = null;
  renderInspect();
  $("inspect-report").textContent = t("working");
  await guarded(async () => {
    S.inspect = await api("POST", "/api/inspect", Object.assign({
      paths: [...S.selected], model: $("inspect-model").value, max_length: Number($("inspect-max-length").value)},
      sourceFields()));
  });
  renderInspect();
}

function stats(s) {
  return s ? t("length_stats", {min: s.min, median: s.median, p95: s.p95, max: s.max}) : "–";
}

function verdictLines(r) {
  const f = Object.fromEntries(Object.entries(r.findings).map(([k, v]) => [k, v.count]));
  const lines = [];
  if (r.invalid.count) lines.push(t("v_invalid", {n: r.invalid.count}));
  const byClean = f.empty_question + f.empty_answer + f.exact_duplicate + f.broken_encoding + f.not_nfc +
    f.control_characters + f.untidy_whitespace;
  if (byClean) lines.push(t("v_clean", {n: byClean}));
  if (f.near_duplicate) lines.push(t("v_near", {n: f.near_duplicate}));
  if (r.conflicting_questions) lines.push(t("v_conflicting", {n: r.conflicting_questions}));
  if (f.missing_diacritics) lines.push(t("v_diacritics", {n: f.missing_diacritics}));
  const tk = r.tokens;
  if (tk && (tk.truncated || tk.prompt_too_long)) {
    const n = tk.truncated + tk.prompt_too_long;
    // The advice stops at the model's context, as `lmtune data inspect` does.
    lines.push(tk.context && tk.lengths.p95 > tk.context
      ? t("v_tokens_context", {n, max_length: tk.max_length, context: tk.context})
      : t("v_tokens", {n, max_length: tk.max_length, p95: tk.lengths.p95}));
  }
  return lines.length ? lines : [t("v_ok")];
}

function histogram(bins) {
  const w = 640, h = 170, left = 40, bottom = 36, top = 10;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("id", "token-histogram");
  const most = Math.max(1, ...bins.map((b) => b[2]));
  const bw = (w - left - 10) / bins.length;
  const add = (tag, attrs, content) => {
    const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (content !== undefined) n.textContent = content;
    svg.append(n); return n;
  };
  bins.forEach(([lo, hi, count], i) => {
    const bh = (h - top - bottom) * count / most;
    add("rect", {x: left + i * bw + 1, y: h - bottom - bh, width: Math.max(1, bw - 2), height: bh, class: "hbar"});
    add("text", {x: left + i * bw + bw / 2, y: h - bottom - bh - 2, "text-anchor": "middle", class: "small"}, count);
    add("text", {x: left + i * bw + bw / 2, y: h - bottom + 14, "text-anchor": "middle", class: "small"}, lo === hi ? lo : lo + "–" + hi);
  });
  add("line", {x1: left, x2: w - 10, y1: h - bottom, y2: h - bottom, class: "axis"});
  return svg;
}

function renderInspect() {
  const box = $("inspect-report");
  const r = S.inspect;
  if (!r) { box.replaceChildren(); return; }
  if (r.kind === "preference") { box.replaceChildren(...preferenceReport(r)); return; }
  const parts = [el("h3", {}, t("report")),
    el("p", {id: "inspect-summary"}, t("rows_read", {n: r.rows_read, files: r.files.length}))];
  const files = el("ul", {});
  for (const f of r.files) {
    const columns = Object.entries(f.columns).map(([k, v]) => k + "=" + v).join(", ") || "–";
    files.append(el("li", {}, t("file_line", {path: f.path.split("/").pop(), format: f.format, rows: f.rows, columns})));
  }
  parts.push(files);
  if (r.conversations) parts.push(el("p", {}, t("conversations", {n: r.conversations})));
  parts.push(el("p", {}, t("question_chars") + ": " + stats(r.question_chars)),
             el("p", {}, t("answer_chars") + ": " + stats(r.answer_chars)));
  if (r.tokens && r.tokens.lengths) {
    parts.push(el("h4", {}, t("tokens_title") + " (" + r.tokens.model + ")"),
               el("p", {}, stats(r.tokens.lengths)), histogram(r.tokens.histogram || []),
               el("p", {}, t("tokens_cut", {truncated: r.tokens.truncated, max_length: r.tokens.max_length,
                                             prompt_too_long: r.tokens.prompt_too_long})));
  }
  const table = el("table", {class: "list", id: "checks"},
    el("tr", {}, el("th", {}, t("check_name")), el("th", {}, t("count")), el("th", {}, t("examples"))));
  for (const [name, finding] of Object.entries(r.findings)) {
    table.append(el("tr", {class: finding.count ? "problem" : ""},
      el("td", {}, t("chk_" + name)), el("td", {class: "num"}, finding.count),
      el("td", {}, el("ul", {}, finding.examples.slice(0, 3).map((x) => el("li", {}, x))))));
  }
  if (r.invalid.count) {
    table.append(el("tr", {class: "problem"}, el("td", {}, t("v_invalid", {n: r.invalid.count})),
      el("td", {class: "num"}, r.invalid.count), el("td", {}, el("ul", {}, r.invalid.examples.slice(0, 3).map((x) => el("li", {}, x))))));
  }
  parts.push(el("h4", {}, t("checks")), table, el("h4", {}, t("verdict")),
             el("ul", {id: "verdict"}, verdictLines(r).map((line) => el("li", {}, line))));
  box.replaceChildren(...parts);
}

// data inspect on preference data: rows and pairs, the length of each side, each problem with its file and line.
function preferenceReport(r) {
  const parts = [el("h3", {}, t("report")),
    el("p", {id: "inspect-summary"}, t("pref_summary", {rows: r.rows, files: r.files.length, pairs: r.pairs, unpaired: r.unpaired})),
    el("ul", {}, r.files.map((f) => el("li", {}, f.split("/").pop()))),
    el("h4", {}, t("pref_lengths_" + r.unit))];
  for (const [side, lengths] of Object.entries(r.lengths)) {
    const name = side === "chosen" && !r.pairs ? "completion" : side;  // unpaired rows have one answer each
    parts.push(el("p", {}, t("side_" + name) + ": " + stats(lengths)));
  }
  const table = el("table", {class: "list", id: "checks"},
    el("tr", {}, el("th", {}, t("check_name")), el("th", {}, t("count")), el("th", {}, t("examples"))));
  for (const [kind, count] of Object.entries(r.counts)) {
    const examples = r.problems.filter((p) => p.problem === kind).slice(0, 3)
      // files by their names, as the page lists them ("as /home/.../uploads/x.jsonl:3" -> "as x.jsonl:3")
      .map((p) => el("li", {}, p.where.split("/").pop() + (p.detail ? ": " + p.detail.replace(/\/\S*\//g, "") : "")));
    table.append(el("tr", {class: count ? "problem" : "", "data-problem": kind},
      el("td", {}, t("pp_" + kind)), el("td", {class: "num"}, count), el("td", {}, el("ul", {}, examples))));
  }
  parts.push(el("h4", {}, t("checks")), table, el("h4", {}, t("verdict")),
    el("ul", {id: "verdict"}, el("li", {}, r.problems_total ? t("v_pref_clean", {n: r.problems_total}) : t("v_ok"))),
    el("details", {}, el("summary", {}, "lmtune data inspect"), el("pre", {class: "commands"}, r.text)));
  return parts;
}

async function clean() {
  await guarded(async () => {
    S.clean = await api("POST", "/api/clean", Object.assign({paths: [...S.selected], dedupe: $("dedupe").value},
                                                            sourceFields()));
    await refreshState();
    S.selected = new Set([S.clean.output]);
    renderDatasets();
  });
  renderClean();
}

function renderClean() {
  const c = S.clean, box = $("clean-report");
  if (!c) { box.replaceChildren(); return; }
  const dropped = Object.values(c.dropped).reduce((a, b) => a + b, 0);
  const parts = [el("p", {id: "clean-summary"}, t("clean_done", {kept: c.kept, rows: c.rows_read, output: c.output.split("/").pop(), dropped}))];
  if (c.rejects.length) {
    const table = el("table", {class: "list", id: "rejects"},
      el("tr", {}, el("th", {}, t("reason")), el("th", {}, t("where")), el("th", {}, t("row_col"))));
    for (const r of c.rejects) {
      const word = t("rsn_" + r.reason);
      table.append(el("tr", {}, el("td", {"data-reason": r.reason}, word === "rsn_" + r.reason ? r.reason : word),
        el("td", {}, r.where || ""),
        el("td", {}, r.detail || r.error || JSON.stringify(r.row || {}).slice(0, 160))));
    }
    parts.push(el("h4", {}, t("rejects")), table);
  } else {
    parts.push(el("p", {}, t("no_rejects")));
  }
  box.replaceChildren(...parts);
}

// ---------------------------------------------------------------- train

function renderPresets() {
  const select = $("train-preset");
  const current = select.value || "quickstart";
  select.replaceChildren(...Object.keys(S.presets).map((name) => {
    const label = t("preset_" + name);
    return el("option", {value: name}, label === "preset_" + name ? name : label);
  }));
  if (S.presets[current]) select.value = current;
}

function fillPreset(keepModel) {
  const p = S.presets[$("train-preset").value];
  if (!p) return;
  if (!keepModel || !$("train-model").value) setModel(p.model);
  $("train-epochs").value = p.epochs;
  $("train-lr").value = p.learning_rate;
  $("train-r").value = p.r;
  $("train-val").value = p.val_size;
  $("train-max-samples").value = p.max_samples;
  saveForm();
}

function setModel(value) {
  document.querySelectorAll(".model-field").forEach((f) => { f.value = value; });
}

// The form as it was left (a reload or a later visit), else the preset's values.
const FORM_FIELDS = {model: "train-model", epochs: "train-epochs", learning_rate: "train-lr", r: "train-r",
                     val_size: "train-val", max_samples: "train-max-samples", method: "train-method", beta: "train-beta",
                     loss_type: "train-loss-type"};
const PREFERENCE_METHODS = new Set(["dpo", "orpo", "kto"]);

function saveForm() { localStorage.setItem("lmtune.form", JSON.stringify(trainForm())); }

function restoreForm() {
  const saved = JSON.parse(localStorage.getItem("lmtune.form") || "null");
  if (!saved || !S.presets[saved.preset]) { fillPreset(false); return; }
  $("train-preset").value = saved.preset;
  for (const [key, id] of Object.entries(FORM_FIELDS)) if (saved[key] !== undefined) $(id).value = saved[key];
  $("train-init-adapter").dataset.want = saved.init_adapter || "";  // its runs are listed later (renderRuns)
  setModel(saved.model);
  showMethodFields();
}

// beta for the preference methods, the loss for DPO only: the fields of the other methods are hidden (and not sent).
function showMethodFields() {
  const method = $("train-method").value;
  document.querySelectorAll(".preference-field").forEach((f) => f.classList.toggle("hidden", !PREFERENCE_METHODS.has(method)));
  document.querySelectorAll(".dpo-field").forEach((f) => f.classList.toggle("hidden", method !== "dpo"));
}

function trainForm() {
  const method = $("train-method").value;
  return {preset: $("train-preset").value, model: $("train-model").value, epochs: $("train-epochs").value,
          learning_rate: $("train-lr").value, r: $("train-r").value, val_size: $("train-val").value,
          max_samples: $("train-max-samples").value, name: $("train-name").value, paths: [...S.selected],
          method, beta: PREFERENCE_METHODS.has(method) ? $("train-beta").value : "",
          loss_type: method === "dpo" ? $("train-loss-type").value : "",
          init_adapter: $("train-init-adapter").value, ...sourceFields()};
}

async function estimate() {
  S.estimate = null;
  await guarded(async () => { S.estimate = await runTask("estimate", "/api/estimate", trainForm(), $("estimate")); });
  renderEstimate();
}

function renderEstimate() {
  const e = S.estimate;
  if (!e) return;
  $("estimate").textContent = t("estimate_result", {
    samples: e.samples, tokens: e.tokens, steps: e.optimizer_steps, step_s: num(e.seconds_per_optimizer_step, 2),
    // seconds_total: the whole run, with its validation loss and end-of-run report (training.train's dry run)
    epoch: duration(e.seconds_per_epoch), total: duration(e.seconds_total || e.seconds_per_optimizer_step * e.optimizer_steps)});
}

async function startTraining() {
  await guarded(async () => {
    S.status = await api("POST", "/api/train/start", trainForm());
    $("train-name").value = "";
    renderStatus();
    refreshRuns();
    pollStatus();
  });
}

async function stopTraining() {
  await guarded(async () => { S.status = await api("POST", "/api/train/stop"); renderStatus(); });
}

async function resumeTraining(name) {
  await guarded(async () => {
    S.status = await api("POST", "/api/train/resume", {run: name || (S.status && S.status.run)});
    renderStatus();
    refreshRuns();
    pollStatus();
  });
}

const ACTIVE = new Set(["starting", "running", "stopping", "evaluating"]);
let polling = false;

async function pollStatus() {
  if (polling) return;
  polling = true;
  try {
    while (true) {
      try { S.status = await api("GET", "/api/train/status"); } catch (e) { /* the server restarts: try again */ }
      renderStatus();
      if (!S.status || !ACTIVE.has(S.status.state)) {
        if ($("error-text").dataset.key === "train_running") clearError();  // that training has ended
        break;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  } finally {
    polling = false;
  }
  await refreshRuns();
}

function renderStatus() {
  const s = S.status || {state: "idle"};
  const state = $("train-state");
  state.textContent = t("state_" + s.state);
  state.dataset.state = s.state;
  $("train-run").textContent = s.run ? "(" + s.run + ")" : "";
  const total = s.total_steps || 0;
  $("train-bar").style.width = (total ? Math.min(100, 100 * (s.step || 0) / total) : s.state === "finished" ? 100 : 0) + "%";
  $("fig-step").textContent = s.run ? (s.step || 0) + (total ? " / " + total : "") : "–";
  $("fig-loss").textContent = num(s.loss, 4);
  $("fig-lr").textContent = s.lr === null || s.lr === undefined ? "–" : Number(s.lr).toExponential(2);
  $("fig-tps").textContent = s.tokens_per_s ? Math.round(s.tokens_per_s).toLocaleString() : "–";
  $("fig-eta").textContent = s.state === "running" ? duration(s.eta_s) : "–";
  $("fig-elapsed").textContent = s.elapsed ? duration(s.elapsed) : "–";
  renderRewards(s.rewards || {});
  $("train-error").textContent = s.error || "";
  $("console").textContent = (s.console || []).join("\n");
  $("stop-btn").disabled = !(s.state === "running" || s.state === "starting");
  $("resume-btn").disabled = !s.resumable;
  plotLoss(s.train || [], s.val || [], total);
}

// The preference figures of the newest log entry (DPO, ORPO: reward accuracy and margin; KTO: the rewards of good
// and bad answers), with the validation ones beside them; nothing for a method that logs none.
function renderRewards(r) {
  const box = $("rewards");
  const pct = (x) => Math.round(100 * x) + "%";
  const figures = [["reward_accuracy", "accuracy", pct], ["reward_margin", "margin", (x) => num(x, 3)],
                   ["reward_desirable", "desirable", (x) => num(x, 3)], ["reward_undesirable", "undesirable", (x) => num(x, 3)]];
  const shown = figures.filter(([, name]) => r[name] !== undefined && r[name] !== null).map(([key, name, format]) => {
    const value = format(r[name]);
    const words = r["eval_" + name] !== undefined ? t("rewards_line", {what: t(key), value, val: format(r["eval_" + name])})
                                                 : t(key) + ": " + value;
    return el("span", {class: "reward", "data-figure": name, title: name === "accuracy" ? t("rewards_hint") : ""}, words);
  });
  box.replaceChildren(...shown);
  box.classList.toggle("hidden", !shown.length);
}

function plotLoss(train, val, total) {
  const svg = $("loss-plot");
  const w = Number(svg.getAttribute("width")), h = Number(svg.getAttribute("height"));
  const left = 52, right = 14, top = 26, bottom = 30;
  svg.dataset.trainPoints = train.length;
  svg.dataset.valPoints = val.length;
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, content) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (content !== undefined) n.textContent = content;
    svg.append(n); return n;
  };
  svg.replaceChildren();
  const all = train.concat(val);
  const maxStep = Math.max(1, total || 0, ...all.map((p) => p[0]));
  let lo = Math.min(...all.map((p) => p[1])), hi = Math.max(...all.map((p) => p[1]));
  if (!all.length) { lo = 0; hi = 1; }
  if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
  const pad = (hi - lo) * 0.06;
  lo = lo >= 0 ? Math.max(0, lo - pad) : lo - pad;  // a loss is never below 0: no negative axis under it
  hi += pad;
  const x = (step) => left + (w - left - right) * step / maxStep;
  const y = (loss) => top + (h - top - bottom) * (hi - loss) / (hi - lo);
  add("line", {x1: left, x2: w - right, y1: h - bottom, y2: h - bottom, class: "axis"});
  add("line", {x1: left, x2: left, y1: top, y2: h - bottom, class: "axis"});
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4;
    add("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "small"}, v.toFixed(2));
    const s = Math.round(maxStep * i / 4);
    add("text", {x: x(s), y: h - bottom + 16, "text-anchor": "middle", class: "small"}, s);
  }
  add("text", {x: w - right, y: h - 4, "text-anchor": "end", class: "small"}, t("step"));
  if (train.length) add("polyline", {points: train.map((p) => x(p[0]) + "," + y(p[1])).join(" "), class: "train-line"});
  if (val.length) {
    add("polyline", {points: val.map((p) => x(p[0]) + "," + y(p[1])).join(" "), class: "val-line"});
    for (const p of val) add("circle", {cx: x(p[0]), cy: y(p[1]), r: 3.5, class: "val-point"});
  }
  add("line", {x1: left + 10, x2: left + 34, y1: 12, y2: 12, class: "train-line"});
  add("text", {x: left + 40, y: 16, class: "small"}, t("train_loss"));
  add("line", {x1: left + 190, x2: left + 214, y1: 12, y2: 12, class: "val-line"});
  add("text", {x: left + 220, y: 16, class: "small"}, t("val_loss"));
}

async function refreshRuns() {
  try { S.runs = await api("GET", "/api/runs"); } catch (e) { return; }
  renderRuns();
}

function renderRuns() {
  const table = $("runs");
  table.replaceChildren(el("tr", {}, el("th", {}, t("run")), el("th", {}, t("state")), el("th", {}, "")));
  for (const r of S.runs) {
    const state = r.running ? t("state_running") : r.finished ? t("run_finished") : r.resumable ? t("run_partial") : t("state_stopped");
    const action = r.resumable ? el("button", {type: "button", class: "resume-run", "data-run": r.name,
      onclick: () => resumeTraining(r.name)}, t("resume")) : "";
    table.append(el("tr", {}, el("td", {}, r.name), el("td", {}, state), el("td", {}, action)));
  }
  renderInitAdapter();
  for (const select of document.querySelectorAll(".run-select")) {
    const current = select.value;
    const finished = S.runs.filter((r) => r.finished);
    select.replaceChildren(...(finished.length ? finished.map((r) => el("option", {value: r.name}, r.name))
                                               : [el("option", {value: ""}, t("no_runs"))]));
    if (finished.some((r) => r.name === current)) select.value = current;
  }
  suggestEvalData();
}

// The finished runs with an adapter, which a new run may continue (train.init_adapter); first "none".
function renderInitAdapter() {
  const select = $("train-init-adapter");
  const want = select.dataset.want !== undefined ? select.dataset.want : select.value;
  const adapters = S.runs.filter((r) => r.adapter);
  select.replaceChildren(el("option", {value: ""}, t("init_adapter_none")),
                         ...adapters.map((r) => el("option", {value: r.name}, r.name)));
  select.value = adapters.some((r) => r.name === want) ? want : "";
}

// ---------------------------------------------------------------- try

function renderChat() { renderSide("base"); renderSide("tuned"); }

// One side only: the other side's answer may be streaming into its last bubble.
function renderSide(side) {
  const box = $("chat-" + side);
  box.replaceChildren(...S.chat[side].map((m) => el("div", {class: "msg " + m.role + (m.cut ? " cut" : "")},
    m.content + (m.cut ? " " + t("answer_cut") : ""))));
  box.scrollTop = box.scrollHeight;
}

async function ask() {
  const question = $("question").value.trim();
  const run = $("try-run").value;
  if (!question || !run) return;
  clearError();
  $("question").value = "";
  for (const side of ["base", "tuned"]) S.chat[side].push({role: "user", content: question});
  renderChat();
  $("ask-btn").disabled = true;
  try {
    await Promise.all(["base", "tuned"].map((side) => streamAnswer(run, side)));
  } finally {
    $("ask-btn").disabled = false;
  }
}

async function streamAnswer(run, side) {
  const history = S.chat[side].filter((m) => !m.pending).map((m) => ({role: m.role, content: m.content}));
  const answer = {role: "assistant", content: "", pending: true};
  S.chat[side].push(answer);
  const box = $("chat-" + side);
  renderSide(side);
  const bubble = box.lastChild;
  bubble.textContent = t("loading_model");
  bubble.classList.add("waiting");
  try {
    const response = await fetch("/api/chat", {method: "POST",
      headers: headers({"Content-Type": "application/json"}),
      body: JSON.stringify({run, side, messages: history, greedy: $("try-greedy").checked, max_new_tokens: Number($("try-max").value)})});
    if (!response.ok) throw new Error((await response.json()).error);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffered.indexOf("\n")) >= 0) {
        const item = JSON.parse(buffered.slice(0, cut));
        buffered = buffered.slice(cut + 1);
        if (item.error) throw new Error(item.error);
        if (item.started !== undefined || item.dropped !== undefined) { bubble.textContent = ""; bubble.classList.remove("waiting"); }
        if (item.text) { answer.content += item.text; bubble.textContent = answer.content; }
        if (item.done) { answer.cut = item.finish === "length"; }
      }
    }
    delete answer.pending;
  } catch (e) {
    S.chat[side].pop();
    showError(e.message);
  }
  renderSide(side);
}

async function loadReport() {
  const run = $("try-run").value;
  if (!run) { S.report = null; renderReport(); return; }
  try { S.report = await api("GET", "/api/report?run=" + encodeURIComponent(run)); } catch (e) { S.report = null; }
  renderReport();
}

const METRICS = ["answer_loss", "perplexity", "chrf", "rouge_l", "exact_match", "eos_rate", "length_ratio"];
// `lmtune eval` on preference pairs (evaluation/preference.py): its figures, and per pair the answers
const PREFERENCE_METRICS = ["chosen_preferred", "mean_margin", "closer_to_chosen", "chrf_vs_chosen", "eos_rate", "length_ratio"];

function preferenceEvalReport(kind, report, predictions) {
  const base = report.base;
  const data = (report.data || []).map((d) => String(d).split("/").pop()).join(", ");
  const table = el("table", {class: "list report-table"}, el("tr", {}, el("th", {}, t("metric")), el("th", {}, t("tuned")),
    base ? el("th", {}, t("base")) : null, base ? el("th", {}, t("difference")) : null));
  for (const key of PREFERENCE_METRICS) {
    const tv = report.tuned[key], bv = base ? base[key] : null;
    const digits = key === "mean_margin" ? 3 : key === "length_ratio" ? 2 : 1;
    table.append(el("tr", {}, el("td", {}, t("m_" + key)), el("td", {class: "num"}, num(tv, digits)),
      base ? el("td", {class: "num"}, num(bv, digits)) : null,
      base ? el("td", {class: "num"}, (tv - bv >= 0 ? "+" : "") + num(tv - bv, digits)) : null));
  }
  const rewards = report.rewards_vs_base;
  if (rewards) {
    const blank = () => [el("td", {}), el("td", {})];  // no base or difference column: the base is the reference
    table.append(el("tr", {}, el("td", {}, t("m_reward_accuracy")), el("td", {class: "num"}, num(rewards.reward_accuracy, 1)), blank()),
                 el("tr", {}, el("td", {}, t("m_reward_margin")), el("td", {class: "num"}, num(rewards.reward_margin, 3)), blank()));
  }
  const answers = el("table", {class: "list answers"}, el("tr", {}, el("th", {}, t("question_col")), el("th", {}, t("chosen_col")),
    el("th", {}, t("rejected_col")), el("th", {}, t("tuned")), base ? el("th", {}, t("base")) : null));
  const answer = (side) => el("td", {}, side.answer, el("small", {}, " " + t(side.closer_to_chosen ? "closer_chosen" : "closer_rejected")));
  for (const p of predictions) {
    const prompt = Array.isArray(p.prompt) ? (p.prompt[p.prompt.length - 1] || {}).content : p.prompt;
    answers.append(el("tr", {}, el("td", {}, prompt), el("td", {}, p.chosen), el("td", {}, p.rejected),
      answer(p.tuned), p.base ? answer(p.base) : null));
  }
  const title = kind === "validation" ? t("report_pref_validation", {n: report.n}) : t("report_pref_vs_base", {n: report.n, data});
  return [el("h4", {}, title), table, el("h4", {}, t("per_pair")), answers];
}

function renderReport() {
  const box = $("report");
  const reports = (S.report && S.report.reports) || [];
  if (!reports.length) { box.replaceChildren(el("p", {}, t("no_eval"))); return; }
  const parts = [];
  for (const {kind, report, predictions} of reports) {
    if (report.kind === "preference") { parts.push(...preferenceEvalReport(kind, report, predictions)); continue; }
    const base = report.base;
    const data = (report.data || []).map((d) => String(d).split("/").pop()).join(", ");
    parts.push(el("h4", {}, kind === "validation" ? t("report_validation", {n: report.n}) : t("report_vs_base", {n: report.n, data})));
    const table = el("table", {class: "list report-table"}, el("tr", {}, el("th", {}, t("metric")), el("th", {}, t("tuned")),
      base ? el("th", {}, t("base")) : null, base ? el("th", {}, t("difference")) : null));
    for (const key of METRICS) {
      const tv = report.tuned[key], bv = base ? base[key] : null;
      const digits = key === "answer_loss" ? 3 : key === "perplexity" || key === "length_ratio" ? 2 : 1;
      table.append(el("tr", {}, el("td", {}, t("m_" + key)), el("td", {class: "num"}, num(tv, digits)),
        base ? el("td", {class: "num"}, num(bv, digits)) : null,
        base ? el("td", {class: "num"}, (tv - bv >= 0 ? "+" : "") + num(tv - bv, digits)) : null));
    }
    parts.push(table, el("h4", {}, t("per_question")));
    const answers = el("table", {class: "list answers"}, el("tr", {}, el("th", {}, t("question_col")), el("th", {}, t("reference")),
      el("th", {}, t("tuned")), base ? el("th", {}, t("base")) : null));
    for (const p of predictions) {
      answers.append(el("tr", {}, el("td", {}, p.question), el("td", {}, p.reference),
        el("td", {}, p.tuned.answer, el("small", {}, " chrF " + p.tuned.chrf)),
        p.base ? el("td", {}, p.base.answer, el("small", {}, " chrF " + p.base.chrf)) : null));
    }
    parts.push(answers);
  }
  box.replaceChildren(...parts);
}

async function evaluate() {
  await guarded(async () => {
    await runTask("evaluate", "/api/evaluate", {run: $("try-run").value, data: $("eval-data").value,
                                                max_new_tokens: Number($("try-max").value)}, $("evaluate-state"));
    await loadReport();
  });
}

function renderEvalData() {
  const select = $("eval-data");
  const current = select.value;
  const options = [el("option", {value: S.heldout}, t("eval_data_heldout")),
                   el("option", {value: S.preferenceHeldout}, t("eval_data_preference_heldout"))].concat(
    S.datasets.filter((d) => !d.bundled).map((d) => el("option", {value: d.path}, d.name)));
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === current)) select.value = current;
  suggestEvalData();
}

// A run tuned on preferences is evaluated on held-out pairs, one tuned on answers on held-out questions: suggested
// once each time another run is chosen (or listed first), so that a file picked for it stays picked.
function suggestEvalData() {
  const run = S.runs.find((r) => r.name === $("try-run").value);
  if (!run || !run.method || S.suggestedFor === run.name || !$("eval-data").options.length) return;
  S.suggestedFor = run.name;
  $("eval-data").value = PREFERENCE_METHODS.has(run.method) ? S.preferenceHeldout : S.heldout;
}

// ---------------------------------------------------------------- export

function commandList(commands) {
  return el("div", {}, el("p", {}, t("copy_hint")), el("pre", {class: "commands"}, commands.filter(Boolean).join("\n")));
}

async function mergeRun() {
  S.merge = null;
  await guarded(async () => {
    S.merge = await runTask("merge", "/api/merge", {run: $("export-run").value}, $("merge-result"));
  });
  renderMerge();
}

function renderMerge() {
  const m = S.merge, box = $("merge-result");
  if (!m) return;
  box.replaceChildren(el("p", {}, t("merged_done", {path: m.path})), commandList(m.commands));
}

async function exportRun() {
  S.export = null;
  await guarded(async () => {
    S.export = await runTask("export", "/api/export", {run: $("export-run").value, quant: $("quant").value}, $("export-result"));
  });
  renderExport();
}

function renderExport() {
  const x = S.export, box = $("export-result");
  if (!x) return;
  box.replaceChildren(el("p", {id: "export-done"}, t("exported", {path: x.path.split("/").pop(), size: x.size_mb, quant: x.quant})),
    el("p", {}, el("a", {href: x.download, id: "download-gguf", download: ""}, t("download_gguf")), " · ",
      x.modelfile ? el("a", {href: x.modelfile, id: "download-modelfile", download: "Modelfile"}, t("download_modelfile")) : ""),
    commandList(x.commands));
}

// ---------------------------------------------------------------- start

async function refreshState() {
  const state = await api("GET", "/api/state");
  Object.assign(S, {datasets: state.datasets, presets: state.presets, runs: state.runs, quants: state.quants,
                    heldout: state.heldout, bundled: state.bundled, preferenceHeldout: state.preference_heldout});
  if (!S.status || !ACTIVE.has(S.status.state)) S.status = state.training;
  return state;
}

function renderAll() {
  renderDatasets(); renderInspect(); renderClean(); renderPresets(); renderEstimate(); renderStatus(); renderRuns();
  renderChat(); renderReport(); renderEvalData(); renderMerge(); renderExport();
}

async function main() {
  applyTexts();
  $("lang-vi").addEventListener("click", () => setLanguage("vi"));
  $("lang-en").addEventListener("click", () => setLanguage("en"));
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("upload").addEventListener("change", (e) => upload([...e.target.files]));
  $("inspect-btn").addEventListener("click", inspect);
  $("clean-btn").addEventListener("click", clean);
  $("train-preset").addEventListener("change", () => fillPreset(false));
  document.querySelectorAll(".model-field").forEach((f) => f.addEventListener("input", () => { setModel(f.value); saveForm(); }));
  Object.values(FORM_FIELDS).forEach((id) => $(id).addEventListener("input", saveForm));
  $("train-preset").addEventListener("change", saveForm);
  $("train-method").addEventListener("change", () => { showMethodFields(); saveForm(); });
  $("train-loss-type").addEventListener("change", saveForm);
  $("train-init-adapter").addEventListener("change", (e) => { e.target.dataset.want = e.target.value; saveForm(); });
  $("estimate-btn").addEventListener("click", estimate);
  $("start-btn").addEventListener("click", startTraining);
  $("stop-btn").addEventListener("click", stopTraining);
  $("resume-btn").addEventListener("click", () => resumeTraining());
  $("ask-btn").addEventListener("click", ask);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); } });
  $("reset-btn").addEventListener("click", () => { S.chat = {base: [], tuned: []}; renderChat(); });
  $("try-run").addEventListener("change", () => { S.chat = {base: [], tuned: []}; renderChat(); loadReport(); suggestEvalData(); });
  $("evaluate-btn").addEventListener("click", evaluate);
  $("merge-btn").addEventListener("click", mergeRun);
  $("export-btn").addEventListener("click", exportRun);
  const state = await refreshState();
  $("quant").replaceChildren(...S.quants.map((q) => el("option", {value: q}, q)));
  renderPresets();
  restoreForm();
  showMethodFields();
  renderAll();
  showTab(localStorage.getItem("lmtune.tab") || "data");
  if (ACTIVE.has(S.status.state)) pollStatus();  // coming back to a training that runs: follow it
  for (const [kind, task] of Object.entries(state.tasks)) {
    if (task.state !== "running") continue;
    const where = {estimate: $("estimate"), evaluate: $("evaluate-state"), merge: $("merge-result"), export: $("export-result")}[kind];
    if (where) where.textContent = t("working");
    guarded(async () => {
      const result = await pollTask(kind, where, task);
      if (kind === "estimate") { S.estimate = result; renderEstimate(); }
      if (kind === "merge") { S.merge = result; renderMerge(); }
      if (kind === "export") { S.export = result; renderExport(); }
      if (kind === "evaluate") loadReport();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => guarded(main));
