/* gapless heatmap viewer: a Deep Zoom slide with each head's heatmap drawn over it.
 *
 * Vanilla JavaScript, no libraries, no network: the page embeds its data as window.GAPLESS_SAMPLE
 * (written by pipeline/viewer.py) and loads the pyramid tiles and overlay PNGs by relative URLs, so it
 * works opened straight from disk (file://).
 *
 * Levels: the pyramid folder may hold only the levels up to PYR.maxLevel (a static export capped at a
 * µm/px); finer views show that level magnified. Served by `gapless view` (which sets
 * window.GAPLESS_SERVER), every level up to full resolution is asked for: the server cuts the missing
 * ones from the slide. Should it fail to, the viewer falls back to the levels on disk.
 *
 * Coordinates: "level-0 px" (X, Y) are slide pixels at full resolution, the frame of the heatmap JSON.
 * The view is a centre (cx, cy) in level-0 px and a scale in CSS px per level-0 px, shared by every
 * pane, so side-by-side views stay in sync. Each pane is one <canvas>, drawn in device pixels.
 */
(function () {
  "use strict";

  var DATA = window.GAPLESS_SAMPLE;
  if (!DATA) {
    return; // not a sample page (the index has its own script, index.js)
  }

  function clamp(v, lo, hi) { return Math.max(lo, Math.min(hi, v)); }

  var PYR = DATA.pyramid;
  var HEADS = DATA.heads;
  var W = PYR.width;
  var H = PYR.height;
  var T = PYR.tileSize;
  var OV = PYR.overlap;
  var MAX_PARALLEL = 6; // tile requests in flight
  var CACHE_LIMIT = 800; // decoded tiles kept
  var MAX_SCALE = 8; // CSS px per level-0 px at the deepest zoom
  var BG = "#2a2d31";
  var SLIDE_BG = "#d8d8d8";

  // Deep Zoom levels as OpenSlide's DeepZoomGenerator makes them: level 0 is 1×1, the last is full size.
  var dims = (function () {
    var w = W, h = H, list = [[w, h]];
    while (w > 1 || h > 1) {
      w = Math.max(1, Math.ceil(w / 2));
      h = Math.max(1, Math.ceil(h / 2));
      list.push([w, h]);
    }
    return list.reverse();
  })();
  var MAXL = dims.length - 1;
  // the finest level on disk; with `gapless view`, the finest one asked for is full resolution
  var WRITTEN = typeof PYR.maxLevel === "number" ? clamp(PYR.maxLevel, 0, MAXL) : MAXL;
  var SERVED = !!(window.GAPLESS_SERVER && window.GAPLESS_SERVER.tiles === "source");
  var finest = SERVED ? MAXL : WRITTEN;
  var baseLevel = 0; // the finest level that fits in one tile: always drawn first, under everything
  for (var l = 0; l <= WRITTEN; l++) {
    if (dims[l][0] <= T && dims[l][1] <= T) baseLevel = l;
  }

  // ---------------------------------------------------------------------------------------------
  // state

  var view = { cx: W / 2, cy: H / 2, scale: 0 };
  var opacity = 0.6;
  var lastOpacity = 0.6;
  var showAnnotations = true;
  var panes = [];
  var active = 0;
  var selected = null; // {x, y} level-0 px of the last click
  var cache = new Map(); // "level/col_row" -> {img, state, used}
  var wanted = [];
  var loading = 0;
  var frame = 0;
  var frameNo = 0;
  var rendered = false;
  var stats = { loaded: 0, failed: 0 };
  var overlays = HEADS.map(function () { return null; });
  var tileIndex = HEADS.map(function () { return null; });
  var annotations = prepareAnnotations(DATA.annotations || []);

  var $ = function (id) { return document.getElementById(id); };

  // ---------------------------------------------------------------------------------------------
  // small helpers

  function fmtNum(v) {
    if (v === null || v === undefined || !isFinite(v)) return "\u2013";
    var a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    return String(Number(v.toPrecision(3)));
  }

  function fmtP(p) {
    return p === null || p === undefined || !isFinite(p) ? "n/a" : p.toFixed(3);
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "class") e.className = attrs[k];
        else e.setAttribute(k, attrs[k]);
      });
    }
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  // [bar, ticks]: a bar of class `cls` showing the head's colormap and n tick labels from lo to hi
  function colourBar(head, cls, n) {
    var bar = el("div", { "class": cls });
    bar.style.background = "linear-gradient(to right, " + head.stops.join(", ") + ")";
    var ticks = el("div", { "class": "ticks" });
    var lo = head.range[0], hi = head.range[1];
    for (var i = 0; i < n; i++) ticks.appendChild(el("span", null, fmtNum(lo + (hi - lo) * i / (n - 1))));
    return [bar, ticks];
  }

  // the side-panel section `id`, emptied and titled
  function section(id, title) {
    var box = $(id);
    box.innerHTML = "";
    box.appendChild(el("h2", null, title));
    return box;
  }

  function fact(dl, k, v) {
    dl.appendChild(el("dt", null, k));
    dl.appendChild(el("dd", null, v));
  }

  function indexOfHead(name) {
    for (var i = 0; i < HEADS.length; i++) if (HEADS[i].name === name) return i;
    return -1;
  }

  function positiveClass(head) {
    var cls = head.classes || [];
    if (cls.indexOf("positive") >= 0) return "positive";
    return cls.length ? cls[cls.length - 1] : "positive";
  }

  function lengthLabel(um) {
    if (um >= 1000) return fmtNum(um / 1000) + " mm";
    return fmtNum(um) + " \u00b5m";
  }

  function dpr() { return window.devicePixelRatio || 1; }

  // ---------------------------------------------------------------------------------------------
  // tiles

  function tileUrl(level, col, row) {
    return PYR.url + level + "/" + col + "_" + row + "." + PYR.format;
  }

  function startLoad(w) {
    var img = new Image();
    var entry = { img: img, state: "loading", used: frameNo, level: w.level };
    cache.set(w.key, entry);
    loading++;
    function settle(state, counter) {
      return function () {
        entry.state = state;
        loading--;
        stats[counter]++;
        schedule();
        pump();
      };
    }
    img.onload = settle("ok", "loaded");
    img.onerror = function () {
      if (w.level > WRITTEN && finest > WRITTEN) {
        finest = WRITTEN; // the server could not cut it from the slide: show the levels on disk
        console.warn("gapless viewer: no tiles finer than level " + WRITTEN + " from the server; showing the pyramid's levels");
      }
      settle("error", "failed")();
    };
    img.src = tileUrl(w.level, w.col, w.row);
  }

  function pump() {
    while (loading < MAX_PARALLEL && wanted.length) {
      var w = wanted.shift();
      if (!cache.has(w.key)) startLoad(w);
    }
  }

  function evict() {
    if (cache.size <= CACHE_LIMIT) return;
    var entries = [];
    cache.forEach(function (e, k) {
      if (e.state !== "loading" && e.level !== baseLevel && e.used < frameNo) entries.push([e.used, k]);
    });
    entries.sort(function (a, b) { return a[0] - b[0]; });
    var drop = cache.size - Math.floor(CACHE_LIMIT * 0.8);
    for (var i = 0; i < entries.length && i < drop; i++) cache.delete(entries[i][1]);
  }

  function levelFor(s) {
    // the coarsest level with at least one level pixel per device pixel
    var ds = 1 / s; // level-0 px per device px
    var k = ds <= 1 ? 0 : Math.floor(Math.log2(ds) + 1e-9);
    return clamp(MAXL - k, baseLevel, finest);
  }

  // ---------------------------------------------------------------------------------------------
  // overlays and tile lookup

  function overlayFor(i) {
    if (overlays[i]) return overlays[i];
    var img = new Image();
    var o = { img: img, state: "loading" };
    overlays[i] = o;
    img.onload = function () { o.state = "ok"; schedule(); };
    img.onerror = function () {
      o.state = "error";
      console.warn("gapless viewer: cannot load the heatmap overlay " + HEADS[i].overlay);
      schedule();
    };
    img.src = HEADS[i].overlay;
    return o;
  }

  function indexFor(i) {
    if (tileIndex[i]) return tileIndex[i];
    var head = HEADS[i];
    var ext = head.tileExtent;
    var buckets = new Map();
    head.tiles.forEach(function (t, j) {
      var key = Math.floor(t[0] / ext) + "," + Math.floor(t[1] / ext);
      var b = buckets.get(key);
      if (!b) buckets.set(key, (b = []));
      b.push(j);
    });
    tileIndex[i] = buckets;
    return buckets;
  }

  // The tile of head i that contains (X, Y) (the one whose centre is nearest when tiles overlap), or null.
  function findTile(i, X, Y) {
    var head = HEADS[i];
    var ext = head.tileExtent;
    var buckets = indexFor(i);
    var bx = Math.floor(X / ext), by = Math.floor(Y / ext);
    var best = null, bestD = Infinity;
    for (var dy = -1; dy <= 0; dy++) {
      for (var dx = -1; dx <= 0; dx++) {
        var b = buckets.get((bx + dx) + "," + (by + dy));
        if (!b) continue;
        for (var k = 0; k < b.length; k++) {
          var t = head.tiles[b[k]];
          if (X >= t[0] && X < t[0] + ext && Y >= t[1] && Y < t[1] + ext) {
            var d = Math.pow(t[0] + ext / 2 - X, 2) + Math.pow(t[1] + ext / 2 - Y, 2);
            if (d < bestD) { bestD = d; best = t; }
          }
        }
      }
    }
    return best;
  }

  function prepareAnnotations(classes) {
    return classes.map(function (cls) {
      return {
        name: cls.name,
        colour: cls.colour,
        rings: cls.rings.map(function (r) {
          var x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
          for (var k = 0; k + 1 < r.length; k += 2) {
            x0 = Math.min(x0, r[k]); x1 = Math.max(x1, r[k]);
            y0 = Math.min(y0, r[k + 1]); y1 = Math.max(y1, r[k + 1]);
          }
          return { pts: r, x0: x0, y0: y0, x1: x1, y1: y1 };
        })
      };
    });
  }

  // ---------------------------------------------------------------------------------------------
  // drawing

  function schedule() {
    if (!frame) frame = requestAnimationFrame(renderAll);
  }

  function renderAll() {
    frame = 0;
    frameNo++;
    var want = [];
    var seen = new Set();
    panes.forEach(function (p) { renderPane(p, want, seen); });
    want.sort(function (a, b) { return a.pri - b.pri; });
    wanted = want;
    pump();
    evict();
    rendered = true;
    updateStatus();
  }

  function renderPane(p, want, seen) {
    var ctx = p.ctx;
    var cw = p.canvas.width, ch = p.canvas.height;
    var s = view.scale * dpr(); // device px per level-0 px
    var ox = cw / 2 - view.cx * s, oy = ch / 2 - view.cy * s; // device px of level-0 (0, 0)
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.globalAlpha = 1;
    ctx.fillStyle = BG;
    ctx.fillRect(0, 0, cw, ch);
    if (!(s > 0) || cw === 0 || ch === 0) return;

    var vis = {
      x0: Math.max(0, -ox / s), y0: Math.max(0, -oy / s),
      x1: Math.min(W, (cw - ox) / s), y1: Math.min(H, (ch - oy) / s)
    };
    if (vis.x1 > vis.x0 && vis.y1 > vis.y0) {
      var sx0 = Math.round(ox), sy0 = Math.round(oy);
      ctx.fillStyle = SLIDE_BG;
      ctx.fillRect(sx0, sy0, Math.round(ox + W * s) - sx0, Math.round(oy + H * s) - sy0);

      var target = levelFor(s);
      drawLevel(ctx, baseLevel, s, ox, oy, vis, want, seen);
      for (var lv = baseLevel + 1; lv < target; lv++) drawLevel(ctx, lv, s, ox, oy, vis, null, null);
      if (target > baseLevel) drawLevel(ctx, target, s, ox, oy, vis, want, seen);

      drawOverlay(p, ctx, s, ox, oy, vis);
      if (showAnnotations) drawAnnotations(ctx, s, ox, oy, vis);
    }
    drawSelection(p, ctx, s, ox, oy);
    updateScaleBar(p);
  }

  // draws the loaded tiles of `level` in view; with `want`, queues the missing ones there
  function drawLevel(ctx, level, s, ox, oy, vis, want, seen) {
    var d = Math.pow(2, MAXL - level);
    var lw = dims[level][0], lh = dims[level][1];
    var cols = Math.ceil(lw / T), rows = Math.ceil(lh / T);
    var c0 = clamp(Math.floor(vis.x0 / d / T), 0, cols - 1);
    var c1 = clamp(Math.floor((vis.x1 / d - 1e-9) / T), 0, cols - 1);
    var r0 = clamp(Math.floor(vis.y0 / d / T), 0, rows - 1);
    var r1 = clamp(Math.floor((vis.y1 / d - 1e-9) / T), 0, rows - 1);
    var ccx = (c0 + c1) / 2, ccy = (r0 + r1) / 2;
    for (var r = r0; r <= r1; r++) {
      for (var c = c0; c <= c1; c++) {
        var key = level + "/" + c + "_" + r;
        var e = cache.get(key);
        if (e && e.state === "ok") {
          e.used = frameNo;
          drawTile(ctx, e.img, level, c, r, d, lw, lh, s, ox, oy);
        } else if (!e && want && !seen.has(key)) {
          seen.add(key);
          // base tile first, then from the centre of the view outwards
          var pri = level === baseLevel ? -1 : Math.abs(c - ccx) + Math.abs(r - ccy);
          want.push({ key: key, level: level, col: c, row: r, pri: pri });
        }
      }
    }
  }

  function drawTile(ctx, img, level, c, r, d, lw, lh, s, ox, oy) {
    var srcX = c > 0 ? OV : 0, srcY = r > 0 ? OV : 0;
    var sw = Math.min(T, lw - c * T), sh = Math.min(T, lh - r * T);
    sw = Math.min(sw, img.naturalWidth - srcX);
    sh = Math.min(sh, img.naturalHeight - srcY);
    if (sw <= 0 || sh <= 0) return;
    var X0 = c * T * d, Y0 = r * T * d;
    var X1 = Math.min((c * T + sw) * d, W), Y1 = Math.min((r * T + sh) * d, H);
    // edges rounded to device pixels with the same formula for neighbours: no seams between tiles
    var x0 = Math.round(ox + X0 * s), x1 = Math.round(ox + X1 * s);
    var y0 = Math.round(oy + Y0 * s), y1 = Math.round(oy + Y1 * s);
    if (x1 <= x0 || y1 <= y0) return;
    ctx.drawImage(img, srcX, srcY, sw, sh, x0, y0, x1 - x0, y1 - y0);
  }

  function drawOverlay(p, ctx, s, ox, oy, vis) {
    var o = overlayFor(p.head);
    p.msg.hidden = o.state !== "error";
    if (o.state === "error") p.msg.textContent = "The heatmap image " + HEADS[p.head].overlay + " did not load.";
    if (opacity <= 0 || o.state !== "ok") return;
    var iw = o.img.naturalWidth, ih = o.img.naturalHeight;
    var fx = iw / W, fy = ih / H; // overlay px per level-0 px
    var ix0 = clamp(Math.floor(vis.x0 * fx), 0, iw), ix1 = clamp(Math.ceil(vis.x1 * fx), 0, iw);
    var iy0 = clamp(Math.floor(vis.y0 * fy), 0, ih), iy1 = clamp(Math.ceil(vis.y1 * fy), 0, ih);
    if (ix1 <= ix0 || iy1 <= iy0) return;
    var x0 = Math.round(ox + (ix0 / fx) * s), x1 = Math.round(ox + (ix1 / fx) * s);
    var y0 = Math.round(oy + (iy0 / fy) * s), y1 = Math.round(oy + (iy1 / fy) * s);
    if (x1 <= x0 || y1 <= y0) return;
    ctx.save();
    // magnified: crisp cells (one overlay pixel is a block of the map); shrunk: smooth
    ctx.imageSmoothingEnabled = s / fx < 1;
    ctx.globalAlpha = opacity;
    ctx.drawImage(o.img, ix0, iy0, ix1 - ix0, iy1 - iy0, x0, y0, x1 - x0, y1 - y0);
    ctx.restore();
  }

  function drawAnnotations(ctx, s, ox, oy, vis) {
    if (!annotations.length) return;
    var k = dpr();
    ctx.save();
    ctx.lineJoin = "round";
    annotations.forEach(function (cls) {
      var small = [];
      ctx.beginPath();
      cls.rings.forEach(function (r) {
        if (r.x1 < vis.x0 || r.x0 > vis.x1 || r.y1 < vis.y0 || r.y0 > vis.y1) return;
        if (Math.max(r.x1 - r.x0, r.y1 - r.y0) * s < 8 * k) {
          small.push(r); // too small to see its outline: a ring marker instead
          return;
        }
        var pts = r.pts;
        ctx.moveTo(ox + pts[0] * s, oy + pts[1] * s);
        for (var j = 2; j + 1 < pts.length; j += 2) ctx.lineTo(ox + pts[j] * s, oy + pts[j + 1] * s);
        if (pts.length > 4) ctx.closePath();
      });
      small.forEach(function (r) {
        var cx = ox + (r.x0 + r.x1) / 2 * s, cy = oy + (r.y0 + r.y1) / 2 * s;
        ctx.moveTo(cx + 4 * k, cy);
        ctx.arc(cx, cy, 4 * k, 0, 2 * Math.PI);
      });
      ctx.strokeStyle = "rgba(0,0,0,0.75)";
      ctx.lineWidth = 3 * k;
      ctx.stroke();
      ctx.strokeStyle = cls.colour;
      ctx.lineWidth = 1.4 * k;
      ctx.stroke();
    });
    ctx.restore();
  }

  function drawSelection(p, ctx, s, ox, oy) {
    if (!selected) { p.pop.hidden = true; return; }
    var t = findTile(p.head, selected.x, selected.y);
    var k = dpr();
    if (t) {
      var e = HEADS[p.head].tileExtent;
      var x0 = Math.round(ox + t[0] * s), y0 = Math.round(oy + t[1] * s);
      var w = Math.max(2, Math.round(e * s)), h = w;
      ctx.save();
      ctx.lineWidth = 3 * k;
      ctx.strokeStyle = "rgba(0,0,0,0.8)";
      ctx.strokeRect(x0 + 0.5, y0 + 0.5, w, h);
      ctx.lineWidth = 1.5 * k;
      ctx.strokeStyle = "#ffffff";
      ctx.strokeRect(x0 + 0.5, y0 + 0.5, w, h);
      ctx.restore();
    }
    var head = HEADS[p.head];
    p.pop.textContent = head.label + ": " + (t ? "P(" + positiveClass(head) + ") = " + fmtP(t[2]) : "no tile here");
    p.pop.hidden = false;
    var px = (ox + selected.x * s) / k, py = (oy + selected.y * s) / k;
    p.pop.style.left = Math.round(px) + "px";
    p.pop.style.top = Math.round(py) + "px";
    p.pop.classList.toggle("off", px < 0 || py < 0 || px > p.w || py > p.h);
    p.pop.classList.toggle("flip", px > p.w / 2); // keep it inside the view: left of the point on the right half
  }

  function updateScaleBar(p) {
    if (!DATA.mpp || !(view.scale > 0)) { p.scale.hidden = true; return; }
    var umPerCss = DATA.mpp / view.scale;
    var raw = 110 * umPerCss;
    var base = Math.pow(10, Math.floor(Math.log10(raw)));
    var m = raw / base;
    var len = (m >= 5 ? 5 : m >= 2 ? 2 : 1) * base;
    p.scale.hidden = false;
    p.scaleLine.style.width = Math.round(len / umPerCss) + "px";
    p.scaleText.textContent = lengthLabel(len);
  }

  function updateStatus() {
    var st = $("status");
    if (!st) return;
    var s = view.scale * dpr();
    var lv = levelFor(s);
    var text = "level " + lv + " of " + MAXL + (lv > WRITTEN ? " (cut from the slide)" : "") + " \u00b7 " + stats.loaded + " tiles loaded";
    if (lv === finest && finest < MAXL && s > Math.pow(2, finest - MAXL)) text += " \u00b7 magnified: finer levels were not exported";
    if (loading) text += ", " + loading + " loading";
    if (stats.failed) text += ", " + stats.failed + " failed";
    if (DATA.mpp) text += " \u00b7 1 screen px = " + fmtNum(DATA.mpp / view.scale) + " \u00b5m";
    st.textContent = text;
  }

  // ---------------------------------------------------------------------------------------------
  // view

  function fitScale() {
    var s = Infinity;
    panes.forEach(function (p) {
      if (p.w > 0 && p.h > 0) s = Math.min(s, p.w / W, p.h / H);
    });
    return isFinite(s) ? s * 0.95 : 1;
  }

  function minScale() { return Math.min(fitScale() * 0.5, MAX_SCALE); }

  function clampView() {
    view.scale = clamp(view.scale, minScale(), MAX_SCALE);
    view.cx = clamp(view.cx, 0, W);
    view.cy = clamp(view.cy, 0, H);
  }

  function panBy(dX, dY) {
    view.cx += dX;
    view.cy += dY;
    clampView();
    schedule();
  }

  function fit() {
    view.scale = fitScale();
    view.cx = W / 2;
    view.cy = H / 2;
    schedule();
  }

  function zoomAt(p, x, y, f) {
    var X = view.cx + (x - p.w / 2) / view.scale;
    var Y = view.cy + (y - p.h / 2) / view.scale;
    var ns = clamp(view.scale * f, minScale(), MAX_SCALE);
    view.cx = X - (x - p.w / 2) / ns;
    view.cy = Y - (y - p.h / 2) / ns;
    view.scale = ns;
    clampView();
    schedule();
  }

  function zoomCentre(f) {
    var p = panes[active] || panes[0];
    zoomAt(p, p.w / 2, p.h / 2, f);
  }

  // ---------------------------------------------------------------------------------------------
  // panes

  function buildPanes(heads) {
    var box = $("panes");
    box.innerHTML = "";
    panes = [];
    var n = heads.length;
    var cols = n <= 1 ? 1 : n === 2 ? 2 : Math.ceil(Math.sqrt(n));
    box.style.gridTemplateColumns = "repeat(" + cols + ", minmax(0, 1fr))";
    box.style.gridTemplateRows = "repeat(" + Math.ceil(n / cols) + ", minmax(0, 1fr))";
    heads.forEach(function (hi, i) {
      var div = el("div", { "class": "pane", id: "pane-" + i, "data-pane": String(i) });
      var canvas = el("canvas", { "aria-label": "slide and heatmap" });
      var label = el("div", { "class": "pane-label" });
      var sel = el("select", { "class": "pane-head", "aria-label": "head shown in this view" });
      HEADS.forEach(function (h, j) { sel.appendChild(el("option", { value: String(j) }, h.label)); });
      label.appendChild(sel);
      var legend = el("div", { "class": "pane-legend" });
      var scale = el("div", { "class": "scalebar" });
      var scaleLine = el("div", { "class": "scalebar-line" });
      var scaleText = el("span");
      scale.appendChild(scaleLine);
      scale.appendChild(scaleText);
      var pop = el("div", { "class": "pane-pop" });
      pop.hidden = true;
      var msg = el("div", { "class": "pane-msg" });
      msg.hidden = true;
      [canvas, label, legend, scale, pop, msg].forEach(function (c) { div.appendChild(c); });
      box.appendChild(div);
      var p = {
        index: i, el: div, canvas: canvas, ctx: canvas.getContext("2d"), select: sel, legend: legend,
        scale: scale, scaleLine: scaleLine, scaleText: scaleText, pop: pop, msg: msg, head: hi, w: 0, h: 0
      };
      sel.addEventListener("change", function () { setHead(p.index, Number(sel.value)); });
      attachPointer(p);
      panes.push(p);
    });
    active = Math.min(active, panes.length - 1);
    resize();
    panes.forEach(function (p) { showHead(p); });
    updateActive();
  }

  function resize() {
    var k = dpr();
    panes.forEach(function (p) {
      var r = p.el.getBoundingClientRect();
      p.w = r.width;
      p.h = r.height;
      var cw = Math.max(1, Math.round(r.width * k)), ch = Math.max(1, Math.round(r.height * k));
      if (p.canvas.width !== cw) p.canvas.width = cw;
      if (p.canvas.height !== ch) p.canvas.height = ch;
    });
    if (!(view.scale > 0)) fit();
    clampView();
    schedule();
  }

  function showHead(p) {
    var head = HEADS[p.head];
    p.select.value = String(p.head);
    p.el.setAttribute("data-head", head.name);
    p.legend.innerHTML = "";
    p.legend.appendChild(el("div", { "class": "legend-title" }, head.label + (head.normalisation ? " \u00b7 " + head.normalisation : "")));
    colourBar(head, "cbar", 3).forEach(function (e) { p.legend.appendChild(e); });
  }

  function setHead(paneIndex, headIndex) {
    var p = panes[paneIndex];
    if (!p || !(headIndex >= 0 && headIndex < HEADS.length)) return;
    p.head = headIndex;
    active = paneIndex;
    showHead(p);
    updateActive();
    renderTileInfo();
    schedule();
  }

  function setLayout(name) {
    var current = panes.length ? panes[active].head : 0;
    // a view showing the whole slide shows the whole slide in the new panes too
    var wasFit = panes.length && panes[0].el && Math.abs(view.scale / fitScale() - 1) < 0.02;
    var heads;
    if (name === "all" && HEADS.length > 1) {
      heads = HEADS.map(function (_, i) { return i; });
      active = current;
    } else if (name === "pair" && HEADS.length > 1) {
      heads = [current, (current + 1) % HEADS.length];
      active = 0;
    } else {
      name = "single";
      heads = [current];
      active = 0;
    }
    $("layout").value = name;
    document.body.setAttribute("data-layout", name);
    buildPanes(heads);
    if (wasFit) fit();
    renderTileInfo();
  }

  function updateActive() {
    panes.forEach(function (p) { p.el.classList.toggle("active", p.index === active && panes.length > 1); });
    var cur = panes[active] ? panes[active].head : 0;
    var buttons = $("head-switch").querySelectorAll("button");
    Array.prototype.forEach.call(buttons, function (b) {
      b.setAttribute("aria-pressed", Number(b.getAttribute("data-index")) === cur ? "true" : "false");
    });
    renderLegend(cur);
    renderScores(cur);
  }

  // ---------------------------------------------------------------------------------------------
  // pointer, wheel, keys

  function attachPointer(p) {
    var canvas = p.canvas;
    var pointers = new Map();
    var gesture = null;

    function local(ev) {
      var r = canvas.getBoundingClientRect();
      return { x: ev.clientX - r.left, y: ev.clientY - r.top };
    }

    canvas.addEventListener("pointerdown", function (ev) {
      if (ev.pointerType === "mouse" && ev.button !== 0) return;
      try { canvas.setPointerCapture(ev.pointerId); } catch (e) { /* synthetic events */ }
      pointers.set(ev.pointerId, local(ev));
      if (pointers.size === 1) gesture = { moved: 0 };
      else if (gesture) gesture.moved = Infinity; // a pinch is never a click
      if (active !== p.index) { active = p.index; updateActive(); }
      canvas.classList.add("dragging");
    });

    canvas.addEventListener("pointermove", function (ev) {
      if (!pointers.has(ev.pointerId)) return;
      var prev = pointers.get(ev.pointerId);
      var cur = local(ev);
      if (pointers.size === 1) {
        var dx = cur.x - prev.x, dy = cur.y - prev.y;
        if (gesture) gesture.moved += Math.abs(dx) + Math.abs(dy);
        panBy(-dx / view.scale, -dy / view.scale);
      } else if (pointers.size === 2) {
        var other = null;
        pointers.forEach(function (v, id) { if (id !== ev.pointerId) other = v; });
        var d0 = Math.hypot(prev.x - other.x, prev.y - other.y);
        var d1 = Math.hypot(cur.x - other.x, cur.y - other.y);
        if (d0 > 0) zoomAt(p, (cur.x + other.x) / 2, (cur.y + other.y) / 2, d1 / d0);
      }
      pointers.set(ev.pointerId, cur);
    });

    function end(ev) {
      if (!pointers.has(ev.pointerId)) return;
      pointers.delete(ev.pointerId);
      if (pointers.size === 0) {
        canvas.classList.remove("dragging");
        if (ev.type === "pointerup" && gesture && gesture.moved < 5) {
          var at = local(ev);
          select(p, at.x, at.y);
        }
        gesture = null;
      }
    }
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);

    canvas.addEventListener("wheel", function (ev) {
      ev.preventDefault();
      var dy = ev.deltaY * (ev.deltaMode === 1 ? 33 : ev.deltaMode === 2 ? 400 : 1);
      var at = local(ev);
      zoomAt(p, at.x, at.y, Math.pow(2, -clamp(dy, -600, 600) / 300));
    }, { passive: false });

    canvas.addEventListener("dblclick", function (ev) {
      ev.preventDefault();
      var at = local(ev);
      zoomAt(p, at.x, at.y, ev.shiftKey ? 0.5 : 2);
    });
  }

  function select(p, x, y) {
    var X = view.cx + (x - p.w / 2) / view.scale;
    var Y = view.cy + (y - p.h / 2) / view.scale;
    selected = X >= 0 && X < W && Y >= 0 && Y < H ? { x: X, y: Y } : null;
    renderTileInfo();
    schedule();
  }

  function onKey(ev) {
    var tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var p = panes[active] || panes[0];
    var step = 0.15 * Math.min(p.w, p.h) / view.scale;
    var k = ev.key;
    if (k === "+" || k === "=") zoomCentre(2);
    else if (k === "-" || k === "_") zoomCentre(0.5);
    else if (k === "0") fit();
    else if (k === "o" || k === "O") setOpacity(opacity > 0 ? 0 : lastOpacity || 0.6);
    else if (k === "ArrowLeft") panBy(-step, 0);
    else if (k === "ArrowRight") panBy(step, 0);
    else if (k === "ArrowUp") panBy(0, -step);
    else if (k === "ArrowDown") panBy(0, step);
    else if (/^[1-9]$/.test(k) && Number(k) <= HEADS.length) setHead(active, Number(k) - 1);
    else return;
    ev.preventDefault();
  }

  function setOpacity(v) {
    v = clamp(Number(v), 0, 1);
    if (!isFinite(v)) return;
    if (v > 0) lastOpacity = v;
    opacity = v;
    var input = $("opacity");
    var pct = Math.round(v * 100);
    if (Number(input.value) !== pct) input.value = String(pct);
    $("opacity-value").textContent = pct + "%";
    schedule();
  }

  // ---------------------------------------------------------------------------------------------
  // side panel

  function renderLegend(i) {
    var head = HEADS[i];
    var box = section("legend", head.label + " heatmap");
    if (head.description) box.appendChild(el("p", { "class": "muted" }, head.description));
    colourBar(head, "legend-bar", 5).forEach(function (e) { box.appendChild(e); });
    var dl = el("dl", { "class": "facts" });
    fact(dl, "normalisation", head.normalisation || "none");
    fact(dl, "colormap", head.colormap);
    fact(dl, "tiles", head.tiles.length + " of " + fmtNum(head.tileExtent) + " px" +
      (DATA.mpp ? " (" + lengthLabel(head.tileExtent * DATA.mpp) + ")" : ""));
    if (head.classes && head.classes.length) fact(dl, "classes", head.classes.join(", "));
    if (head.runId) fact(dl, "run", head.runId);
    Object.keys(head.scores || {}).forEach(function (k) { fact(dl, k.replace(/_/g, " "), fmtNum(head.scores[k])); });
    box.appendChild(dl);
  }

  function renderScores(cur) {
    var box = section("scores", "Heads");
    var metrics = [];
    HEADS.forEach(function (h) {
      Object.keys(h.scores || {}).forEach(function (k) { if (metrics.indexOf(k) < 0) metrics.push(k); });
    });
    var table = el("table", { "class": "scores" });
    var tr = el("tr");
    tr.appendChild(el("th", null, "head"));
    metrics.forEach(function (m) { tr.appendChild(el("th", null, m.replace(/_/g, " "))); });
    var thead = el("thead");
    thead.appendChild(tr);
    table.appendChild(thead);
    var tbody = el("tbody");
    HEADS.forEach(function (h, i) {
      var row = el("tr", { "class": i === cur ? "current" : "", title: "show " + h.label + " here" });
      var th = el("th", null, (i + 1) + " " + h.label);
      row.appendChild(th);
      metrics.forEach(function (m) { row.appendChild(el("td", { "class": "num" }, fmtNum((h.scores || {})[m]))); });
      row.addEventListener("click", function () { setHead(active, i); });
      tbody.appendChild(row);
    });
    table.appendChild(tbody);
    box.appendChild(table);
  }

  function renderTileInfo() {
    var box = section("tile-info", "Tile");
    if (!selected) {
      box.appendChild(el("p", { "class": "muted" }, "Click on the slide to see the tile under the pointer and each head's probability."));
      return;
    }
    var where = "at (" + Math.floor(selected.x) + ", " + Math.floor(selected.y) + ") level-0 px";
    if (DATA.mpp) where += " = (" + fmtNum(selected.x * DATA.mpp) + ", " + fmtNum(selected.y * DATA.mpp) + ") \u00b5m";
    box.appendChild(el("p", { "class": "muted" }, "Point " + where));
    var cur = panes[active] ? panes[active].head : 0;
    var t = findTile(cur, selected.x, selected.y);
    var head = HEADS[cur];
    var main = el("p", { id: "tile-probability", "class": "tile-p" });
    if (t) {
      main.appendChild(el("span", null, head.label + ": P(" + positiveClass(head) + ") = "));
      main.appendChild(el("b", null, fmtP(t[2])));
      main.appendChild(el("span", { "class": "muted" },
        " \u00b7 tile (" + fmtNum(t[0]) + ", " + fmtNum(t[1]) + "), " + fmtNum(head.tileExtent) + " px"));
    } else {
      main.textContent = head.label + ": no tile here (background, or not tiled)";
    }
    box.appendChild(main);
    if (HEADS.length > 1) {
      var table = el("table", { "class": "scores" });
      var hr = el("tr");
      hr.appendChild(el("th", null, "head"));
      hr.appendChild(el("th", null, "P(" + positiveClass(head) + ")"));
      table.appendChild(hr);
      HEADS.forEach(function (h, i) {
        var ti = findTile(i, selected.x, selected.y);
        var row = el("tr", { "class": i === cur ? "current" : "" });
        row.appendChild(el("th", null, h.label));
        row.appendChild(el("td", { "class": "num" }, ti ? fmtP(ti[2]) : "\u2013"));
        table.appendChild(row);
      });
      box.appendChild(table);
    }
  }

  function renderInfo() {
    var box = section("sample-info", "Sample");
    var dl = el("dl", { "class": "facts" });
    fact(dl, "id", DATA.sample);
    Object.keys(DATA.info || {}).forEach(function (k) { fact(dl, k, DATA.info[k]); });
    fact(dl, "size", W + " \u00d7 " + H + " px" + (DATA.mpp ? " (" + lengthLabel(W * DATA.mpp) + " \u00d7 " + lengthLabel(H * DATA.mpp) + ")" : ""));
    if (DATA.mpp) fact(dl, "pixel", fmtNum(DATA.mpp) + " \u00b5m");
    annotations.forEach(function (a) { fact(dl, "outlines", a.name + " (" + a.rings.length + ")"); });
    box.appendChild(dl);
  }

  // ---------------------------------------------------------------------------------------------
  // start

  function init() {
    var sw = $("head-switch");
    HEADS.forEach(function (h, i) {
      var b = el("button", { type: "button", "data-index": String(i), "data-head": h.name, title: h.description || h.label }, h.label);
      b.addEventListener("click", function () { setHead(active, i); });
      sw.appendChild(b);
    });
    var layoutSel = $("layout");
    if (HEADS.length < 2) layoutSel.disabled = true;
    layoutSel.addEventListener("change", function () { setLayout(layoutSel.value); });
    var op = $("opacity");
    op.addEventListener("input", function () { setOpacity(Number(op.value) / 100); });
    op.addEventListener("change", function () { setOpacity(Number(op.value) / 100); });
    opacity = lastOpacity = clamp(Number(op.value) / 100, 0, 1);
    $("zoom-in").addEventListener("click", function () { zoomCentre(2); });
    $("zoom-out").addEventListener("click", function () { zoomCentre(0.5); });
    $("zoom-fit").addEventListener("click", fit);
    if (annotations.length) {
      $("annotations-ctl").hidden = false;
      var cb = $("show-annotations");
      cb.addEventListener("change", function () { showAnnotations = cb.checked; schedule(); });
      showAnnotations = cb.checked;
    }
    document.addEventListener("keydown", onKey);
    window.addEventListener("resize", resize);
    if (window.ResizeObserver) new ResizeObserver(function () { resize(); }).observe($("panes"));

    // #head=saol&layout=all picks the first view
    var params = {};
    (location.hash || "").replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) params[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
    });
    panes = [{ head: Math.max(0, indexOfHead(params.head)) }];
    renderInfo();
    setLayout(params.layout || "single");
    setOpacity(opacity);
  }

  window.gaplessViewer = {
    data: DATA,
    view: view,
    heads: function () { return HEADS.map(function (h) { return h.name; }); },
    panes: function () { return panes.map(function (p) { return { head: HEADS[p.head].name, width: p.w, height: p.h }; }); },
    setHead: function (paneIndex, name) { setHead(paneIndex, indexOfHead(name)); },
    setLayout: setLayout,
    setOpacity: setOpacity,
    fit: fit,
    zoomBy: zoomCentre,
    // page (client) coordinates of a level-0 point in a pane, for clicking on it
    toClient: function (paneIndex, X, Y) {
      var p = panes[paneIndex];
      var r = p.canvas.getBoundingClientRect();
      return { x: r.left + p.w / 2 + (X - view.cx) * view.scale, y: r.top + p.h / 2 + (Y - view.cy) * view.scale };
    },
    // true once every visible tile and overlay has loaded (or failed) and has been drawn
    idle: function () {
      var overlaysDone = panes.every(function (p) { var o = overlays[p.head]; return o && o.state !== "loading"; });
      return rendered && frame === 0 && loading === 0 && wanted.length === 0 && overlaysDone;
    },
    stats: function () {
      var levels = {};
      cache.forEach(function (e) { if (e.state === "ok") levels[e.level] = (levels[e.level] || 0) + 1; });
      return {
        loaded: stats.loaded, failed: stats.failed, loading: loading, cached: cache.size,
        level: levelFor(view.scale * dpr()), maxLevel: MAXL, written: WRITTEN, finest: finest, served: SERVED,
        levels: levels
      };
    }
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
