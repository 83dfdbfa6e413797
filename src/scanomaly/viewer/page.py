"""The viewer's one page: HTML, CSS and script inline (no fonts, scripts or styles from the internet)."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>scanomaly viewer</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 8px 12px; z-index: 2; }
header label { margin-right: 14px; white-space: nowrap; }
input[type=number] { width: 7em; }
main { display: flex; gap: 16px; padding: 12px; }
#list { flex: 1; }
aside { width: 330px; }
table { border-collapse: collapse; width: 100%; }
td, th { padding: 4px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: middle; }
.pics { display: flex; gap: 6px; }
.pic { width: 128px; height: 128px; background: #000; position: relative; }
.pic img { width: 128px; height: 128px; position: absolute; left: 0; top: 0; image-rendering: auto; }
.pic .caption { position: absolute; bottom: 0; left: 0; color: #fff; font-size: 11px; background: rgba(0,0,0,.5); padding: 0 3px; }
.abnormal { color: #b00; } .normal { color: #070; } .unknown { color: #777; }
.box { background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 10px; margin-bottom: 12px; }
#drop { border: 2px dashed #999; padding: 18px; text-align: center; }
#drop.over { border-color: #06c; background: #eef5ff; }
.error { color: #b00; }
#pager button { margin: 0 6px; }
</style>
</head>
<body>
<header>
  <label>scores <select id="source"></select></label>
  <label>label <select id="label">
    <option value="all">all</option><option value="abnormal">abnormal</option>
    <option value="normal">normal</option><option value="unknown">unknown</option></select></label>
  <label>score from <input id="min" type="number" step="any"> to <input id="max" type="number" step="any"></label>
  <label>per page <select id="per-page"><option>10</option><option selected>20</option><option>50</option><option>100</option></select></label>
  <label>heatmap opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.5"></label>
  <span id="status"></span>
</header>
<main>
  <section id="list">
    <div id="pager"><button id="prev">&larr; previous</button><span id="page-info"></span><button id="next">next &rarr;</button></div>
    <table><thead><tr><th>#</th><th>image</th><th>score</th><th>label</th><th>scan / healthy translation / heatmap over the scan</th></tr></thead>
    <tbody id="rows"></tbody></table>
  </section>
  <aside>
    <div class="box" id="threshold-box" hidden>
      <b>Threshold</b> <span id="auroc"></span><br>
      <input id="threshold" type="range" min="0" max="1000" value="500" style="width: 100%">
      <div>score &ge; <span id="threshold-value"></span> is called abnormal</div>
      <div>sensitivity <b id="sensitivity"></b> &middot; specificity <b id="specificity"></b></div>
      <svg id="roc" width="300" height="300" viewBox="-0.08 -0.02 1.1 1.1">
        <g transform="translate(0,1) scale(1,-1)">
          <rect x="0" y="0" width="1" height="1" fill="none" stroke="#ccc" stroke-width="0.005"/>
          <line x1="0" y1="0" x2="1" y2="1" stroke="#ddd" stroke-width="0.005"/>
          <polyline id="roc-curve" fill="none" stroke="#06c" stroke-width="0.01"/>
          <circle id="roc-point" r="0.02" fill="#b00"/>
        </g>
        <text x="0.35" y="1.07" font-size="0.05">1 &minus; specificity</text>
      </svg>
    </div>
    <div class="box">
      <b>Score an image</b> with <span id="upload-model"></span>
      <div id="drop">drop an image here, or <input id="upload" type="file"></div>
      <div id="upload-result"></div>
    </div>
  </aside>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let sources = [], page = 0, total = 0, roc = null;

function opacity() { return $("opacity").value; }
function api(path) { return fetch(path).then(r => r.json().then(j => { if (!r.ok) throw new Error(j.error || r.status); return j; })); }
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
function currentSource() { return sources[Number($("source").value)] || sources[0]; }

function picture(src, caption, overlay) {
  const over = overlay ? `<img class="overlay" src="${overlay}" style="opacity: ${opacity()}" alt="heatmap">` : "";
  return `<div class="pic"><img class="scan" src="${src}" alt="${esc(caption)}">${over}<span class="caption">${esc(caption)}</span></div>`;
}

function imageUrl(row, kind, slice) {
  const s = currentSource();
  return `/api/image/${s.id}/${row.row}/${kind}.png` + (slice === undefined ? "" : `?slice=${slice}`);
}

function pictures(row, slice) {
  const s = currentSource();
  const scan = imageUrl(row, "scan", slice);
  if (!s.has_model) return picture(scan, "scan");
  return picture(scan, "scan") + picture(imageUrl(row, "healthy", slice), "healthy") +
         picture(scan, "heatmap", imageUrl(row, "heatmap", slice));
}

function rowHtml(row, rank) {
  const scroller = row.slices > 1 ?
    `<div>slice <input class="slice" type="range" min="0" max="${row.slices - 1}" value="${row.slice}" data-row="${row.row}"> <span class="slice-no">${row.slice}</span> / ${row.slices - 1}</div>` : "";
  return `<tr class="row" data-row="${row.row}" data-score="${row.score}"><td>${rank}</td><td>${esc(row.name)}</td>` +
         `<td class="score">${row.score.toPrecision(5)}</td><td class="${row.label}">${row.label}</td>` +
         `<td><div class="pics">${pictures(row)}</div>${scroller}</td></tr>`;
}

function query() {
  const p = new URLSearchParams({source: currentSource().id, page: page, per_page: $("per-page").value, label: $("label").value});
  if ($("min").value !== "") p.set("min", $("min").value);
  if ($("max").value !== "") p.set("max", $("max").value);
  return p.toString();
}

async function loadRows() {
  $("status").textContent = "loading…";
  try {
    const data = await api("/api/rows?" + query());
    total = data.total;
    const perPage = data.per_page, pages = Math.max(1, Math.ceil(total / perPage));
    $("page-info").textContent = `page ${page + 1} of ${pages} (${total} images)`;
    $("prev").disabled = page === 0; $("next").disabled = page + 1 >= pages;
    const byRow = {};
    data.rows.forEach(r => byRow[r.row] = r);
    $("rows").innerHTML = data.rows.map((r, i) => rowHtml(r, page * perPage + i + 1)).join("");
    document.querySelectorAll("input.slice").forEach(input => input.addEventListener("input", () => {
      const row = byRow[input.dataset.row];
      input.parentElement.querySelector(".slice-no").textContent = input.value;
      input.closest("td").querySelector(".pics").innerHTML = pictures(row, Number(input.value));
    }));
    $("status").textContent = "";
  } catch (e) { $("status").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
}

function updateThreshold() {
  if (!roc) return;
  const lo = Math.min(...roc.scores), hi = Math.max(...roc.scores);
  const t = lo + (hi - lo) * Number($("threshold").value) / 1000;
  let tp = 0, fn = 0, tn = 0, fp = 0;
  for (let i = 0; i < roc.scores.length; i++) {
    const called = roc.scores[i] >= t;
    if (roc.labels[i] === 1) { if (called) tp++; else fn++; } else { if (called) fp++; else tn++; }
  }
  const sens = tp / Math.max(1, tp + fn), spec = tn / Math.max(1, tn + fp);
  $("threshold-value").textContent = t.toPrecision(5);
  $("sensitivity").textContent = sens.toFixed(3);
  $("specificity").textContent = spec.toFixed(3);
  $("roc-point").setAttribute("cx", 1 - spec); $("roc-point").setAttribute("cy", sens);
}

async function loadRoc() {
  roc = await api("/api/roc?source=" + currentSource().id);
  $("threshold-box").hidden = !roc.has_labels;
  if (!roc.has_labels) { roc = null; return; }
  $("auroc").textContent = `AUROC ${roc.auroc.toFixed(3)}`;
  $("roc-curve").setAttribute("points", roc.fpr.map((f, i) => `${f},${roc.tpr[i]}`).join(" "));
  updateThreshold();
}

async function upload(file) {
  const s = currentSource(), out = $("upload-result");
  out.textContent = `scoring ${file.name}…`;
  const r = await fetch(`/api/score?source=${s.id}&filename=${encodeURIComponent(file.name)}`, {method: "POST", body: file});
  const j = await r.json();
  if (!r.ok) { out.innerHTML = `<span class="error">${esc(j.error)}</span>`; return; }
  out.innerHTML = `<div>${esc(j.filename)}: score <b id="upload-score">${j.score.toPrecision(5)}</b>` +
    (j.n_images > 1 ? ` (highest of ${j.n_images} images, #${j.shown} shown)` : "") + `</div><div class="pics">` +
    picture(j.scan, "scan") + (j.healthy ? picture(j.healthy, "healthy") : "") + picture(j.scan, "heatmap", j.heatmap) + "</div>";
}

async function start() {
  sources = await api("/api/sources");
  $("source").innerHTML = sources.map(s => `<option value="${s.id}">${esc(s.name)} (${s.n})</option>`).join("");
  for (const id of ["source"]) $(id).addEventListener("change", () => { page = 0; refresh(); });
  for (const id of ["label", "min", "max", "per-page"]) $(id).addEventListener("change", () => { page = 0; loadRows(); });
  $("prev").addEventListener("click", () => { page = Math.max(0, page - 1); loadRows(); });
  $("next").addEventListener("click", () => { page += 1; loadRows(); });
  $("opacity").addEventListener("input", () => document.querySelectorAll("img.overlay").forEach(im => im.style.opacity = opacity()));
  $("threshold").addEventListener("input", updateThreshold);
  $("upload").addEventListener("change", e => { if (e.target.files.length) upload(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
  refresh();
}

function refresh() {
  const s = currentSource();
  $("upload-model").textContent = s.has_model ? s.model : "(this source has no model)";
  $("upload").disabled = !s.has_model;
  loadRows();
  loadRoc();
}
start();
</script>
</body>
</html>
"""
