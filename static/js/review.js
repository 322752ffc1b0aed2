// The review station: a gallery of a slide's cells grouped by class, keyboard-first, every change saved at once.
// Data comes from the slide's review/state.json; changes go to review/classify.json and the sign-off endpoints.
(function () {
  "use strict";

  const station = document.getElementById("review-station");
  if (!station) return;

  const REVIEW = "__review";
  const $ = (id) => document.getElementById(id);
  const canReview = station.dataset.canReview === "1";
  const canCountersign = station.dataset.canCountersign === "1";
  const username = station.dataset.username;
  const csrf = station.querySelector("input[name=csrfmiddlewaretoken]").value;
  const gallery = $("gallery");

  let state = null;                 // the last state.json, kept current with every answer
  const cells = new Map();          // cell id -> cell (as the server sent it)
  const tiles = new Map();          // cell id -> its <li>, made once (its image is never reloaded)
  const groups = new Map();         // group key -> {section, grid, count}
  let order = [];                   // cell ids in the order shown
  let selected = new Set();
  let cursor = null;                // the cell the keyboard is on
  let anchor = null;                // where a Shift range starts
  const undoStack = [];
  let queue = Promise.resolve();    // saves run one after another, in the order they were made

  // --- small helpers --------------------------------------------------------------------------------------------
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const percent = (value, digits = 0) => `${(value * 100).toFixed(digits)}%`;
  const labelOf = (key) => {
    const category = state && state.categories.find((c) => c.key === key);
    return category ? category.label : key;
  };
  const show = (node, visible) => { node.hidden = !visible; };
  const pad = (n) => String(n).padStart(2, "0");
  const stamp = (iso) => {  // 2026-11-30 15:05, in the browser's time zone
    const t = new Date(iso);
    return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${pad(t.getHours())}:${pad(t.getMinutes())}`;
  };

  function message(kind, text) {
    const error = $("review-error"), notice = $("review-notice");
    show(error, kind === "error"); show(notice, kind === "notice");
    (kind === "error" ? error : notice).textContent = text || "";
    if (kind === "notice") setTimeout(() => { if (notice.textContent === text) show(notice, false); }, 4000);
  }

  async function send(url, body, asJson) {
    const headers = { "Accept": "application/json", "X-CSRFToken": csrf };
    if (asJson) headers["Content-Type"] = "application/json";
    const response = await fetch(url, {
      method: "POST", headers, credentials: "same-origin",
      body: asJson ? JSON.stringify(body) : new URLSearchParams(body),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (!response.ok) {
      const text = (data.error && data.error.message) || `The server refused (${response.status}).`;
      throw Object.assign(new Error(text), { status: response.status });
    }
    return data;
  }

  // --- groups and tiles -----------------------------------------------------------------------------------------
  const groupKey = (cell) => (cell.flagged && !cell.verified_class ? REVIEW : cell.verified_class || cell.ai_class);

  function makeGroup(key, label, hotkey) {
    const section = el("section", "cell-group");
    section.dataset.group = key;
    const head = el("h3", "group-head");
    if (hotkey) head.append(el("kbd", "", hotkey));
    head.append(el("span", "group-name", label));
    const count = el("span", "group-count", "0");
    head.append(count);
    if (key === REVIEW) head.append(el("span", "group-note muted"));
    const grid = el("ul", "cell-grid");
    grid.setAttribute("role", "listbox");
    grid.setAttribute("aria-multiselectable", "true");
    grid.setAttribute("aria-label", label);
    section.append(head, grid);
    if (key !== REVIEW) {
      section.addEventListener("dragover", (event) => {
        if (!canReview || state.locked) return;
        event.preventDefault(); section.classList.add("drop-over");
      });
      section.addEventListener("dragleave", () => section.classList.remove("drop-over"));
      section.addEventListener("drop", (event) => {
        event.preventDefault(); section.classList.remove("drop-over");
        const ids = (event.dataTransfer.getData("text/plain") || "").split(",").map(Number).filter(Boolean);
        if (ids.length) classify(ids, key);
      });
    }
    gallery.append(section);
    groups.set(key, { section, grid, count, label });
    return groups.get(key);
  }

  function buildGroups() {
    if (groups.size) return;
    makeGroup(REVIEW, "To review", "");
    state.categories.forEach((c) => makeGroup(c.key, c.label, c.hotkey));
  }

  function makeTile(cell) {
    const tile = el("li", "cell");
    tile.dataset.id = cell.id;
    tile.setAttribute("role", "option");
    const image = el("img");
    image.loading = "lazy"; image.decoding = "async"; image.width = 96; image.height = 96; image.alt = "";
    image.draggable = false;
    image.src = cell.thumb_url;
    tile.append(image, el("span", "cell-conf"), el("span", "cell-tag"), el("span", "cell-flag", "!"));
    tile.addEventListener("click", (event) => pick(cell.id, event));
    tile.addEventListener("dblclick", () => { moveTo(cell.id); openZoom(); });
    tile.addEventListener("dragstart", (event) => {
      const ids = selected.has(cell.id) ? [...selected] : [cell.id];
      event.dataTransfer.setData("text/plain", ids.join(","));
      event.dataTransfer.effectAllowed = "move";
    });
    tiles.set(cell.id, tile);
    return tile;
  }

  function paintTile(cell) {
    const tile = tiles.get(cell.id) || makeTile(cell);
    const changed = cell.verified_class && cell.verified_class !== cell.ai_class;
    tile.classList.toggle("flagged", cell.flagged);
    tile.classList.toggle("outlier", cell.flagged && /unlike/.test(cell.flag_reason || ""));
    tile.classList.toggle("verified", Boolean(cell.verified_class));
    tile.classList.toggle("changed", Boolean(changed));
    tile.draggable = canReview && !state.locked;
    tile.querySelector(".cell-conf").textContent = percent(cell.confidence);
    const tag = tile.querySelector(".cell-tag");
    tag.textContent = groupKey(cell) === REVIEW ? labelOf(cell.ai_class) : changed ? `AI: ${labelOf(cell.ai_class)}` : cell.verified_class ? "✓" : "";
    const why = cell.flagged ? ` · flagged: ${cell.flag_reason}` : "";
    const verified = cell.verified_class ? ` · verified ${labelOf(cell.verified_class)} by ${cell.verified_by}` : "";
    tile.title = `${cell.filename}: AI ${labelOf(cell.ai_class)} ${percent(cell.confidence, 1)}${why}${verified}`;
    tile.setAttribute("aria-label", tile.title);
    return tile;
  }

  function renderGallery() {
    buildGroups();
    const counts = new Map();
    const members = new Map();
    state.cells.forEach((cell) => {
      let key = groupKey(cell);
      if (!groups.has(key)) makeGroup(key, key, "");  // a category made inactive since: still shown
      if (!members.has(key)) members.set(key, []);
      members.get(key).push(cell);
      counts.set(key, (counts.get(key) || 0) + 1);
    });
    order = [];
    groups.forEach((group, key) => {
      const list = members.get(key) || [];
      list.forEach((cell) => { group.grid.append(paintTile(cell)); order.push(cell.id); });
      group.count.textContent = list.length;
      group.section.classList.toggle("empty-group", list.length === 0);
    });
    gallery.classList.toggle("locked", state.locked);
    show($("gallery-loading"), false);
    paintSelection();
  }

  // --- selection and the keyboard -------------------------------------------------------------------------------
  function paintSelection() {
    tiles.forEach((tile, id) => {
      tile.classList.toggle("selected", selected.has(id));
      tile.classList.toggle("cursor", id === cursor);
      tile.setAttribute("aria-selected", selected.has(id) ? "true" : "false");
    });
    const n = selected.size;
    $("selection-info").textContent = n === 0
      ? "Click a cell, or use the arrow keys."
      : `${n} cell${n === 1 ? "" : "s"} selected · press a class key or drag onto a group`;
    inspect();
  }

  function moveTo(id, extend) {
    if (id === null || id === undefined) return;
    cursor = id;
    if (extend && anchor !== null) {
      const a = order.indexOf(anchor), b = order.indexOf(id);
      selected = new Set(order.slice(Math.min(a, b), Math.max(a, b) + 1));
    } else {
      selected = new Set([id]); anchor = id;
    }
    paintSelection();
    const tile = tiles.get(id);
    if (tile) tile.scrollIntoView({ block: "nearest" });
  }

  function pick(id, event) {
    if (event.ctrlKey || event.metaKey) {
      if (selected.has(id)) selected.delete(id); else selected.add(id);
      cursor = id; anchor = id;
      paintSelection();
    } else {
      moveTo(id, event.shiftKey);
    }
    gallery.focus({ preventScroll: true });
  }

  function step(delta) {
    if (!order.length) return null;
    const index = order.indexOf(cursor);
    if (index < 0) return order[0];
    return order[Math.min(order.length - 1, Math.max(0, index + delta))];
  }

  function vertical(direction) {  // the nearest cell in the row above or below, by position on screen
    if (!order.length) return null;
    const current = tiles.get(cursor);
    if (!current) return order[0];
    const from = current.getBoundingClientRect();
    const x = from.left + from.width / 2;
    let best = null, bestRow = null, bestDx = Infinity;
    order.forEach((id) => {
      const r = tiles.get(id).getBoundingClientRect();
      const ahead = direction > 0 ? r.top > from.top + 4 : r.top < from.top - 4;
      if (!ahead) return;
      const closerRow = bestRow === null || (direction > 0 ? r.top < bestRow - 4 : r.top > bestRow + 4);
      const sameRow = bestRow !== null && Math.abs(r.top - bestRow) <= 4;
      const dx = Math.abs(r.left + r.width / 2 - x);
      if (closerRow || (sameRow && dx < bestDx)) { best = id; bestRow = r.top; bestDx = dx; }
    });
    return best === null ? cursor : best;
  }

  const zoom = $("cell-zoom");
  const typing = (event) => {
    const target = event.target;
    if (!target || !target.closest) return false;
    if (target.closest("input, textarea, select")) return true;
    return target.closest("button, a") !== null && (event.key === " " || event.key === "Enter");  // let them act
  };

  document.addEventListener("keydown", (event) => {
    if (!state || typing(event)) return;
    const key = event.key;
    if (zoom.open && (key === " " || key === "Escape")) { event.preventDefault(); zoom.close(); return; }
    const moves = { ArrowLeft: () => step(-1), ArrowRight: () => step(1), ArrowUp: () => vertical(-1), ArrowDown: () => vertical(1) };
    if (moves[key]) {
      event.preventDefault();
      moveTo(moves[key](), event.shiftKey);
      if (zoom.open) openZoom();
      return;
    }
    if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "z") { event.preventDefault(); undo(); return; }
    if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "a" && cursor !== null) {
      event.preventDefault();  // every cell of the cursor's group
      const group = groupKey(cells.get(cursor));
      selected = new Set(order.filter((id) => groupKey(cells.get(id)) === group));
      paintSelection();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (key === " ") { event.preventDefault(); openZoom(); return; }
    if (key === "Escape") { selected = new Set(); paintSelection(); return; }
    const category = state.categories.find((c) => c.hotkey && c.hotkey === key);
    if (category) {
      event.preventDefault();
      const ids = selected.size ? [...selected] : cursor !== null ? [cursor] : [];
      if (ids.length) classify(ids, category.key);
    }
  });

  // --- saving ---------------------------------------------------------------------------------------------------
  function absorb(data) {
    (data.cells || []).forEach((cell) => {
      cells.set(cell.id, cell);
      const index = state.cells.findIndex((c) => c.id === cell.id);
      if (index >= 0) state.cells[index] = cell;
    });
    ["differential", "counts", "out_of_scope"].forEach((k) => { if (data[k]) state[k] = data[k]; });
    renderGallery();
    renderDifferential();
    renderSignoff();
  }

  function classify(ids, newClass, fromUndo) {
    if (!canReview) { message("error", "Your role may look at this slide but not reclassify cells."); return; }
    const before = ids.map((id) => [id, cells.get(id).verified_class]);
    // The cursor goes on to the cell after the last one changed, as a technologist reads a gallery.
    const selectedIndexes = ids.map((id) => order.indexOf(id));
    const next = order.slice(Math.max(...selectedIndexes) + 1).find((id) => !ids.includes(id));
    queue = queue.then(async () => {
      try {
        const data = await send(state.urls.classify, { cells: ids, class: newClass }, true);
        if (!fromUndo) {
          undoStack.push(before);
          $("undo-button").disabled = false;
        }
        absorb(data);
        if (!fromUndo && ids.length === 1 && next !== undefined) moveTo(next);
        if (zoom.open) openZoom();
        message("notice", fromUndo ? "Undone." : `${ids.length} cell${ids.length === 1 ? "" : "s"}: ${newClass === null ? "verification removed" : labelOf(newClass)} · saved`);
      } catch (error) {
        message("error", error.message);
      }
    });
    return queue;
  }

  function undo() {
    const last = undoStack.pop();
    $("undo-button").disabled = undoStack.length === 0;
    if (!last) return;
    const byClass = new Map();
    last.forEach(([id, previous]) => {
      const key = previous === null || previous === undefined ? "" : previous;
      if (!byClass.has(key)) byClass.set(key, []);
      byClass.get(key).push(id);
    });
    byClass.forEach((ids, key) => classify(ids, key === "" ? null : key, true));
    selected = new Set(last.map(([id]) => id));
    cursor = last[0][0]; anchor = cursor;
    paintSelection();
  }
  $("undo-button").addEventListener("click", undo);

  // --- the inspector and the enlarged view ----------------------------------------------------------------------
  let inspectTimer = null;
  function describe(cell) {
    const parts = [`AI: ${labelOf(cell.ai_class)} ${percent(cell.confidence, 1)}`];
    if (cell.flagged) parts.push(`flagged: ${cell.flag_reason}`);
    parts.push(cell.verified_class ? `verified: ${labelOf(cell.verified_class)} (${cell.verified_by})` : "not verified");
    return parts.join(" · ");
  }
  function inspect() {
    const cell = cursor !== null ? cells.get(cursor) : null;
    show($("inspector"), Boolean(cell));
    if (!cell) return;
    $("inspector-title").textContent = cell.filename;
    $("inspector-text").textContent = describe(cell);
    clearTimeout(inspectTimer);  // the big images wait until the cursor rests, so fast arrow keys stay fast
    inspectTimer = setTimeout(() => {
      $("inspector-image").src = cell.image_url;
      $("inspector-gradcam").src = cell.gradcam_url;
    }, 180);
  }
  function openZoom() {
    const cell = cursor !== null ? cells.get(cursor) : null;
    if (!cell) return;
    $("zoom-title").textContent = cell.filename;
    $("zoom-text").textContent = describe(cell);
    $("zoom-image").src = cell.image_url;
    $("zoom-gradcam").src = cell.gradcam_url;
    if (!zoom.open) zoom.showModal();
  }
  $("enlarge-button").addEventListener("click", openZoom);
  $("zoom-close").addEventListener("click", () => zoom.close());
  zoom.addEventListener("close", () => gallery.focus({ preventScroll: true }));
  $("review-error").addEventListener("click", () => show($("review-error"), false));

  // --- the differential, the counts and the warnings ------------------------------------------------------------
  function renderDifferential() {
    const d = state.differential;
    const body = $("differential").querySelector("tbody");
    body.replaceChildren();
    const absolute = state.batch.wbc_count !== null && state.batch.wbc_count !== undefined;
    document.querySelectorAll(".abs-col").forEach((th) => show(th, absolute));
    d.differential.forEach((row) => {
      const tr = el("tr");
      tr.dataset.class = row.class;
      const range = row.low !== null && row.low !== undefined ? `${row.low}–${row.high}` : "—";
      const flag = el("td", "flag-cell");
      if (row.flag) flag.append(el("span", `range-flag range-${row.flag}`, row.flag));
      tr.append(el("th", "", labelOf(row.class)), el("td", "num", row.count), el("td", "num", row.percent.toFixed(1)),
        el("td", "num muted", range), flag);
      if (absolute) tr.append(el("td", "num", row.absolute === null ? "—" : row.absolute.toFixed(2)));
      body.append(tr);
    });
    const other = $("non-wbc").querySelector("tbody");
    other.replaceChildren();
    const withCells = d.non_wbc.filter((c) => c.count > 0);
    withCells.forEach((c) => {
      const tr = el("tr");
      tr.append(el("th", "", c.label), el("td", "num", c.count), el("td", "num", c.per_100_wbc === null ? "—" : c.per_100_wbc.toFixed(1)));
      other.append(tr);
    });
    show($("non-wbc"), withCells.length > 0);
    $("differential-note").textContent = `${d.verified} of ${d.classified} cells verified`;
    const a = d.agreement;
    $("agreement").textContent = a.verified
      ? `Pre-classification agreement: ${percent(a.share)} (${a.agreeing} of ${a.verified} verified cells kept the AI's class).`
      : "Pre-classification agreement: no verified cells yet.";

    const counts = state.counts;
    $("counted").textContent = counts.counted; $("target").textContent = counts.target;
    $("count-pill").classList.toggle("short", counts.short);
    const warning = $("count-warning");
    show(warning, counts.short);
    warning.textContent = counts.short
      ? `Counted ${counts.counted} of ${counts.target} WBC: ${counts.target - counts.counted} short of your laboratory's target.`
      : "";
    const scope = d.out_of_scope || {};
    show($("out-of-scope"), Boolean(scope.warn));
    $("out-of-scope-text").textContent = scope.warning || "";
    $("out-of-scope-share").textContent = percent(scope.share || 0);
    $("out-of-scope-limit").textContent = percent(scope.limit || 0);
    const review = groups.get(REVIEW);
    if (review) {
      review.section.classList.toggle("done", d.to_review === 0);
      review.section.querySelector(".group-note").textContent = d.to_review === 0
        ? `every cell flagged at ${state.threshold.toFixed(2)} is reviewed`
        : `flagged at ${state.threshold.toFixed(2)} (low confidence or unlike the five white-cell classes), not verified yet`;
    }
    show($("absolute-hint"), !absolute && !state.locked);
  }

  // --- sign-off ---------------------------------------------------------------------------------------------------
  const STATE_LABELS = { "in review": "In review", "awaiting countersign": "Awaiting countersign", "final": "Final", "amending": "Amending" };

  function renderSignoff() {
    const badge = $("slide-state");
    badge.textContent = STATE_LABELS[state.state] || state.state;
    badge.className = `state-badge state-${state.state.replace(/\s+/g, "-")}`;
    const version = $("version");
    show(version, Boolean(state.version));
    version.textContent = state.version ? `Version ${state.version}` : "";
    station.classList.toggle("is-locked", state.locked);

    const when = state.signed_at ? stamp(state.signed_at) : "";
    const banner = $("locked-banner");
    show(banner, state.locked);
    banner.textContent = state.locked
      ? `Locked. Version ${state.version} was signed by ${state.signed_by} on ${when}${state.countersigned_by ? `, countersigned by ${state.countersigned_by}` : ""}. To change a cell, amend the report with a reason.`
      : "";

    const toReview = state.differential.to_review;
    let status;
    if (state.batch.status !== "done") status = "The slide is still being classified; it can be signed once every image is done.";
    else if (state.state === "awaiting countersign") status = `Signed by ${state.signed_by}; waiting for a Supervisor's countersignature.`;
    else if (state.state === "final") status = `Final: signed by ${state.signed_by}${state.countersigned_by ? ` and countersigned by ${state.countersigned_by}` : ""}.`;
    else if (toReview) status = `${toReview} flagged cell${toReview === 1 ? "" : "s"} still to review before signing.`;
    else status = "Every flagged cell is reviewed: ready to sign.";
    $("signoff-status").textContent = status;

    const next = state.locked ? null : state.version || 1;
    $("sign-version").textContent = next ? `version ${next}` : "";
    show($("sign-form"), canReview && !state.locked);
    show($("countersign-form"), canCountersign && state.state === "awaiting countersign" && state.signed_by !== username);
    show($("amend-form"), canReview && state.locked);
  }

  function signoffForm(formId, urlKey, field, done) {
    $(formId).addEventListener("submit", async (event) => {
      event.preventDefault();
      const input = $(formId).querySelector(`[name=${field}]`);
      const button = $(formId).querySelector("button");
      button.disabled = true;
      try {
        const answer = await send(state.urls[urlKey], { [field]: input.value }, false);
        input.value = "";
        undoStack.length = 0;  // a signature (or a new version) starts a fresh history of changes
        $("undo-button").disabled = true;
        await load();
        message("notice", done(answer));
      } catch (error) {
        message("error", error.message);
      } finally {
        button.disabled = false;
      }
    });
  }
  signoffForm("sign-form", "sign", "password", (a) => `Version ${a.version} signed (${a.state}).`);
  signoffForm("countersign-form", "countersign", "password", (a) => `Version ${a.version} countersigned.`);
  signoffForm("amend-form", "amend", "reason", (a) => `Version ${a.version} opened: the slide can be changed again.`);

  // --- loading --------------------------------------------------------------------------------------------------
  function legend() {
    const list = $("key-legend");
    list.querySelectorAll(".class-key").forEach((n) => n.remove());
    state.categories.filter((c) => c.hotkey).forEach((c) => {
      const row = el("div", "class-key");
      const dt = el("dt"); dt.append(el("kbd", "", c.hotkey));
      row.append(dt, el("dd", c.is_wbc ? "" : "muted", c.label));
      list.append(row);
    });
  }

  async function load() {
    const response = await fetch(station.dataset.stateUrl, { headers: { "Accept": "application/json" }, credentials: "same-origin" });
    if (!response.ok) throw new Error(`The slide could not be loaded (${response.status}).`);
    state = await response.json();
    cells.clear();
    state.cells.forEach((cell) => cells.set(cell.id, cell));
    if (!document.querySelector(".class-key")) legend();
    renderGallery();
    renderDifferential();
    renderSignoff();
    if (!state.cells.length) {
      show($("gallery-loading"), true);
      $("gallery-loading").textContent = "No classified cells on this slide yet.";
    }
  }

  load().then(() => {
    const first = order.find((id) => groupKey(cells.get(id)) === REVIEW);
    if (first !== undefined) moveTo(first);
    gallery.focus({ preventScroll: true });
  }).catch((error) => message("error", error.message));
})();
