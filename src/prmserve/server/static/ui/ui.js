"use strict";
// The page's state: the candidates being edited, the last scored ones, and the JSONL table's rows.

const AGGREGATIONS = {
  min: (rs) => Math.min(...rs),
  last: (rs) => rs[rs.length - 1],
  mean: (rs) => rs.reduce((a, b) => a + b, 0) / rs.length,
  prod: (rs) => rs.reduce((a, b) => a * b, 1),
};
const DIGITS = 4;  // rewards and aggregates are printed with this many decimals
const SCORED_FIELDS = ["problem", "steps", "completion", "step_split"];

let candidates = [];  // [[step text, ...], ...] as the editor shows them
let scored = null;    // {candidates, results} of the last Score
let table = {rows: [], key: "line", descending: false};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function splitCandidates(text) {
  return text.split(/^[ \t]*---[ \t]*$/m)
    .map((c) => c.split(/\n[ \t]*\n/).map((s) => s.trim()).filter(Boolean))
    .filter((steps) => steps.length);
}

function rewardColour(reward) {
  const r = Math.min(1, Math.max(0, reward));
  return `hsl(${Math.round(120 * r)}, 70%, 80%)`;  // red at 0, green at 1
}

function firstBelow(rewards, threshold) {
  const index = rewards.findIndex((r) => r < threshold);
  return index < 0 ? null : index;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The same call the clients make; an error is the server's own message, with its status.
async function postScore(items) {
  const headers = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("v1/score", {method: "POST", headers, body: JSON.stringify({items})});
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* a proxy's HTML error page: shown as text below */ }
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    const message = body?.error?.message ?? (text || response.statusText);
    throw new Error(`${response.status}: ${message}${retry ? ` (retry after ${retry} s)` : ""}`);
  }
  return body.results;
}

async function withErrors(button, work) {
  showError("");
  button.disabled = true;
  try {
    await work();
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

// Pasted solutions --------------------------------------------------------------------------

function renderEditor() {
  $("editor").replaceChildren(...candidates.map((steps, c) => {
    const list = el("ol", {}, ...steps.map((step, s) => {
      const input = el("textarea", {className: "step-input", rows: 1, value: step});
      input.addEventListener("input", () => { steps[s] = input.value; });
      const remove = el("button", {type: "button", textContent: "×", title: "remove this step"});
      remove.addEventListener("click", () => { steps.splice(s, 1); renderEditor(); });
      return el("li", {}, input, remove);
    }));
    const add = el("button", {type: "button", textContent: "+ step"});
    add.addEventListener("click", () => { steps.push(""); renderEditor(); });
    return el("fieldset", {className: "candidate"}, el("legend", {textContent: `Candidate ${c + 1}`}), list, add);
  }));
}

async function scoreCandidates() {
  const problem = $("problem").value.trim();
  const snapshot = candidates.map((steps) => [...steps]);
  if (!snapshot.length) throw new Error("paste at least one solution");
  scored = null;  // an answer that fails shows no stale rewards
  $("results").replaceChildren();
  scored = {candidates: snapshot, results: await postScore(snapshot.map((steps) => ({problem, steps})))};
  renderResults();
}

function renderResults() {
  if (!scored) return;
  const threshold = Number($("threshold").value);
  const method = $("aggregation").value;
  const values = scored.results.map((r) => AGGREGATIONS[method](r.step_rewards));
  const best = values.indexOf(Math.max(...values));
  $("results").replaceChildren(...scored.results.map((result, c) => {
    const below = firstBelow(result.step_rewards, threshold);
    const steps = result.step_rewards.map((reward, s) => el("li",
      {className: s === below ? "step first-below" : "step", style: `background: ${rewardColour(reward)}`},
      el("span", {className: "reward", textContent: reward.toFixed(DIGITS)}),
      el("span", {className: "text", textContent: scored.candidates[c][s]}),
      ...(s === below ? [el("span", {className: "mark", textContent: `first below ${threshold}`})] : [])));
    const aggregates = Object.entries(AGGREGATIONS).map(([name, reduce]) => {
      const node = el("span", {className: name === method ? "aggregate chosen" : "aggregate"},
        `${name} `, el("b", {className: "value", textContent: reduce(result.step_rewards).toFixed(DIGITS)}));
      node.dataset.method = name;
      return node;
    });
    const title = el("h3", {textContent: `Candidate ${c + 1}`},
      ...(c === best ? [el("span", {className: "best-mark", textContent: `best of ${values.length} by ${method}`})] : []));
    return el("article", {className: c === best ? "result best" : "result"}, title, el("ol", {}, ...steps),
      el("p", {className: "aggregates"}, ...aggregates));
  }));
}

// JSONL upload ------------------------------------------------------------------------------

function parseJsonl(text) {
  const lines = [], items = [];
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    let item;
    try { item = JSON.parse(line); } catch (error) { throw new Error(`line ${i + 1}: bad JSON: ${error.message}`); }
    if (typeof item !== "object" || item === null || Array.isArray(item)) throw new Error(`line ${i + 1}: not a JSON object`);
    lines.push(i + 1);
    items.push(Object.fromEntries(SCORED_FIELDS.filter((k) => k in item).map((k) => [k, item[k]])));
  });
  if (!items.length) throw new Error("the file has no items");
  return {lines, items};
}

async function scoreFile(file) {
  const {lines, items} = parseJsonl(await file.text());
  let results;
  try {
    results = await postScore(items);
  } catch (error) {  // the server counts items from 0; say which line of the file that is
    const item = /item (\d+)/.exec(error.message);
    throw item ? new Error(`${error.message} (item ${item[1]} is line ${lines[Number(item[1])]})`) : error;
  }
  table.rows = results.map((r, i) => ({line: lines[i], problem: items[i].problem ?? "", rewards: r.step_rewards}));
  renderTable();
}

function renderTable() {
  const threshold = Number($("threshold").value);
  const rows = table.rows.map((row) => ({
    ...row, steps: row.rewards.length, firstBelow: firstBelow(row.rewards, threshold),
    ...Object.fromEntries(Object.entries(AGGREGATIONS).map(([name, reduce]) => [name, reduce(row.rewards)])),
  }));
  const {key, descending} = table;
  rows.sort((a, b) => {
    if (a[key] === b[key]) return a.line - b.line;
    if (a[key] === null) return 1;  // rows without a value last, either way
    if (b[key] === null) return -1;
    return (a[key] < b[key] ? -1 : 1) * (descending ? -1 : 1);
  });
  for (const th of $("table").tHead.rows[0].cells) {
    th.ariaSort = th.dataset.key === key ? (descending ? "descending" : "ascending") : null;
  }
  $("table").tBodies[0].replaceChildren(...rows.map((row) => el("tr", {},
    el("td", {textContent: row.line}),
    el("td", {className: "problem", textContent: row.problem, title: row.problem}),
    el("td", {textContent: row.steps}),
    ...Object.keys(AGGREGATIONS).map((name) => el("td", {textContent: row[name].toFixed(DIGITS)})),
    el("td", {textContent: row.firstBelow === null ? "" : row.firstBelow + 1}),
    el("td", {className: "rewards"}, ...row.rewards.map((r) => el("span",
      {textContent: r.toFixed(DIGITS), style: `background: ${rewardColour(r)}`}))))));
  $("table").hidden = !table.rows.length;
}

function sortBy(key) {
  table.descending = table.key === key ? !table.descending : false;
  table.key = key;
  renderTable();
}

// Wiring ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("solutions").addEventListener("input", () => { candidates = splitCandidates($("solutions").value); renderEditor(); });
  $("score").addEventListener("click", () => withErrors($("score"), scoreCandidates));
  $("jsonl").addEventListener("change", () => {
    const file = $("jsonl").files[0];
    if (file) withErrors($("jsonl"), () => scoreFile(file));
  });
  for (const th of document.querySelectorAll("th[data-key]")) th.addEventListener("click", () => sortBy(th.dataset.key));
  for (const id of ["threshold", "aggregation"]) $(id).addEventListener("input", () => { renderResults(); renderTable(); });
  fetch("health").then((r) => r.json()).then((health) => { $("model").textContent = health.model; })
    .catch((error) => { $("model").textContent = `server unreachable: ${error.message}`; });
});
