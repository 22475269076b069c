// pipecomet live dashboard: reads /_pipecomet/dashboard/stream (SSE) and
// draws line charts on canvases.  No library; MIT like pipecomet.
(function () {
  "use strict";

  var WINDOW_S = 300;
  var PALETTE = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf",
                 "#ff9bce", "#e3b341", "#79c0ff", "#56d364"];
  var FIXED = { "2xx": "#3fb950", "3xx": "#79c0ff", "4xx": "#d29922", "5xx": "#f85149",
                "p50": "#3fb950", "p90": "#d29922", "p99": "#f85149" };

  var state = { snapshots: [], draws: 0, charts: {}, interval: 1, app: "" };
  window.pipecometDashboard = state;

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var m = v / p;
    var n = m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10;
    return n * p;
  }

  function fmt(v) {
    if (v === null || v === undefined || isNaN(v)) return "–";
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2);
    if (a === 0) return "0";
    return v.toPrecision(2);
  }

  function Chart(id, unit, pick, zero, log) {
    this.zero = !!zero; // a series missing from a snapshot is 0 (rates by code)
    this.log = !!log;   // a logarithmic y axis (latencies span decades)
    this.canvas = document.getElementById(id);
    this.unit = unit;
    this.pick = pick; // snapshot -> {series: value}
    this.colors = {};
    this.next = 0;
    state.charts[id.replace("chart-", "")] = this.info = { points: 0, max: 0, series: [], last: {} };
  }

  Chart.prototype.color = function (name) {
    if (!this.colors[name]) {
      this.colors[name] = FIXED[name] || PALETTE[this.next++ % PALETTE.length];
    }
    return this.colors[name];
  };

  function span(snaps) {
    // The x range: the data's age, at least a minute, at most WINDOW_S.
    if (snaps.length < 2) return 60;
    var age = snaps[snaps.length - 1].t - snaps[0].t;
    return Math.max(60, Math.min(WINDOW_S, Math.ceil(age / 60) * 60));
  }

  function timeLabel(s) {
    if (s === 0) return "now";
    return s % 60 === 0 ? "\u2212" + (s / 60) + " min" : "\u2212" + s + " s";
  }

  Chart.prototype.draw = function (snaps) {
    var c = this.canvas, dpr = window.devicePixelRatio || 1;
    var w = c.clientWidth, h = c.clientHeight;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    }
    var g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    var rows = snaps.map(this.pick), names = [], seen = {};
    rows.forEach(function (r) {
      Object.keys(r || {}).forEach(function (k) { if (!seen[k]) { seen[k] = 1; names.push(k); } });
    });
    var max = 0;
    rows.forEach(function (r) {
      names.forEach(function (k) { var v = r && r[k]; if (v > max) max = v; });
    });
    var step = niceMax(max / 4), top = step * Math.max(1, Math.ceil(max / step - 1e-9));
    var ticks = Math.round(top / step);
    var lo = 0, hi = 1, log = this.log;
    if (log) {
      // Decades from the smallest positive value to the largest.
      var min = Infinity;
      rows.forEach(function (r) {
        names.forEach(function (k) { var v = r && r[k]; if (v > 0 && v < min) min = v; });
      });
      lo = min === Infinity ? -1 : Math.floor(Math.log10(min));
      hi = Math.max(lo + 1, Math.ceil(Math.log10(max > 0 ? max : 1) + 1e-9));
      ticks = hi - lo;
    }
    function yOf(v) {
      if (!log) return T + ph - (ph * v) / top;
      var l = Math.log10(Math.max(v, Math.pow(10, lo)));
      return T + ph - (ph * (l - lo)) / (hi - lo);
    }
    var self = this, zero = this.zero;
    // Legend first: it may take more than one row.
    g.font = "11px system-ui, sans-serif";
    g.textAlign = "left"; g.textBaseline = "middle";
    var last = rows.length ? rows[rows.length - 1] : null;
    var lx = 8, ly = 9, items = [];
    names.forEach(function (name) {
      var lv = last ? last[name] : null;
      var label = name + "  " + fmt(zero && (lv === null || lv === undefined) ? 0 : lv);
      var width = g.measureText(label).width + 14;
      if (lx + width > w - 4 && lx > 8) { lx = 8; ly += 15; }
      items.push([name, label, lx, ly]);
      lx += width + 14;
    });
    var L = 44, R = 8, T = ly + 14, B = 18, pw = w - L - R, ph = h - T - B;
    var win = span(snaps);
    var now = snaps.length ? snaps[snaps.length - 1].t : 0;
    g.strokeStyle = "#26313d"; g.fillStyle = "#8a98a6"; g.lineWidth = 1;
    g.textAlign = "right";
    for (var i = 0; i <= ticks; i++) {
      var y = T + ph - (ph * i) / ticks;
      g.beginPath(); g.moveTo(L, Math.round(y) + 0.5); g.lineTo(L + pw, Math.round(y) + 0.5); g.stroke();
      g.fillText(log ? fmt(Math.pow(10, lo + i)) : fmt(step * i), L - 6, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    var step = win <= 60 ? 15 : win <= 120 ? 30 : 60;
    for (var sec = 0; sec <= win; sec += step) {
      var x = L + pw - (pw * sec) / win;
      g.fillText(timeLabel(sec), Math.max(L + 12, Math.min(L + pw - 10, x)), T + ph + 4);
    }
    if (!names.length) {
      g.fillStyle = "#8a98a6"; g.textBaseline = "middle";
      g.fillText(snaps.length ? "not configured in this app" : "waiting for data\u2026",
                 L + pw / 2, T + ph / 2);
    }
    g.save();
    g.beginPath(); g.rect(L, T - 2, pw, ph + 4); g.clip();
    names.forEach(function (name) {
      g.strokeStyle = self.color(name); g.lineWidth = 1.8; g.lineJoin = "round";
      g.beginPath();
      var started = false;
      snaps.forEach(function (s, j) {
        var v = rows[j] && rows[j][name];
        if ((v === null || v === undefined) && zero) v = 0;
        if (v === null || v === undefined) { started = false; return; }
        var x = L + pw - (pw * (now - s.t)) / win;
        var y = yOf(v);
        if (!started) { g.moveTo(x, y); started = true; } else { g.lineTo(x, y); }
      });
      g.stroke();
    });
    g.restore();
    g.textAlign = "left"; g.textBaseline = "middle";
    items.forEach(function (it) {
      g.fillStyle = self.color(it[0]); g.fillRect(it[2], it[3] - 1, 10, 3);
      g.fillStyle = "#d9e1e8"; g.fillText(it[1], it[2] + 14, it[3]);
    });
    this.info.points = snaps.length;
    this.info.max = max;
    this.info.series = names;
    this.info.last = last || {};
  };

  function sum(obj) {
    var t = 0;
    Object.keys(obj || {}).forEach(function (k) { t += obj[k] || 0; });
    return t;
  }

  var charts = [
    new Chart("chart-requests", "req/s", function (s) {
      var out = { total: s.rps };
      Object.keys(s.status_rps || {}).forEach(function (k) {
        if (s.status_rps[k] || k === "2xx") out[k] = s.status_rps[k];
      });
      return out;
    }),
    new Chart("chart-latency", "ms", function (s) {
      return s.latency_ms && s.latency_ms.p50 !== null ? s.latency_ms : {};
    }, false, true),
    new Chart("chart-errors", "err/s", function (s) { return s.errors_rps || {}; }, true),
    new Chart("chart-quota", "jobs", function (s) {
      var out = {};
      Object.keys(s.quota || {}).forEach(function (c) {
        out[c + " running"] = s.quota[c].running;
        out[c + " queued"] = s.quota[c].queued;
        if (s.quota[c].zombies) out[c + " zombies"] = s.quota[c].zombies;
      });
      return out;
    }),
    new Chart("chart-workers", "calls", function (s) {
      return s.workers ? { "calls/s": s.workers.calls_rps, busy: s.workers.busy,
                           "in flight": s.workers.in_flight, queued: s.workers.queued } : {};
    }),
    new Chart("chart-comet", "conn", function (s) {
      return s.comet ? s.comet.connections : {};
    }),
    new Chart("chart-backends", "calls/s", function (s) {
      var out = {};
      Object.keys(s.backends || {}).forEach(function (b) {
        out[b] = s.backends[b].calls_rps;
        if (s.backends[b].errors_rps) out[b + " errors"] = s.backends[b].errors_rps;
      });
      return out;
    }),
    new Chart("chart-reactor", "ms", function (s) {
      return s.lag_ms === null || s.lag_ms === undefined ? {} : { "worst lag": s.lag_ms };
    }),
  ];

  function tiles(s) {
    var st = s.status_rps || {};
    document.getElementById("tile-rps").textContent = fmt(s.rps);
    document.getElementById("tile-p99").textContent = fmt(s.latency_ms && s.latency_ms.p99);
    document.getElementById("tile-errors").textContent = fmt((st["4xx"] || 0) + (st["5xx"] || 0));
    document.getElementById("tile-inflight").textContent = fmt(s.in_flight);
    document.getElementById("tile-lag").textContent = fmt(s.lag_ms);
    document.getElementById("tile-comet").textContent = s.comet ? fmt(sum(s.comet.connections)) : "–";
    var d = new Date(s.t * 1000);
    document.getElementById("updated").textContent = "updated " + d.toLocaleTimeString();
  }

  function redraw() {
    var snaps = state.snapshots;
    if (snaps.length) {
      var cut = snaps[snaps.length - 1].t - WINDOW_S;
      while (snaps.length && snaps[0].t < cut) snaps.shift();
      tiles(snaps[snaps.length - 1]);
    }
    charts.forEach(function (c) { c.draw(snaps); });
    state.draws++;
  }

  function setState(text) {
    var el = document.getElementById("state");
    el.textContent = text;
    el.className = "state " + text;
  }

  var token = new URLSearchParams(location.search).get("token");
  var url = "/_pipecomet/dashboard/stream" + (token ? "?token=" + encodeURIComponent(token) : "");
  if (token) document.getElementById("metrics-link").style.display = "none";
  var source = new EventSource(url);
  source.onopen = function () { setState("open"); };
  source.onerror = function () { setState(source.readyState === 2 ? "closed" : "connecting"); };
  source.addEventListener("history", function (e) {
    var h = JSON.parse(e.data);
    state.interval = h.interval;
    if (h.app) { state.app = h.app; document.getElementById("app").textContent = h.app; }
    state.snapshots = h.snapshots || [];
    redraw();
  });
  source.addEventListener("snapshot", function (e) {
    state.snapshots.push(JSON.parse(e.data));
    redraw();
  });
  window.addEventListener("resize", redraw);
  redraw();
})();
