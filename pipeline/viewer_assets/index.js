/* gapless index: every mapped sample in one table, shown a page of rows at a time.
 *
 * Vanilla JavaScript, no libraries, no network. The table's data is embedded once as JSON in
 * <script type="application/json" id="gapless-index"> (written by pipeline/viewer/index.py), by columns:
 * sample ids; each detail dictionary-coded (values + codes, -1 missing) or as numbers; each head × metric
 * as integers over the column's scale (null missing). Only the rows of the current page are in the DOM,
 * so 10^5 samples stay fast: a search is a substring test per row, a sort one sort of row numbers.
 *
 * Search: every word must be found in the sample id or a text detail (group, label, kind), any case.
 * Sort: a column's name; again reverses; missing values last either way. The state (search, sort,
 * page, scores shown) is kept in the URL's #fragment, so going back from a sample's page keeps it.
 */
(function () {
  "use strict";

  var node = document.getElementById("gapless-index");
  if (!node) return;
  var t0 = performance.now();
  var D = JSON.parse(node.textContent);
  var N = D.samples.length;
  var $ = function (id) { return document.getElementById(id); };

  // ---------------------------------------------------------------------------------------------
  // columns, decoded once

  var details = D.info.map(function (c) {
    if (c.numbers) {
      var num = new Float64Array(N);
      for (var i = 0; i < N; i++) num[i] = c.numbers[i] === null ? NaN : c.numbers[i];
      return { key: c.key, num: num };
    }
    return { key: c.key, values: c.values, codes: Int32Array.from(c.codes) };
  });
  var scores = D.columns.map(function (c) {
    var v = new Float64Array(N);
    for (var i = 0; i < N; i++) v[i] = c.values[i] === null ? NaN : c.values[i] / c.scale;
    return { head: c.head, metric: c.metric, count: c.scale === 1, v: v };
  });
  var pageOf = new Map(); // row -> [page url, thumbnail url or null]
  D.pages.forEach(function (p) { pageOf.set(p[0], [p[1], p[2]]); });

  // ---------------------------------------------------------------------------------------------
  // state

  var state = { q: "", sort: "", desc: false, page: 0, size: 100, metric: null, paged: false };
  var haystack = null; // per row: sample id and text details, lower case (built at the first search)
  var sortCache = { key: null, order: null }; // every row, sorted by a column ascending
  var view = null; // the rows found, in display order (Int32Array)
  var shown = []; // visible score columns (indices into `scores`)
  // ms: script start and first page drawn (after navigation), decoding the data, the last redraw
  var timings = { start: t0, firstRender: 0, parse: 0, lastUpdate: 0 };

  function fmt(v, count) {
    if (v !== v) return "\u2013";
    return count ? String(v) : v.toFixed(3);
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === "class") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    });
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function detailText(d, row) {
    if (d.num) return d.num[row] !== d.num[row] ? "" : String(d.num[row]);
    var code = d.codes[row];
    return code < 0 ? "" : d.values[code];
  }

  // ---------------------------------------------------------------------------------------------
  // search, sort, the rows found

  function matches() {
    var words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    if (!words.length && !state.paged) return null; // every row
    if (words.length && !haystack) {
      haystack = new Array(N);
      var text = details.filter(function (d) { return !d.num; });
      for (var i = 0; i < N; i++) {
        var s = D.samples[i];
        for (var j = 0; j < text.length; j++) s += "\n" + detailText(text[j], i);
        haystack[i] = s.toLowerCase();
      }
    }
    var found = new Uint8Array(N);
    for (var r = 0; r < N; r++) {
      if (state.paged && !pageOf.has(r)) continue;
      var ok = true;
      for (var w = 0; w < words.length && ok; w++) ok = haystack[r].indexOf(words[w]) >= 0;
      found[r] = ok ? 1 : 0;
    }
    return found;
  }

  // the values a column sorts by: numbers (NaN missing), or for text the rank of the row's value
  function sortValues(key) {
    var out = new Float64Array(N);
    var i;
    if (key === "sample") {
      var ids = D.samples.map(function (s, k) { return [s, k]; });
      ids.sort(function (a, b) { return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0; });
      for (i = 0; i < N; i++) out[ids[i][1]] = i;
      return out;
    }
    if (key.indexOf("info:") === 0) {
      var d = details[Number(key.slice(5))];
      if (d.num) return d.num;
      var rank = d.values.map(function (v, k) { return [v, k]; })
        .sort(function (a, b) { return a[0].localeCompare(b[0], undefined, { numeric: true }); });
      var rankOf = new Float64Array(d.values.length);
      rank.forEach(function (e, k) { rankOf[e[1]] = k; });
      for (i = 0; i < N; i++) out[i] = d.codes[i] < 0 ? NaN : rankOf[d.codes[i]];
      return out;
    }
    return scores[Number(key.slice(6))].v; // "score:<column>"
  }

  function sortedRows(key) {
    if (sortCache.key !== key) {
      var v = sortValues(key);
      var order = new Int32Array(N);
      for (var i = 0; i < N; i++) order[i] = i;
      order.sort(function (a, b) {
        var x = v[a], y = v[b];
        if (x !== x) return y !== y ? a - b : 1;
        if (y !== y) return -1;
        return x < y ? -1 : x > y ? 1 : a - b;
      });
      var missing = 0;
      for (var k = 0; k < N; k++) if (v[k] !== v[k]) missing++;
      sortCache = { key: key, order: order, missing: missing };
    }
    return sortCache;
  }

  function computeView() {
    var found = matches();
    var order, n = N;
    if (state.sort) {
      var s = sortedRows(state.sort);
      order = new Int32Array(N);
      if (state.desc) { // descending, missing values still last
        var present = N - s.missing, k = 0;
        for (var i = present - 1; i >= 0; i--) order[k++] = s.order[i];
        for (var j = present; j < N; j++) order[k++] = s.order[j];
      } else {
        order = s.order;
      }
    }
    if (!found) {
      if (order) return order;
      order = new Int32Array(N);
      for (var r = 0; r < N; r++) order[r] = r;
      return order;
    }
    var out = new Int32Array(N);
    n = 0;
    for (var t = 0; t < N; t++) {
      var row = order ? order[t] : t;
      if (found[row]) out[n++] = row;
    }
    return out.subarray(0, n);
  }

  // ---------------------------------------------------------------------------------------------
  // the table

  function visibleColumns() {
    return scores.map(function (_, i) { return i; }).filter(function (i) {
      return state.metric === "" || D.metrics[scores[i].metric].name === state.metric;
    });
  }

  function sortButton(th, key, text, title) {
    var b = el("button", { type: "button", "class": "sort", "data-sort": key }, text);
    if (title) b.title = title;
    if (state.sort === key) {
      th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
      b.textContent = text + (state.desc ? " \u25BC" : " \u25B2");
    }
    th.appendChild(b);
    return th;
  }

  function header() {
    var thead = el("thead");
    var top = el("tr"), sub = el("tr");
    top.appendChild(sortButton(el("th", { rowspan: "2" }), "sample", "sample"));
    details.forEach(function (d, i) { top.appendChild(sortButton(el("th", { rowspan: "2" }), "info:" + i, d.key)); });
    D.heads.forEach(function (h, hi) {
      var cols = shown.filter(function (c) { return scores[c].head === hi; });
      if (!cols.length) return;
      top.appendChild(el("th", { colspan: String(cols.length), "class": "head-col", title: h.description || h.name }, h.label));
      cols.forEach(function (c) {
        var m = D.metrics[scores[c].metric];
        sub.appendChild(sortButton(el("th"), "score:" + c, m.label, m.title));
      });
    });
    thead.appendChild(top);
    thead.appendChild(sub);
    return thead;
  }

  function sampleCell(row) {
    var td = el("td", { "class": "sample" });
    var page = pageOf.get(row);
    if (!page) {
      td.appendChild(el("span", null, D.samples[row]));
      return td;
    }
    var a = el("a", { href: page[0] });
    if (page[1]) a.appendChild(el("img", { "class": "thumb", src: page[1], alt: "", loading: "lazy" }));
    a.appendChild(el("span", null, D.samples[row]));
    td.appendChild(a);
    return td;
  }

  function bodyRow(row) {
    var tr = el("tr");
    tr.appendChild(sampleCell(row));
    details.forEach(function (d) {
      var text = detailText(d, row);
      tr.appendChild(el("td", d.num ? { "class": "num" } : null, text === "" ? "\u2013" : text));
    });
    var best = {}; // metric -> the best value over the heads; a tie everywhere marks nothing
    shown.forEach(function (c) {
      var m = scores[c].metric, v = scores[c].v[row];
      if (v !== v) return;
      var b = best[m] || (best[m] = { max: -Infinity, n: 0, distinct: {} });
      b.max = Math.max(b.max, v);
      b.n++;
      b.distinct[v] = true;
    });
    shown.forEach(function (c) {
      var s = scores[c], v = s.v[row], b = best[s.metric];
      var isBest = b && b.n > 1 && Object.keys(b.distinct).length > 1 && v === b.max;
      tr.appendChild(el("td", { "class": isBest ? "num best" : "num" }, fmt(v, s.count)));
    });
    return tr;
  }

  function footer() {
    var tr = el("tr");
    tr.appendChild(el("th", { scope: "row", title: "over the samples found that have the score" }, "mean"));
    details.forEach(function () { tr.appendChild(el("td")); });
    shown.forEach(function (c) {
      var v = scores[c].v, sum = 0, n = 0;
      for (var i = 0; i < view.length; i++) {
        var x = v[view[i]];
        if (x === x) { sum += x; n++; }
      }
      tr.appendChild(el("td", { "class": "num" }, n ? (sum / n).toFixed(3) : "\u2013"));
    });
    var tfoot = el("tfoot");
    tfoot.appendChild(tr);
    return tfoot;
  }

  function render() {
    var table = $("index-table");
    var pages = Math.max(1, Math.ceil(view.length / state.size));
    state.page = Math.max(0, Math.min(state.page, pages - 1));
    var start = state.page * state.size, end = Math.min(view.length, start + state.size);
    var tbody = el("tbody");
    for (var i = start; i < end; i++) tbody.appendChild(bodyRow(view[i]));
    table.textContent = "";
    table.appendChild(header());
    table.appendChild(tbody);
    if (shown.length) table.appendChild(footer());
    var of = view.length === N ? "" : " found (of " + N.toLocaleString("en") + ")";
    $("index-status").textContent = view.length ?
      "rows " + (start + 1).toLocaleString("en") + "\u2013" + end.toLocaleString("en") + " of " +
      view.length.toLocaleString("en") + of + ", page " + (state.page + 1) + " of " + pages :
      "no sample found" + (N ? " (of " + N.toLocaleString("en") + ")" : "");
    $("index-prev").disabled = state.page === 0;
    $("index-next").disabled = state.page >= pages - 1;
  }

  // recompute what changed, draw, remember the state in the URL
  function update(recompute) {
    var t = performance.now();
    shown = visibleColumns();
    if (recompute || !view) view = computeView();
    render();
    saveState();
    timings.lastUpdate = performance.now() - t;
  }

  // ---------------------------------------------------------------------------------------------
  // the URL's #fragment

  function saveState() {
    var p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.sort) p.set("sort", state.sort + (state.desc ? ":desc" : ""));
    if (state.page) p.set("page", String(state.page + 1));
    if (state.size !== 100) p.set("rows", String(state.size));
    if (state.metric !== defaultMetric) p.set("scores", state.metric || "all");
    if (state.paged) p.set("paged", "1");
    var hash = p.toString();
    try {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    } catch (e) { /* some browsers refuse it for file:// pages; the state is then not kept */ }
  }

  function loadState() {
    var p = new URLSearchParams(location.hash.slice(1));
    state.q = p.get("q") || "";
    var sort = (p.get("sort") || "").split(":desc");
    state.sort = validSort(sort[0]) ? sort[0] : "";
    state.desc = state.sort !== "" && (p.get("sort") || "").slice(-5) === ":desc";
    state.page = Math.max(0, (parseInt(p.get("page"), 10) || 1) - 1);
    var rows = parseInt(p.get("rows"), 10);
    state.size = [25, 100, 500].indexOf(rows) >= 0 ? rows : 100;
    var m = p.get("scores");
    state.metric = m === "all" ? "" : D.metrics.some(function (x) { return x.name === m; }) ? m : defaultMetric;
    state.paged = p.get("paged") === "1";
  }

  function validSort(key) {
    if (key === "sample") return true;
    var m = /^(info|score):(\d+)$/.exec(key);
    return !!m && Number(m[2]) < (m[1] === "info" ? details.length : scores.length);
  }

  // ---------------------------------------------------------------------------------------------
  // controls

  // every metric of every head while that is a dozen columns or fewer; else the first metric (p max)
  var defaultMetric = scores.length <= 12 || !D.metrics.length ? "" : D.metrics[0].name;

  function init() {
    var select = $("index-metric");
    select.appendChild(el("option", { value: "" }, "all"));
    D.metrics.forEach(function (m) { select.appendChild(el("option", { value: m.name }, m.label)); });
    loadState();
    select.value = state.metric;
    $("index-search").value = state.q;
    $("index-paged").checked = state.paged;
    $("index-paged").disabled = !D.pages.length;
    $("index-size").value = String(state.size);

    var timer = 0;
    $("index-search").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        state.q = $("index-search").value;
        state.page = 0;
        update(true);
      }, N > 20000 ? 150 : 0);
    });
    $("index-paged").addEventListener("change", function () { state.paged = this.checked; state.page = 0; update(true); });
    select.addEventListener("change", function () { state.metric = this.value; update(false); });
    $("index-size").addEventListener("change", function () {
      var first = state.page * state.size;
      state.size = Number(this.value);
      state.page = Math.floor(first / state.size);
      update(false);
    });
    $("index-prev").addEventListener("click", function () { state.page--; update(false); });
    $("index-next").addEventListener("click", function () { state.page++; update(false); });
    $("index-table").addEventListener("click", function (e) {
      var b = e.target.closest && e.target.closest("button.sort");
      if (!b) return;
      var key = b.getAttribute("data-sort");
      state.desc = state.sort === key ? !state.desc : key.indexOf("score:") === 0; // scores: highest first
      state.sort = key;
      state.page = 0;
      update(true);
    });
    timings.parse = performance.now() - t0;
    update(true);
    timings.firstRender = performance.now();
    api.ready = true;
  }

  // for tests and the curious: what is shown, and how long it took (ms)
  var api = window.gaplessIndex = {
    ready: false,
    timings: timings,
    rows: function () { return Array.prototype.map.call(view.subarray(state.page * state.size, (state.page + 1) * state.size), function (r) { return D.samples[r]; }); },
    found: function () { return view.length; },
    total: N,
    state: function () { return JSON.parse(JSON.stringify(state)); },
    search: function (q) { state.q = q; state.page = 0; $("index-search").value = q; update(true); return timings.lastUpdate; },
    sortBy: function (key, desc) { state.sort = key; state.desc = !!desc; state.page = 0; update(true); return timings.lastUpdate; },
    page: function (n) { state.page = n; update(false); }
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
