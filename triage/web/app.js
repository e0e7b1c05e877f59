// ichtriage worklist page: the list (live over server-sent events), a study
// view with its review form. Every string from the node goes into the page
// with textContent or setAttribute, never as markup.
"use strict";

const SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"];
const state = {
  session: null,      // {user, csrf, login}
  rows: [],           // rows of the list shown, in order (drawn: the first `drawn` of them)
  drawn: 0,           // how many rows are drawn at most (LIST_STEP more per "Show more")
  pending: null,      // rows waiting while the pointer is over the list
  hovering: false,
  trs: new Map(),     // study_uid -> <tr>
  byUid: new Map(),   // study_uid -> row, as the event stream last said
  order: [],          // study_uids of the open list, in order
  hidden: null,       // what the open list's age window leaves out (the events' "hidden")
  events: null,
  audio: null,
  study: null,
  slices: [],         // the open study's per-slice results
  marks: new Map(),   // "sop/frame" -> slice marked as showing the bleed
  marksFor: null,     // the study the marks belong to
  seen: null,         // {review, result}: what the reader was shown when the form was (re)set
  retryMs: 0,         // back-off of the next start() after a lost stream
  retryTimer: null,
  heardAt: 0,         // when the event stream last said anything (an event or its ping)
  claimTimer: null,   // {uid, id}: renews this reader's claim of the open study
  cursor: null,       // the strip's cursor: index of a slice in state.slices
  keyIndex: 0,        // the open study's key slice, where the cursor starts
  imagesRemoved: false,
};

// Rows drawn at first, and added by each "Show more": a table of thousands
// of rows took seconds to lay out (3.7 s of layout for 8,000), and the
// studies to read come first.
const LIST_STEP = 200;

// The node pings every 15 s: a stream silent for longer than this died
// without being closed (a NAT change, a laptop's sleep, a frozen proxy),
// and EventSource, still "open", would wait on it for ever.
const STREAM_QUIET_MS = 35000;

const $ = (id) => document.getElementById(id);
function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "cls") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}

async function api(path, opts = {}) {
  const headers = opts.headers || {};
  if (opts.method === "POST") {
    headers["Content-Type"] = "application/json";
    if (state.session) headers["X-CSRF-Token"] = state.session.csrf;
  }
  const r = await fetch(path, { ...opts, headers, credentials: "same-origin" });
  // A POST refused for its session or CSRF token (the node restarted, the
  // session ended): the session is fetched again and the POST retried once.
  if ((r.status === 401 || r.status === 403) && opts.method === "POST" && !opts.retried &&
      path.startsWith("/api/") && await refreshSession()) {
    return api(path, { ...opts, retried: true });
  }
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const err = new Error((body && body.error) || r.statusText);
    err.status = r.status;
    throw err;
  }
  return body;
}

// --- time and formatting ----------------------------------------------------
function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return "just now";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400 * 2) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
  return Math.floor(s / 86400) + " days ago";
}
// A time from the node (ISO-8601 UTC) in the browser's time zone,
// "2026-12-03 17:31"; "" when there is none.
function localTime(iso) {
  const d = new Date(iso);
  if (!iso || isNaN(d)) return "";
  const two = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
    two(d.getHours()) + ":" + two(d.getMinutes());
}
// The study's date and time as the scanner wrote them (its own local time,
// no zone to convert from): "2020-12-12 11:23".
function studyWhen(row) {
  return row.study_datetime ? row.study_datetime.replace("T", " ").slice(0, 16) : "";
}
const PRIOR_TITLE = "the study's date is more than 2 days before it arrived: an earlier study sent again, not a new one";
function pct(p) { return p == null ? "—" : (100 * p).toFixed(0) + "%"; }
function suspected(row) {
  if (!row.subtypes) return "";
  return SUBTYPES.filter((n) => row.subtypes[n] >= 0.5)
    .sort((a, b) => row.subtypes[b] - row.subtypes[a])
    .map((n) => n + " " + pct(row.subtypes[n])).join(", ");
}
function statusText(row) {
  return row.status.replace("_", " ") + (row.status_reason ? " (" + row.status_reason + ")" : "");
}
// A series as PACS lists it: its description, else its number.
function seriesName(s) {
  if (!s) return "";
  if (s.description) return s.description + (s.number != null ? " (series " + s.number + ")" : "");
  return s.number != null ? "series " + s.number : "series without number";
}
// Retention removed the study's files: its result and reviews stay, its
// images do not (no slice can be shown).
function purgedText(row) {
  return row.images_removed ? "images removed by retention on " + String(row.purged_at).slice(0, 10) : "";
}

// --- the list -----------------------------------------------------------------
function rowCells(tr, row, rank) {
  const flagged = row.flagged && row.status !== "reviewed";
  tr.className = flagged ? "flagged" : "";
  tr.dataset.studyUid = row.study_uid;
  const flag = flagged ? el("span", { cls: "badge flag", text: "\u26a0 FLAGGED" })
    : row.status === "not_applicable" ? el("span", { cls: "badge", text: "not triaged" })
    : row.probability == null ? el("span", { cls: "badge unknown", text: "not yet known" }) : "";
  const open = el("a", { href: "#/study/" + encodeURIComponent(row.study_uid), text: "Open" });
  const cells = [
    String(rank), flag, el("span", { cls: "prob", text: pct(row.probability) }), suspected(row),
    row.patient_name, row.patient_id, row.accession, row.study_description,
    el("span", { cls: "study-date" }, studyWhen(row) || "\u2014", row.prior ? " " : null,
       row.prior ? el("span", { cls: "badge prior", text: "prior", title: PRIOR_TITLE }) : null),
    el("span", { cls: "age", "data-at": row.received_at, text: age(row.received_at),
                 title: localTime(row.received_at) }),
    el("span", {}, statusText(row), row.images_removed ? el("span", { cls: "purged", text: purgedText(row) }) : null),
    row.claimed_by || "", open,
  ];
  tr.replaceChildren(...cells.map((c) => el("td", {}, c)));
}

// Rows are keyed by study: only rows whose content or rank changed are
// redrawn, and only rows out of place are moved. One pass along the table
// with a cursor (tbody.children[i] after each move walked the rows again:
// quadratic, seconds at thousands of rows); rows past the last one kept
// (all of them, the first time) are built in a fragment and added at once.
function render(rows) {
  const tbody = $("rows");
  const all = rows;
  if (!state.drawn) state.drawn = LIST_STEP;
  rows = all.slice(0, state.drawn);
  const keep = new Set(rows.map((r) => r.study_uid));
  for (const [uid, tr] of state.trs) if (!keep.has(uid)) { tr.remove(); state.trs.delete(uid); }
  let cursor = tbody.firstElementChild;
  const tail = document.createDocumentFragment();
  rows.forEach((row, i) => {
    let tr = state.trs.get(row.study_uid);
    const fresh = !tr;
    if (fresh) { tr = el("tr"); state.trs.set(row.study_uid, tr); }
    const json = JSON.stringify(row);
    if (fresh || tr.__json !== json || tr.__rank !== i + 1) {
      if (!fresh && tr.__json !== json) tr.classList.add("changed");
      const changed = tr.classList.contains("changed");
      rowCells(tr, row, i + 1);
      if (changed) tr.classList.add("changed");
      tr.__json = json;
      tr.__rank = i + 1;
    }
    if (tr === cursor) cursor = cursor.nextElementSibling;
    else if (cursor) tbody.insertBefore(tr, cursor);
    else tail.append(tr);
  });
  tbody.append(tail);
  state.rows = all;
  $("count").textContent = all.length + (all.length === 1 ? " study" : " studies") +
    (all.length > rows.length ? " (the first " + rows.length + " shown)" : "");
  $("empty").hidden = all.length > 0;
  $("more").hidden = all.length <= rows.length;
  $("more-text").textContent = "Showing the first " + rows.length + " of " + all.length + " studies.";
  $("more-btn").textContent = "Show " + Math.min(LIST_STEP, all.length - rows.length) + " more";
  setTimeout(() => document.querySelectorAll("tr.changed").forEach((t) => t.classList.remove("changed")), 4000);
}

function sameOrder(a, b) {
  return a.length === b.length && a.every((r, i) => r.study_uid === b[i].study_uid);
}

// New rows or a new order wait while the pointer is over the list, so that
// nothing moves under it; changes in place are shown at once.
function offer(rows) {
  if (state.hovering && !sameOrder(rows, state.rows)) {
    state.pending = rows;
    const n = rows.slice(0, state.drawn).filter((r) => !state.trs.has(r.study_uid)).length;
    $("pending").textContent = (n ? n + " new, " : "") + "list changed \u2014 updates when the pointer leaves the list (click to update now)";
    $("pending").hidden = false;
    return;
  }
  state.pending = null;
  $("pending").hidden = true;
  render(rows);
}

function applyPending() {
  if (state.pending) offer(state.pending);
}

function degraded(list) {
  const box = $("degraded");
  box.hidden = !list || list.length === 0;
  box.textContent = list && list.length ? "Node degraded: " + list.join("; ") : "";
}

function alertFlagged(uids, rows) {
  for (const uid of uids) {
    const row = rows.find((r) => r.study_uid === uid);
    beep();
    if ("Notification" in window && Notification.permission === "granted") {
      // No patient name on the desktop: notifications end up on shared screens.
      new Notification("ichtriage: flagged study", {
        body: "p(ICH) " + pct(row && row.probability) + ", accession " + ((row && row.accession) || "?") +
          ". Decision support, not a diagnosis.",
        tag: uid,
      });
    }
  }
}

// An AudioContext made before any user gesture may stay suspended (browsers'
// autoplay rules; Firefox also without a sound device): a beep is counted
// only when it plays, and otherwise the alerts button says that sound is off.
function audio() {
  if (!state.audio) {
    state.audio = new AudioContext();
    state.audio.addEventListener("statechange", alertsButton);
  }
  return state.audio;
}

function soundOff() {
  return !!state.audio && state.audio.state !== "running";
}

function alertsButton() {
  const btn = $("notify-btn");
  const ask = "Notification" in window && Notification.permission !== "granted";
  btn.hidden = !ask && !soundOff();
  btn.textContent = soundOff() ? "Sound is off \u2014 enable alerts" : "Enable alerts";
}

function beep() {
  let ctx;
  try { ctx = audio(); } catch (e) { return; } /* no audio: the badge and the notification remain */
  const asked = performance.now();
  const tone = () => {
    if (performance.now() - asked > 2000) return; // a late beep would mislead
    const osc = ctx.createOscillator(), gain = ctx.createGain();
    osc.frequency.value = 880;
    gain.gain.value = 0.2;
    osc.connect(gain).connect(ctx.destination);
    osc.start();
    osc.stop(ctx.currentTime + 0.4);
    document.body.dataset.beeps = String(Number(document.body.dataset.beeps || 0) + 1);
  };
  if (ctx.state === "running") tone();
  else ctx.resume().then(tone, () => {});
  setTimeout(alertsButton, 1000); // a fresh context needs a moment to start
}

function listen() {
  if (state.events) state.events.close();
  const es = new EventSource("/api/events");
  state.events = es;
  state.heardAt = Date.now();
  es.addEventListener("ping", () => { state.heardAt = Date.now(); });
  // Events carry new and changed rows, removed uids and (when it changed)
  // the order; the first event of a stream carries everything.
  es.addEventListener("worklist", (ev) => {
    state.heardAt = Date.now();
    const d = JSON.parse(ev.data);
    if (!Array.isArray(d.rows) || !Array.isArray(d.removed)) {
      // Nothing to build the list from, and later events would apply to
      // nothing: the stream is as good as lost; start again.
      $("offline").hidden = false;
      es.close();
      if (state.events === es) restartLater();
      return;
    }
    if (d.full) state.byUid = new Map();
    for (const r of d.rows) state.byUid.set(r.study_uid, r);
    for (const uid of d.removed) state.byUid.delete(uid);
    if (d.order) state.order = d.order;
    const rows = state.order.map((uid) => state.byUid.get(uid)).filter(Boolean);
    if (d.hidden) { state.hidden = d.hidden; olderNote(); }
    degraded(d.degraded);
    if (d.new_flagged && d.new_flagged.length) alertFlagged(d.new_flagged, rows);
    if ($("status-filter").value === "") offer(rows);
    // Also when it left the list: reviewed by another reader, whose review
    // the open view must show.
    if (state.study && (d.rows.some((r) => r.study_uid === state.study) || d.removed.includes(state.study))) {
      showStudy(state.study, true);
    }
  });
  es.onopen = () => { $("offline").hidden = true; state.retryMs = 0; state.heardAt = Date.now(); };
  es.onerror = () => {
    $("offline").hidden = false;
    // A refused (re)connect (401 after a restart or the session's end, 503
    // when the node has too many streams) closes an EventSource for good:
    // start again, which also renews the session and its CSRF token.
    if (es.readyState === EventSource.CLOSED && state.events === es) restartLater();
  };
}

// Checked every 5 s: a stream silent past STREAM_QUIET_MS is closed and
// started again, with the offline banner up meanwhile.
function watchStream() {
  const es = state.events;
  if (!es || Date.now() - state.heardAt <= STREAM_QUIET_MS) return;
  $("offline").hidden = false;
  es.close();
  state.events = null;
  restartLater();
}

function restartLater() {
  if (state.retryTimer) return;
  state.retryMs = Math.min(30000, state.retryMs ? state.retryMs * 2 : 1000);
  state.retryTimer = setTimeout(() => { state.retryTimer = null; start(); }, state.retryMs);
}

// The open list leaves out studies that need no action (triaged and not
// flagged, not applicable) older than http.worklist_days: the page says how
// many, and shows them on request.
function olderNote() {
  const h = state.hidden, n = h ? h.triaged + h.not_applicable : 0;
  $("older").hidden = !n || $("status-filter").value !== "";
  if (!n) return;
  const parts = [];
  if (h.triaged) parts.push(h.triaged + " triaged, not flagged");
  if (h.not_applicable) parts.push(h.not_applicable + " not applicable");
  $("older-text").textContent = n + (n === 1 ? " older study" : " older studies") +
    " not shown (" + parts.join(", ") + "; no new image or result for more than " + h.days +
    (h.days === 1 ? " day" : " days") + ", since before " + localTime(h.before) + ").";
}

// Those the open list leaves out, as the node last said: every study of
// either status that is not flagged and last changed before the window.
async function olderRows() {
  const before = Date.parse(state.hidden && state.hidden.before);
  const [triaged, na] = await Promise.all(["triaged", "not_applicable"].map(
    (s) => api("/api/worklist?status=" + s)));
  return triaged.concat(na).filter((r) => !r.flagged && Date.parse(r.updated_at) < before);
}

async function loadFiltered() {
  const status = $("status-filter").value;
  state.trs.forEach((tr) => tr.remove());
  state.trs.clear();
  state.rows = [];
  state.drawn = 0;
  state.pending = null;
  $("pending").hidden = true;
  olderNote();
  render(status === "older" ? await olderRows()
    : status ? await api("/api/worklist?status=" + encodeURIComponent(status))
    : state.order.map((uid) => state.byUid.get(uid)).filter(Boolean));
}

// --- the study view -------------------------------------------------------------
// A slice as the page names it: its place from the feet (the order of the
// strip) and, where known, the image PACS shows (InstanceNumber, and the
// frame of a multi-frame image), as the PACS summary names its key slice
// (triage_slice_caption in triage/pacs_render.c).
function sliceName(s, n) {
  let t = "slice " + (s.index + 1) + " of " + n;
  if (s.instance_number != null) {
    t += " (image " + s.instance_number + (s.frames > 1 ? ", frame " + ((s.frame || 0) + 1) : "") + ")";
  }
  return t;
}

// The strip is one widget for the mouse and the keyboard alike (a
// multi-select list of slices): Tab reaches it, the arrow keys (Home, End,
// Page Up/Down) move a cursor from slice to slice and show that slice
// below, Space or Enter marks it; the slice under the cursor is its active
// option, named by place, image and probability.
function strip(slices) {
  const NS = "http://www.w3.org/2000/svg", w = 600, h = 120, n = Math.max(1, slices.length);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h + 20);
  svg.setAttribute("role", "listbox");
  svg.setAttribute("aria-multiselectable", "true");
  svg.setAttribute("tabindex", "0");
  svg.setAttribute("aria-label", "probability of hemorrhage per slice, from the feet (left) to the head (right)");
  svg.setAttribute("aria-describedby", "strip-hint");
  svg.addEventListener("keydown", stripKey);
  const bw = w / n;
  slices.forEach((s, i) => {
    const r = document.createElementNS(NS, "rect");
    const bh = Math.max(1, s.any * h);
    r.setAttribute("x", (i * bw).toFixed(1));
    r.setAttribute("y", (h - bh).toFixed(1));
    r.setAttribute("width", Math.max(1, bw - 1).toFixed(1));
    r.setAttribute("height", bh.toFixed(1));
    r.setAttribute("fill", s.any >= 0.5 ? "#b00020" : "#1d6fd1");
    const key = markKey(s), marked = state.marks.has(key);
    svg.append(r);
    // A click anywhere in the slice's column marks it as showing the bleed
    // (for the review); a marked slice gets an outline and a tick under the
    // axis, not only a colour.
    const hit = document.createElementNS(NS, "rect");
    hit.setAttribute("x", (i * bw).toFixed(1)); hit.setAttribute("y", 0);
    hit.setAttribute("width", Math.max(1, bw).toFixed(1)); hit.setAttribute("height", h);
    hit.setAttribute("fill", "transparent");
    hit.classList.add("mark-target");
    hit.dataset.mark = key;
    hit.id = "slice-opt-" + i;
    hit.setAttribute("role", "option");
    hit.setAttribute("aria-selected", marked ? "true" : "false");
    hit.setAttribute("aria-label", sliceName(s, slices.length) + ": " + pct(s.any) +
      (marked ? ", marked: bleed visible" : ""));
    hit.addEventListener("click", () => { state.cursor = i; toggleMark(s); });
    const t = document.createElementNS(NS, "title");
    t.textContent = sliceName(s, slices.length) + ": " + pct(s.any) + (marked ? " \u2014 marked: bleed visible" : " \u2014 click to mark: bleed visible");
    hit.append(t);
    if (marked) {
      r.setAttribute("stroke", "#000"); r.setAttribute("stroke-width", "2");
      const tick = document.createElementNS(NS, "rect");
      tick.setAttribute("x", (i * bw).toFixed(1)); tick.setAttribute("y", h + 1);
      tick.setAttribute("width", Math.max(2, bw - 1).toFixed(1)); tick.setAttribute("height", 4);
      tick.setAttribute("fill", "#000"); tick.classList.add("mark-tick");
      svg.append(tick);
    }
    svg.append(hit);
  });
  // The cursor: a frame round its slice's column, drawn thick while the
  // strip has the focus (style.css), so that it is seen, not only read.
  if (state.cursor != null) {
    const c = document.createElementNS(NS, "rect");
    c.setAttribute("x", (state.cursor * bw + 1).toFixed(1)); c.setAttribute("y", 1);
    c.setAttribute("width", Math.max(2, bw - 2).toFixed(1)); c.setAttribute("height", h - 2);
    c.setAttribute("fill", "none"); c.setAttribute("pointer-events", "none");
    c.classList.add("strip-cursor");
    svg.append(c);
    svg.setAttribute("aria-activedescendant", "slice-opt-" + state.cursor);
  }
  const line = document.createElementNS(NS, "line");
  line.setAttribute("x1", 0); line.setAttribute("x2", w);
  line.setAttribute("y1", h / 2); line.setAttribute("y2", h / 2);
  line.setAttribute("stroke", "#999"); line.setAttribute("stroke-dasharray", "4 3");
  svg.append(line);
  // Which end is which, in words: the order is the slices' along the body.
  [[2, "start", "\u25c0 foot", "end-foot"], [w / 2, "middle", slices.length + " slices; dashed line 50%", null],
   [w - 2, "end", "head \u25b6", "end-head"]].forEach(([x, anchor, text, cls]) => {
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", x); label.setAttribute("y", h + 15);
    label.setAttribute("text-anchor", anchor);
    if (cls) label.classList.add(cls);
    label.textContent = text;
    svg.append(label);
  });
  return svg;
}

// Slices the radiologist marks as showing the bleed: "sop/frame" -> the
// slice; sent with a review that says hemorrhage present (retraining labels).
function markKey(s) { return s.sop_uid + "/" + (s.frame || 0); }

function toggleMark(s) {
  const k = markKey(s);
  if (state.marks.has(k)) state.marks.delete(k); else state.marks.set(k, s);
  drawMarks();
}

// The strip's keys: the cursor moves by a slice (arrows), by ten (Page Up,
// Page Down) or to an end (Home, End); Space and Enter mark its slice.
function stripKey(ev) {
  const n = state.slices.length;
  if (!n) return;
  const at = state.cursor == null ? -1 : state.cursor;
  const moves = { ArrowLeft: at - 1, ArrowDown: at - 1, ArrowRight: at + 1, ArrowUp: at + 1,
                  PageDown: at - 10, PageUp: at + 10, Home: 0, End: n - 1 };
  if (ev.key in moves) {
    state.cursor = Math.min(n - 1, Math.max(0, at < 0 ? (state.keyIndex || 0) : moves[ev.key]));
    drawMarks();
  } else if (ev.key === " " || ev.key === "Enter") {
    if (at < 0) state.cursor = state.keyIndex || 0;
    toggleMark(state.slices[state.cursor]);
  } else {
    return;
  }
  ev.preventDefault(); // no scrolling, no form submitted
}

// The slice under the strip's cursor, as an image (none where retention
// removed the files) and a caption that says whether it is marked.
function cursorSlice() {
  const fig = $("strip-slice"), s = state.cursor == null ? null : state.slices[state.cursor];
  fig.hidden = !s;
  if (!s) return;
  const img = fig.querySelector("img");
  const src = "/api/studies/" + encodeURIComponent(state.study) + "/slices/" + encodeURIComponent(s.sop_uid) +
    ".png?frame=" + (s.frame || 0);
  img.hidden = !!state.imagesRemoved;
  if (!state.imagesRemoved && img.getAttribute("src") !== src) img.src = src;
  img.alt = sliceName(s, state.slices.length);
  fig.querySelector("figcaption").textContent = sliceName(s, state.slices.length) + ": " + pct(s.any) +
    (state.marks.has(markKey(s)) ? " \u2014 marked: bleed visible" : " \u2014 not marked");
}

function drawMarks() {
  const sl = state.slices || [];
  if (state.cursor != null && state.cursor >= sl.length) state.cursor = sl.length ? sl.length - 1 : null;
  // Drawn anew: the focus, if the strip had it, goes to the new one.
  const focused = $("strip").contains(document.activeElement);
  $("strip").replaceChildren(sl.length ? strip(sl) : el("p", { text: "No per-slice result yet." }));
  if (focused && sl.length) $("strip").firstChild.focus({ preventScroll: true });
  $("strip-hint").hidden = !sl.length;
  cursorSlice();
  document.querySelectorAll("#slices input[name=mark]").forEach((c) => { c.checked = state.marks.has(c.value); });
  const nums = [...state.marks.values()].map((s) => s.index + 1).sort((a, b) => a - b);
  $("marks-line").textContent = nums.length
    ? "Slices marked as showing the bleed: " + nums.join(", ")
    : "No slice marked (optional: click bars in the strip, or Tab to it and press Space, or tick key slices).";
}

// Another study: nothing of the previous one's review (answers, marks,
// message) may carry over, or one click would store it on this study.
function resetReview(uid) {
  state.marks = new Map();
  state.cursor = null;
  state.marksFor = uid;
  state.seen = null;
  $("review-form").reset();
  $("review-msg").textContent = "";
  $("claim-msg").textContent = "";
}

// Nothing of another study under this title, and no form to review it.
function studyNotFound(why) {
  $("study-title").textContent = "Study not found: " + why;
  state.slices = [];
  state.cursor = null;
  $("strip-hint").hidden = true;
  $("strip-slice").hidden = true;
  $("study-flag").hidden = true;
  $("study-purged").hidden = true;
  ["details", "series-rows", "strip", "slices", "reviews"].forEach((id) => $(id).replaceChildren());
  $("slices").__figures = null;
  $("review-form").hidden = true;
}

// The series that set the result, named as PACS lists it (its UID beside).
function resultSeries(st) {
  if (!st.series_uid) return "none yet";
  const s = (st.series || []).find((x) => x.series_uid === st.series_uid);
  return s ? seriesName(s) + " \u2014 " + st.series_uid : st.series_uid;
}

// Every series of the study, what triage made of it and why: a series
// left out (a scout, too few slices) says so under its own name.
function seriesRows(st) {
  $("series-rows").replaceChildren(...(st.series || []).map((s) => {
    const result = s.series_uid === st.series_uid;
    const tr = el("tr", { cls: result ? "result" : "", "data-series-uid": s.series_uid },
      el("td", { text: s.number != null ? String(s.number) : "\u2014" }),
      el("td", { text: s.description || "(no description)", title: s.series_uid }),
      el("td", { text: String(s.instances) }),
      el("td", {}, s.state.replace("_", " "), result ? " " : null,
        result ? el("span", { cls: "badge", text: "result" }) : null),
      el("td", { text: s.reason || "" }));
    return tr;
  }));
}

async function showStudy(uid, quiet) {
  if (state.marksFor !== uid) resetReview(uid);
  state.study = uid;
  let st;
  try {
    st = await api("/api/studies/" + encodeURIComponent(uid));
  } catch (e) {
    if (state.study !== uid) return;
    if (quiet) $("study-title").textContent = "Study not found: " + e.message;
    else studyNotFound(e.message);
    return;
  }
  if (state.study !== uid) return;
  // A review says what its reader was shown (a review by another reader or
  // a newer result since then: the node refuses it, 409).
  if (!state.seen) state.seen = { review: st.review_id, result: st.result_version };
  $("review-form").hidden = false;
  $("study-title").textContent = (st.patient_name || "(no name)") + " \u2014 " + (st.study_description || "study");
  const flagged = st.flagged && st.status !== "reviewed";
  $("study-flag").hidden = !flagged;
  $("study-flag").textContent = flagged ? "\u26a0 FLAGGED: p(ICH) " + pct(st.probability) + " \u2014 read first" : "";
  $("study-purged").hidden = !st.images_removed;
  $("study-purged").textContent = st.images_removed
    ? purgedText(st).replace(/^i/, "I") + ": this node no longer holds the slices; the probabilities are those triage computed. Read the images in PACS."
    : "";
  const d = [
    ["Patient", st.patient_name], ["Patient ID", st.patient_id], ["Birth date", st.patient_birth_date],
    ["Sex", st.patient_sex], ["Accession", st.accession],
    ["Study date", (studyWhen(st) || "unknown") + (st.prior ? " \u2014 prior: " + PRIOR_TITLE : "")],
    ["Study UID", st.study_uid], ["Series (result)", resultSeries(st)], ["Slices", String(st.slices)],
    ["Arrived", localTime(st.received_at) + " (" + age(st.received_at) + ")"], ["Status", statusText(st)],
    ["p(ICH)", pct(st.probability)], ["Suspected subtypes", suspected(st) || "none above 50%"],
    ["Model", st.model_version || "(not triaged)"], ["Triage time", st.triage_ms ? (st.triage_ms / 1000).toFixed(1) + " s" : "—"],
    ["Note", st.note || ""], ["Notice", st.notice],
  ];
  $("details").replaceChildren(...d.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v || "" })]));
  seriesRows(st);
  const sl = st.slice_probabilities || [];
  state.slices = sl;
  state.keyIndex = Math.max(0, sl.findIndex((s) => s.index === st.key_index && s.sop_uid === st.key_sop_uid));
  state.imagesRemoved = !!st.images_removed;
  // The result may have moved to another series (a reconstruction with a
  // higher p): a mark on a slice it no longer has would label a slice of
  // the old series.
  const current = new Set(sl.map(markKey));
  for (const k of [...state.marks.keys()]) if (!current.has(k)) state.marks.delete(k);
  const keys = [];
  // By its index: the frames of a multi-frame instance (Enhanced CT) share
  // one SOP Instance UID.
  if (st.key_sop_uid) keys.push(sl.find((s) => s.index === st.key_index && s.sop_uid === st.key_sop_uid) || { sop_uid: st.key_sop_uid, frame: 0, index: st.key_index, any: st.probability });
  [...sl].sort((a, b) => b.any - a.any).forEach((s) => {
    if (keys.length < 3 && !keys.some((k) => k.sop_uid === s.sop_uid && k.frame === s.frame)) keys.push(s);
  });
  // Rebuilt when the key slices or their captions change (not on every
  // quiet reload, which would load the images again).
  const figures = JSON.stringify([uid, st.images_removed, keys.map((s) => [markKey(s), s.index, s.any])]);
  if (!quiet || $("slices").__figures !== figures) {
    $("slices").__figures = figures;
    // Without the files no image is asked for (each would be refused, 410).
    $("slices").replaceChildren(...(st.images_removed
      ? [el("p", { cls: "hint", text: "No images: " + purgedText(st) + "." })]
      : keys.map((s, i) => {
        const box = el("input", { type: "checkbox", name: "mark", value: markKey(s) });
        box.addEventListener("change", () => toggleMark(s));
        return el("figure", {},
          el("img", { src: "/api/studies/" + encodeURIComponent(uid) + "/slices/" + encodeURIComponent(s.sop_uid) +
                            ".png?frame=" + (s.frame || 0), alt: sliceName(s, sl.length || st.slices) }),
          el("figcaption", { text: (i === 0 ? "key " : "") + sliceName(s, sl.length || st.slices) + ": " + pct(s.any) }),
          el("label", {}, box, " bleed visible here"));
      })));
  }
  drawMarks();
  // A result that comes after the review brings the study back unread;
  // the reader is told by the save button that one may still come.
  const unfinished = (st.series || []).filter((s) => ["receiving", "waiting", "triaging"].includes(s.state));
  $("review-pending").hidden = !unfinished.length;
  $("review-pending").textContent = unfinished.length
    ? "Triage has not finished: " + unfinished.length + " series " + unfinished.map((s) => s.state).join(", ") +
      ". Its result may flag this study after you save; the study then comes back to the list, unread."
    : "";
  $("claimed").textContent = st.claimed_by ? st.claimed_by : "nobody";
  const mine = !!(st.claimed_by && state.session && st.claimed_by === state.session.user);
  $("release-btn").hidden = !mine;
  $("claim-btn").hidden = mine;
  keepClaim(uid, mine);
  $("reviews").replaceChildren(...(st.reviews || []).map((r) => el("li", {
    text: localTime(r.created_at) + " " + r.reviewer + ": " + (r.hemorrhage ? "hemorrhage" : "no hemorrhage") +
      (r.subtypes.length ? " (" + r.subtypes.join(", ") + ")" : "") +
      (r.slices && r.slices.length ? "; " + r.slices.length + " slice(s) marked" : "") +
      (r.comment ? " \u2014 " + r.comment : ""),
  })));
}

async function submitReview(ev) {
  ev.preventDefault();
  const f = ev.target, uid = state.study;
  const body = {
    hemorrhage: f.hemorrhage.value === "yes",
    subtypes: [...f.querySelectorAll("input[name=subtype]:checked")].map((c) => c.value),
    comment: f.comment.value,
    slices: [...state.marks.values()].map((s) => ({ sop_uid: s.sop_uid, frame: s.frame || 0 })),
    seen_review: state.seen ? state.seen.review : 0,
    seen_result: state.seen ? state.seen.result : null,
  };
  if (!body.hemorrhage) { body.subtypes = []; body.slices = []; }
  try {
    await api("/api/studies/" + encodeURIComponent(uid) + "/review", { method: "POST", body: JSON.stringify(body) });
    $("review-msg").textContent = "Review saved.";
    f.reset();
    state.marks = new Map();
    state.seen = null;
    await showStudy(uid, true);
  } catch (e) {
    $("review-msg").textContent = "Not saved: " + e.message;
    // Reviewed elsewhere or a newer result: the view shows the study as it
    // is now, the answers stay, and saving again stores them knowingly.
    if (e.status === 409 && state.study === uid) {
      state.seen = null;
      await showStudy(uid, true);
    }
  }
}

async function claim(on) {
  const uid = state.study, url = "/api/studies/" + encodeURIComponent(uid) + (on ? "/claim" : "/release");
  const failed = (e) => { $("claim-msg").textContent = (on ? "Not claimed: " : "Not released: ") + e.message; };
  $("claim-msg").textContent = "";
  try {
    await api(url, { method: "POST", body: "{}" });
  } catch (e) {
    // Someone else is reading it: take it over only when asked to.
    if (e.status === 409 && on) {
      if (confirm(e.message.split(";")[0] + ". Take it over?")) {
        try { await api(url, { method: "POST", body: JSON.stringify({ force: true }) }); } catch (e2) { failed(e2); }
      }
    } else {
      failed(e);
    }
  }
  await showStudy(uid, true);
}

// A claim lapses http.claim_minutes after it was made or last renewed, so
// that a reader who closed the tab or went home holds no study for ever:
// while the study is open here and claimed by this reader, the page renews
// it (the same claim again) every third of that time.
function keepClaim(uid, mine) {
  const t = state.claimTimer;
  if (t && (!mine || t.uid !== uid)) { clearInterval(t.id); state.claimTimer = null; }
  if (!mine || state.claimTimer) return;
  const ms = Math.max(1000, 1000 * ((state.session && state.session.claim_seconds) || 1800) / 3);
  state.claimTimer = { uid, id: setInterval(() => renewClaim(uid), ms) };
}

async function renewClaim(uid) {
  if (state.study !== uid) { keepClaim(uid, false); return; }
  try {
    await api("/api/studies/" + encodeURIComponent(uid) + "/claim", { method: "POST", body: "{}" });
  } catch (e) {
    // Taken over by another reader (409): the view says by whom, and the
    // renewing stops; any other failure is said by the button.
    if (state.study !== uid) return;
    if (e.status !== 409) $("claim-msg").textContent = "Claim not renewed: " + e.message;
    await showStudy(uid, true);
  }
}

// --- routing and start ---------------------------------------------------------
function route() {
  const m = location.hash.match(/^#\/study\/(.+)$/);
  $("list-view").hidden = !!m;
  $("study-view").hidden = !m;
  if (m) {
    $("review-msg").textContent = "";
    let uid;
    try {
      uid = decodeURIComponent(m[1]);
    } catch (e) {
      // A malformed link (a cut "%E0%A4%A"): no study of that name.
      state.study = null;
      studyNotFound("the link is malformed");
      return;
    }
    showStudy(uid);
  } else {
    state.study = null;
    keepClaim(null, false);
  }
}

function showLogin() {
  if (state.events) { state.events.close(); state.events = null; }
  state.session = null;
  $("offline").hidden = true;
  $("list-view").hidden = true;
  $("study-view").hidden = true;
  $("login-view").hidden = false;
}

// Returns whether a session was fetched; shows the login form on 401.
async function refreshSession() {
  try {
    state.session = await api("/api/session");
    return true;
  } catch (e) {
    if (e.status === 401) showLogin();
    return false;
  }
}

async function start() {
  try {
    // Bounded: over a connection that died silently, the answer never comes.
    state.session = await api("/api/session", { signal: AbortSignal.timeout(10000) });
  } catch (e) {
    if (e.status === 401) { showLogin(); return; }
    $("offline").hidden = false;
    restartLater();
    return;
  }
  $("login-view").hidden = true;
  $("who").textContent = state.session.user;
  $("logout-btn").hidden = !state.session.login;
  alertsButton();
  listen(); // first: the list is live whatever the route
  route();
}

document.addEventListener("DOMContentLoaded", () => {
  const tbody = $("rows");
  tbody.addEventListener("mouseenter", () => { state.hovering = true; });
  tbody.addEventListener("mouseleave", () => { state.hovering = false; applyPending(); });
  $("pending").addEventListener("click", () => { state.hovering = false; applyPending(); });
  $("status-filter").addEventListener("change", loadFiltered);
  $("more-btn").addEventListener("click", () => { state.drawn += LIST_STEP; render(state.rows); });
  $("show-older").addEventListener("click", () => { $("status-filter").value = "older"; loadFiltered(); });
  $("review-form").addEventListener("submit", submitReview);
  $("claim-btn").addEventListener("click", () => claim(true));
  $("release-btn").addEventListener("click", () => claim(false));
  $("notify-btn").addEventListener("click", async () => {
    try { audio().resume().catch(() => {}); } catch (e) { /* no audio */ } // a click may unlock it
    if ("Notification" in window) await Notification.requestPermission();
    alertsButton();
  });
  $("logout-btn").addEventListener("click", async () => {
    try { await api("/logout", { method: "POST", body: "{}" }); } catch (e) { /* gone anyway */ }
    location.reload();
  });
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    try {
      await api("/login", { method: "POST", body: JSON.stringify({ user: f.user.value, password: f.password.value }) });
      f.reset();
      start();
    } catch (e) {
      $("login-error").textContent = e.message;
    }
  });
  window.addEventListener("hashchange", route);
  setInterval(watchStream, 5000);
  setInterval(() => document.querySelectorAll(".age").forEach((s) => { s.textContent = age(s.dataset.at); }), 30000);
  start();
});
