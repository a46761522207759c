// sdbatch gallery: builds the interactive page from the JSON in #gallery-data. Text is only ever set with
// textContent / text nodes, never parsed as HTML, so a prompt holding a script tag shows as the text it is.
(() => {
  "use strict";
  const DATA = JSON.parse(document.getElementById("gallery-data").textContent);
  const ITEMS = DATA.items.map((item, i) => Object.assign({}, item, { i }));
  const IMAGE_DIM = "image";
  const RELOAD_MS = 3000;
  const STORE = "sdbatch-gallery:" + location.pathname;
  const SORTS = { order: "Order", seed: "Seed", cfg_scale: "CFG scale", steps: "Steps", time: "Time" };
  const state = Object.assign({ filter: "", sort: "order", dir: 1, view: DATA.kind === "sweep" && DATA.dims.length ? "grid" : "images", x: null, y: null, fixed: {},
    open: null, picked: [], comparing: false, scroll: 0 }, restore());
  state.picked = state.picked.filter((file) => ITEMS.some((item) => item.file === file));
  let nav = [];  // the items the detail view steps through (the visible order of the current view)

  // ------------------------------------------------------------------ small helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  const href = (path) => path.split("/").map(encodeURIComponent).join("/");
  const params = (item) => item.params || {};
  const show = (value) => value === null || value === undefined ? "\u2014"
    : typeof value === "object" ? JSON.stringify(value) : String(value);
  function restore() {
    try { return JSON.parse(sessionStorage.getItem(STORE) || "{}"); } catch (e) { return {}; }
  }
  function persist() {
    state.scroll = window.scrollY;
    try { sessionStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { /* storage off: state is not kept */ }
  }

  // ------------------------------------------------------------------ page skeleton

  const app = document.getElementById("app");
  app.replaceChildren();
  const filter = el("input", { type: "search", id: "filter", placeholder: "Filter prompts  ( / )",
    "aria-label": "Filter prompts", value: state.filter });
  const sort = el("select", { id: "sort", "aria-label": "Sort by" },
    ...Object.entries(SORTS).map(([value, label]) => el("option", { value, text: "Sort: " + label })));
  sort.value = state.sort in SORTS ? state.sort : "order";
  const sortDir = el("button", { type: "button", id: "sort-dir", title: "Reverse the order" });
  const viewImages = el("button", { type: "button", "data-view": "images", text: "Images" });
  const viewGrid = DATA.dims.length ? el("button", { type: "button", "data-view": "grid", text: "X/Y grid" }) : null;
  const compareButton = el("button", { type: "button", id: "compare", title: "Pick images with their compare box" });
  const count = el("span", { class: "count", id: "count", "aria-live": "polite" });
  // a live page not rewritten for this long belongs to a run that was killed: it stops reloading and says so
  const STALE_MS = 30 * 60 * 1000;
  const stale = DATA.live && Date.now() - Date.parse(DATA.generated) > STALE_MS;
  const liveBadge = !DATA.live ? null : stale
    ? el("span", { class: "stale", text: "no update since " + new Date(DATA.generated).toLocaleString()
      + ": the run has stopped? (sdbatch-gallery DIR rewrites this page)" })
    : el("span", { class: "live", text: "running" });
  const toolbar = el("div", { class: "toolbar", role: "toolbar" }, filter, sort, sortDir, viewImages, viewGrid,
    compareButton, liveBadge, count);
  const cards = el("div", { class: "cards", id: "cards" });
  const empty = el("p", { class: "empty", text: "No image matches the filter.", hidden: true });
  const gridView = el("section", { id: "grid", "aria-label": "X/Y grid" });
  app.append(toolbar, cards, empty, gridView);

  // ------------------------------------------------------------------ image cards

  const cardOf = new Map();
  for (const item of ITEMS) cardOf.set(item.i, card(item));
  cards.append(...cardOf.values());

  function card(item) {
    const node = el("figure", { class: "card" + (item.file ? "" : " failed"), "data-i": item.i });
    if (!item.file) {
      node.append(el("div", { class: "error" }, el("strong", { text: "job " + item.job + " " + item.status }),
        el("span", { class: "error-text", text: item.error || "" })),
      el("figcaption", {}, el("span", { class: "prompt", text: (item.overrides || []).join(" ") })));
      return node;
    }
    // loading before src: an image given its src first starts loading at once, and 1,000 of them take seconds
    const img = el("img", { loading: "lazy", decoding: "async", src: href(item.thumb),
      alt: "seed " + params(item).seed, width: params(item).width, height: params(item).height });
    img.addEventListener("error", () => node.classList.add("broken"));
    const box = el("input", { type: "checkbox", "aria-label": "Pick for compare" });
    box.checked = state.picked.includes(item.file);
    box.addEventListener("change", () => pick(item, box.checked));
    node.classList.toggle("picked", box.checked);
    node.append(el("button", { class: "thumb", type: "button", title: "Open (Enter)",
      onclick: () => openDetail(item, visibleItems()) }, img),
    el("figcaption", {}, el("span", { class: "seed", text: "seed " + show(params(item).seed) }),
      el("span", { class: "prompt", text: params(item).prompt || "(empty prompt)" })),
    el("label", { class: "pick" }, box, " compare"));
    return node;
  }

  function matches(item, words) {
    const p = params(item);
    const text = [p.prompt, p.negative_prompt, item.error, (item.overrides || []).join(" ")].join("\n").toLowerCase();
    return words.every((word) => text.includes(word));
  }

  function sortKey(item) {
    if (state.sort === "order") return item.i;
    const value = state.sort === "time" ? item.time : params(item)[state.sort];
    return typeof value === "number" ? value : null;
  }

  function ordered() {
    return ITEMS.slice().sort((a, b) => {
      const ka = sortKey(a), kb = sortKey(b);
      if (ka === null || kb === null) return (ka === null) - (kb === null) || a.i - b.i;  // unknown values last
      return (ka - kb) * state.dir || a.i - b.i;
    });
  }

  function visibleItems(sorted = ordered()) {
    const words = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    return sorted.filter((item) => matches(item, words));
  }

  function renderCards() {
    const sorted = ordered();
    const visible = visibleItems(sorted);
    const shown = new Set(visible.map((item) => item.i));
    for (const item of sorted) {
      const node = cardOf.get(item.i);
      node.hidden = !shown.has(item.i);
      cards.append(node);  // moves it: the DOM order follows the sort
    }
    empty.hidden = visible.length > 0;
    const images = ITEMS.filter((item) => item.file).length;
    const visibleImages = visible.filter((item) => item.file).length;
    count.textContent = visibleImages === images ? images + " image" + (images === 1 ? "" : "s")
      : visibleImages + " of " + images + " images";
  }

  // ------------------------------------------------------------------ X/Y grid

  function dim(key) { return DATA.dims.find((d) => d.key === key); }

  function defaultAxes() {
    const keys = DATA.dims.map((d) => d.key);
    const named = keys.filter((key) => key !== IMAGE_DIM);
    if (DATA.kind === "sweep") {  // as the contact sheet: the last swept key across, the one before down
      return [named[named.length - 1] || keys[0], named[named.length - 2] || null];
    }
    return [keys[0], keys[1] || null];
  }

  function renderGrid() {
    if (!dim(state.x)) [state.x, state.y] = defaultAxes();
    if (state.y === state.x || (state.y && !dim(state.y))) state.y = null;
    const axisSelect = (id, label, value, none) => {
      const select = el("select", { id },
        ...(none ? [el("option", { value: "", text: "(none)" })] : []),
        ...DATA.dims.map((d) => el("option", { value: d.key, text: d.key })));
      select.value = value || "";
      select.addEventListener("change", () => {
        if (id === "axis-x") { if (select.value === state.y) state.y = state.x; state.x = select.value; }
        else state.y = select.value || null;
        renderGrid(); persist();
      });
      return el("label", {}, label, select);
    };
    const controls = el("div", { class: "axes" }, axisSelect("axis-x", "Across", state.x, false),
      axisSelect("axis-y", "Down", state.y, true));
    for (const d of DATA.dims) {
      if (d.key === state.x || d.key === state.y) continue;
      if (!d.values.includes(state.fixed[d.key])) state.fixed[d.key] = d.values[0];
      const select = el("select", { "data-dim": d.key }, ...d.values.map((v) => el("option", { value: v, text: v })));
      select.value = state.fixed[d.key];
      select.addEventListener("change", () => { state.fixed[d.key] = select.value; renderGrid(); persist(); });
      controls.append(el("label", {}, d.key, select));
    }
    const xs = dim(state.x).values, ys = state.y ? dim(state.y).values : [null];
    const table = el("table", { class: "xy" });
    table.append(el("tr", {}, el("th", {}), ...xs.map((x) => el("th", { scope: "col", text: state.x + ": " + x }))));
    const order = [];
    for (const y of ys) {
      const row = el("tr", {}, el("th", { class: "row", scope: "row", text: y === null ? "" : state.y + ": " + y }));
      for (const x of xs) {
        const item = cellItem(x, y);
        if (item && item.file) order.push(item);
        row.append(el("td", { class: "cell", "data-x": x, "data-y": y === null ? "" : y }, cellContent(item, order)));
      }
      table.append(row);
    }
    gridView.replaceChildren(controls, el("div", { class: "xy-wrap" }, table));
  }

  function cellItem(x, y) {
    return ITEMS.find((item) => {
      const cell = item.cell || {};
      if (String(cell[state.x]) !== x) return false;
      if (state.y && String(cell[state.y]) !== y) return false;
      return DATA.dims.every((d) => d.key === state.x || d.key === state.y || cell[d.key] === undefined
        || String(cell[d.key]) === state.fixed[d.key]);
    });
  }

  function cellContent(item, order) {
    if (!item) return el("div", { class: "none", text: "\u2014" });
    if (!item.file) {
      return el("div", { class: "error" }, el("strong", { text: item.status }), el("span", { text: item.error || "" }));
    }
    return el("button", { type: "button", title: "seed " + params(item).seed, onclick: () => openDetail(item, order) },
      el("img", { loading: "lazy", src: href(item.thumb), alt: "seed " + params(item).seed }));
  }

  // ------------------------------------------------------------------ detail view

  const detail = el("div", { class: "overlay", id: "detail", role: "dialog", "aria-modal": "true", hidden: true });
  const compareView = el("div", { class: "overlay", id: "compare-view", role: "dialog", "aria-modal": "true",
    hidden: true });
  document.body.append(detail, compareView);
  for (const overlay of [detail, compareView]) {
    overlay.addEventListener("click", (event) => { if (event.target === overlay) close(); });
  }

  function openDetail(item, order) {
    nav = order && order.length ? order : [item];
    state.open = item.file;
    const p = params(item);
    const at = nav.indexOf(item);
    const step = (by) => nav[(at + by + nav.length) % nav.length];
    const copyInfotext = el("button", { type: "button", id: "copy-infotext", text: "Copy infotext" });
    copyInfotext.addEventListener("click", () => copy(item.infotext, copyInfotext));
    const copyCommand = el("button", { type: "button", id: "copy-command", text: "Copy command" });
    copyCommand.addEventListener("click", () => copy(item.command, copyCommand));
    const rows = Object.entries(p).map(([key, value]) => el("tr", {}, el("th", { scope: "row", text: key }),
      el("td", { text: show(value) })));
    detail.replaceChildren(el("div", { class: "sheet" },
      el("header", {},
        el("h2", {}, el("span", { class: "detail-seed", text: "seed " + show(p.seed) }), " \u00b7 ",
          el("span", { class: "detail-file", text: item.file })),
        el("button", { type: "button", class: "prev", title: "Previous (\u2190)", text: "\u2190",
          onclick: () => openDetail(step(-1), nav), disabled: nav.length < 2 }),
        el("button", { type: "button", class: "next", title: "Next (\u2192)", text: "\u2192",
          onclick: () => openDetail(step(1), nav), disabled: nav.length < 2 }),
        el("a", { href: href(item.file), target: "_blank", rel: "noopener", text: "Open file" }),
        el("button", { type: "button", class: "close", title: "Close (Esc)", text: "\u2715", onclick: close })),
      el("div", { class: "detail-body" },
        fullImage(item),
        el("div", { class: "detail-side" },
          el("div", { class: "copy-row" }, copyInfotext, copyCommand),
          el("h3", { text: "Prompt" }), el("pre", { class: "prompt-text", text: p.prompt || "" }),
          el("h3", { text: "Command for this image" }), el("pre", { class: "command", text: item.command || "" }),
          el("h3", { text: "Infotext (A1111)" }), el("pre", { class: "infotext", text: item.infotext || "" }),
          el("h3", { text: "Parameters" }), el("table", { class: "params" }, ...rows)))));
    detail.hidden = false;
    detail.querySelector(".close").focus();
    persist();
  }

  function fullImage(item) {  // small images (the tiny demo model's) are shown enlarged, pixels kept sharp
    const img = el("img", { class: "full", src: href(item.file), alt: "seed " + show(params(item).seed) });
    img.addEventListener("load", () => {
      const scale = Math.floor(512 / Math.max(img.naturalWidth, img.naturalHeight, 1));
      if (scale > 1) {
        img.style.width = img.naturalWidth * scale + "px";
        img.style.imageRendering = "pixelated";
      }
    });
    return img;
  }

  function close() {
    detail.hidden = true;
    compareView.hidden = true;
    state.open = null;
    state.comparing = false;
    persist();
  }

  async function copy(text, button) {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (e) {
      ok = copyBySelection(text);
    }
    const label = button.textContent;
    button.textContent = ok ? "Copied" : "Copy failed: select the text";
    setTimeout(() => { button.textContent = label; }, 1500);
  }

  function copyBySelection(text) {  // where the Clipboard API is unavailable (older browsers, some file:// setups)
    const area = el("textarea", { class: "offscreen", readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  // ------------------------------------------------------------------ compare

  function pick(item, on) {
    state.picked = state.picked.filter((file) => file !== item.file);
    if (on) state.picked.push(item.file);
    cardOf.get(item.i).classList.toggle("picked", on);
    updateCompareButton();
    persist();
  }

  function updateCompareButton() {
    compareButton.textContent = "Compare (" + state.picked.length + ")";
    compareButton.disabled = state.picked.length < 2;
  }

  function openCompare() {
    const chosen = state.picked.map((file) => ITEMS.find((item) => item.file === file)).filter(Boolean);
    if (chosen.length < 2) return;
    const keys = [...new Set(chosen.flatMap((item) => Object.keys(params(item))))];
    const onlyDiffs = el("input", { type: "checkbox", id: "only-diffs" });
    const rows = keys.map((key) => {
      const values = chosen.map((item) => show(params(item)[key]));
      const differs = new Set(values).size > 1;
      return el("tr", { class: differs ? "diff" : "same", "data-key": key }, el("th", { scope: "row", text: key }),
        ...values.map((value) => el("td", { text: value })));
    });
    onlyDiffs.addEventListener("change", () => {
      for (const row of rows) row.hidden = onlyDiffs.checked && !row.classList.contains("diff");
    });
    compareView.replaceChildren(el("div", { class: "sheet" },
      el("header", {}, el("h2", { text: "Compare " + chosen.length + " images" }),
        el("label", { class: "hint" }, onlyDiffs, " only differences"),
        el("button", { type: "button", id: "clear-picks", text: "Clear picks", onclick: () => {
          for (const item of chosen) pick(item, false);
          for (const box of cards.querySelectorAll(".pick input")) box.checked = false;
          close();
        } }),
        el("button", { type: "button", class: "close", title: "Close (Esc)", text: "\u2715", onclick: close })),
      el("div", { class: "compare-images" }, ...chosen.map((item) => el("figure", {},
        fullImage(item), el("figcaption", { text: item.file })))),
      el("div", { class: "compare-table" }, el("table", { class: "params" },
        el("tr", {}, el("th", { text: "" }), ...chosen.map((item) => el("th", { text: item.file }))), ...rows))));
    compareView.hidden = false;
    state.comparing = true;
    compareView.querySelector(".close").focus();
    persist();
  }

  // ------------------------------------------------------------------ views, keys, live reload

  function setView(view) {
    state.view = view === "grid" && viewGrid ? "grid" : "images";
    const grid = state.view === "grid";
    cards.hidden = grid;
    gridView.hidden = !grid;
    filter.disabled = grid;
    sort.disabled = grid;
    sortDir.disabled = grid;
    viewImages.classList.toggle("on", !grid);
    if (viewGrid) viewGrid.classList.toggle("on", grid);
    if (grid) { empty.hidden = true; renderGrid(); } else renderCards();
    persist();
  }

  function updateSortDir() {
    sortDir.textContent = state.dir > 0 ? "\u2191 ascending" : "\u2193 descending";
  }

  filter.addEventListener("input", () => { state.filter = filter.value; renderCards(); persist(); });
  sort.addEventListener("change", () => { state.sort = sort.value; renderCards(); persist(); });
  sortDir.addEventListener("click", () => { state.dir = -state.dir; updateSortDir(); renderCards(); persist(); });
  viewImages.addEventListener("click", () => setView("images"));
  if (viewGrid) viewGrid.addEventListener("click", () => setView("grid"));
  compareButton.addEventListener("click", openCompare);

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && (!detail.hidden || !compareView.hidden)) { close(); event.preventDefault(); return; }
    if (!detail.hidden && (event.key === "ArrowRight" || event.key === "ArrowLeft")) {
      detail.querySelector(event.key === "ArrowRight" ? ".next" : ".prev").click();
      event.preventDefault();
      return;
    }
    if (event.target === filter || !detail.hidden || !compareView.hidden) return;
    if (event.key === "/") { filter.focus(); event.preventDefault(); return; }
    if (state.view === "images" && event.key.startsWith("Arrow")) moveFocus(event);
  });

  function moveFocus(event) {  // arrows walk the visible cards: left/right by one, up/down by a row
    const buttons = [...cards.querySelectorAll(".card:not([hidden]) .thumb")];
    if (!buttons.length) return;
    const at = buttons.indexOf(document.activeElement);
    const columns = getComputedStyle(cards).gridTemplateColumns.split(" ").length || 1;
    const by = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns }[event.key];
    const next = at < 0 ? 0 : Math.min(buttons.length - 1, Math.max(0, at + by));
    buttons[next].focus();
    buttons[next].scrollIntoView({ block: "nearest" });
    event.preventDefault();
  }

  window.addEventListener("scroll", () => { state.scroll = window.scrollY; }, { passive: true });

  if (DATA.live && !stale) {  // a running run: reload to see new images, but never while the user is reading or typing
    setInterval(() => {
      if (detail.hidden && compareView.hidden && document.activeElement !== filter) {
        persist();
        location.reload();
      }
    }, RELOAD_MS);
  }

  updateSortDir();
  updateCompareButton();
  setView(state.view);
  window.scrollTo(0, state.scroll || 0);
  const reopen = ITEMS.find((item) => item.file && item.file === state.open);
  if (reopen) openDetail(reopen, visibleItems());
  else if (state.comparing) openCompare();
  document.documentElement.dataset.ready = "true";  // the page is built (the browser tests wait for this)
})();
