// pipecomet live dashboard: reads /_pipecomet/dashboard/stream (SSE) and
// draws line charts on canvases.  No library; MIT like pipecomet.
(function () {
  "use strict";

  var WINDOW_S = 300;
  var MUTED = "#8a98a6", GRID = "#26313d", TEXT = "#d9e1e8";
  var PALETTE = ["#58a6ff", "#bc8cff", "#39c5cf", "#ff9bce", "#e3b341", "#79c0ff",
                 "#56d364", "#ffa657", "#d2a8ff", "#a5d6ff"];
  var FIXED = { total: "#58a6ff", "2xx": "#3fb950", "3xx": "#79c0ff", "4xx": "#d29922",
                "5xx": "#f85149", p50: "#3fb950", p90: "#d29922", p99: "#f85149",
                "calls/s": "#58a6ff", busy: "#3fb950", "in flight": "#bc8cff", queued: "#d29922",
                sse: "#58a6ff", ndjson: "#bc8cff", longpoll: "#39c5cf",
                published: "#58a6ff", delivered: "#3fb950", "worst lag": "#39c5cf" };

  var state = { snapshots: [], draws: 0, charts: {}, interval: 1, app: "", process: null };
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
    if (Number.isInteger(v)) return String(v);
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
    return String(parseFloat(v.toPrecision(2)));
  }

  // Milliseconds as [number, unit]: "850 ms", "1.25 s".
  function duration(ms) {
    if (ms === null || ms === undefined || isNaN(ms)) return ["–", "ms"];
    if (ms >= 1000) return [fmt(ms / 1000), "s"];
    return [fmt(ms), "ms"];
  }

  function durationLabel(ms) { var d = duration(ms); return d[0] + " " + d[1]; }

  function since(seconds) {
    if (!(seconds >= 0)) return "–";
    var s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24,
        m = Math.floor(s / 60) % 60;
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + (s % 60) + " s";
    return s + " s";
  }

  // A chart: pick(snapshot) -> {series: value}; options:
  //   zero: a series missing from a snapshot is 0 (rates by code)
  //   log: a logarithmic y axis (latencies span decades)
  //   hideIdle: series that stay 0 over the window are left out (named "idle")
  //   empty: what the chart says when there is nothing to draw
  //   label: a y-axis tick's text;  style: name -> {color, dash}
  function Chart(id, pick, opts) {
    opts = opts || {};
    this.canvas = document.getElementById(id);
    this.pick = pick;
    this.zero = !!opts.zero;
    this.log = !!opts.log;
    this.hideIdle = !!opts.hideIdle;
    this.stack = !!opts.stack;   // stacked areas: the top edge is the sum
    this.average = opts.average || 0;  // a moving average over that many snapshots
    this.integer = !!opts.integer;     // counts: no tick between whole numbers
    this.hover = null;           // the pointer's x over the canvas, or null
    this.empty = opts.empty || "not configured in this app";
    this.label = opts.label || fmt;
    this.value = opts.value || fmt;
    this.styleOf = opts.style || null;
    this.colors = {};
    this.next = 0;
    var self = this;
    this.canvas.addEventListener("mousemove", function (e) {
      self.hover = e.offsetX; self.draw(state.snapshots);
    });
    this.canvas.addEventListener("mouseleave", function () {
      self.hover = null; self.draw(state.snapshots);
    });
    state.charts[id.replace("chart-", "")] = this.info =
      { points: 0, max: 0, series: [], drawn: [], last: {}, hover: null };
  }

  Chart.prototype.color = function (name) {
    if (!this.colors[name]) {
      this.colors[name] = FIXED[name] || PALETTE[this.next++ % PALETTE.length];
    }
    return this.colors[name];
  };

  Chart.prototype.style = function (name) {
    return this.styleOf ? this.styleOf.call(this, name) : { color: this.color(name), dash: [] };
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
    var self = this, zero = this.zero;
    var c = this.canvas, dpr = window.devicePixelRatio || 1;
    var w = c.clientWidth, h = c.clientHeight;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    }
    var g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    var rows = snaps.map(this.pick), all = [], seen = {};
    rows.forEach(function (r) {
      Object.keys(r || {}).forEach(function (k) { if (!seen[k]) { seen[k] = 1; all.push(k); } });
    });
    if (this.average > 1) {
      var n = this.average, raw = rows;
      rows = raw.map(function (r, j) {
        var out = {}, from = Math.max(0, j - n + 1);
        all.forEach(function (k) {
          var t = 0;
          for (var i = from; i <= j; i++) t += (raw[i] && raw[i][k]) || 0;
          out[k] = Math.round(1000 * t / (j - from + 1)) / 1000;
        });
        return out;
      });
    }
    var names = all, idle = [];
    if (this.hideIdle) {
      names = all.filter(function (k) {
        return rows.some(function (r) { return r && r[k] > 0; });
      });
      idle = all.filter(function (k) { return names.indexOf(k) < 0; });
    }
    var max = 0, stack = this.stack;
    rows.forEach(function (r) {
      var total = 0;
      names.forEach(function (k) {
        var v = r && r[k];
        if (stack) { total += v > 0 ? v : 0; v = total; }
        if (v > max) max = v;
      });
    });
    var step = niceMax(max / 4);
    if (this.integer) step = Math.max(1, Math.round(step));
    var top = step * Math.max(1, Math.ceil(max / step - 1e-9));
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
    // Legend first (name and latest value): it may take more than one row.
    g.font = "11px system-ui, sans-serif";
    g.textAlign = "left"; g.textBaseline = "middle";
    var last = rows.length ? rows[rows.length - 1] : null;
    var L = 50, R = 10, B = 18, pw = w - L - R;
    var win = span(snaps);
    var now = snaps.length ? snaps[snaps.length - 1].t : 0;
    function xOf(s) { return L + pw - (pw * (now - s.t)) / win; }
    // Under the pointer: that second's values in the legend.
    var at = null, shown = last;
    if (this.hover !== null && snaps.length) {
      var best = Infinity;
      snaps.forEach(function (s, j) {
        var d = Math.abs(xOf(s) - self.hover);
        if (d < best) { best = d; at = j; }
      });
      shown = rows[at];
    }
    var lx = 4, ly = 8, items = [];
    function place(width) {
      if (lx + width > w - 4 && lx > 4) { lx = 4; ly += 15; }
      var at = [lx, ly];
      lx += width + 12;
      return at;
    }
    if (at !== null) {
      var when = new Date(snaps[at].t * 1000).toLocaleTimeString([], { hour12: false });
      items.push([null, when].concat(place(g.measureText(when).width - 6)));
    }
    names.forEach(function (name) {
      var lv = shown ? shown[name] : null;
      var label = name + "  " + self.value(zero && (lv === null || lv === undefined) ? 0 : lv);
      var at = place(g.measureText(label).width + 18);
      items.push([name, label, at[0], at[1]]);
    });
    var note = null;
    if (idle.length && names.length) {
      var text = "idle: " + idle.join(", ");
      note = [text].concat(place(g.measureText(text).width));
    }
    var T = ly + 14, ph = h - T - B;
    g.strokeStyle = GRID; g.fillStyle = MUTED; g.lineWidth = 1;
    g.textAlign = "right";
    for (var i = 0; i <= ticks; i++) {
      var y = T + ph - (ph * i) / ticks;
      g.beginPath(); g.moveTo(L, Math.round(y) + 0.5); g.lineTo(L + pw, Math.round(y) + 0.5); g.stroke();
      if (names.length) g.fillText(this.label(log ? Math.pow(10, lo + i) : step * i), L - 6, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    var every = win <= 60 ? 15 : win <= 120 ? 30 : 60;
    for (var sec = 0; sec <= win; sec += every) {
      var x = L + pw - (pw * sec) / win;
      g.fillText(timeLabel(sec), Math.max(L + 14, Math.min(L + pw - 12, x)), T + ph + 4);
    }
    if (!names.length) {
      g.fillStyle = MUTED; g.textBaseline = "middle"; g.font = "13px system-ui, sans-serif";
      g.fillText(snaps.length ? this.empty : "waiting for the first snapshot\u2026",
                 L + pw / 2, T + ph / 2 - (all.length ? 9 : 0));
      if (snaps.length && all.length) {
        // What is there but idle: a category or a service once each.
        var idleNames = [];
        all.forEach(function (k) {
          var b = k.replace(/ (running|queued|zombies|calls|errors)$/, "");
          if (idleNames.indexOf(b) < 0) idleNames.push(b);
        });
        g.font = "11px system-ui, sans-serif";
        g.fillText("idle: " + idleNames.join(", "), L + pw / 2, T + ph / 2 + 10);
      }
    }
    g.save();
    g.beginPath(); g.rect(L, T - 2, pw, ph + 4); g.clip();
    var base = snaps.map(function () { return 0; });
    names.forEach(function (name) {
      var st = self.style(name);
      if (stack) {
        var tops = snaps.map(function (s, j) {
          var v = rows[j] && rows[j][name];
          return base[j] + (v > 0 ? v : 0);
        });
        g.beginPath();
        snaps.forEach(function (s, j) { g[j ? "lineTo" : "moveTo"](xOf(s), yOf(tops[j])); });
        for (var j = snaps.length - 1; j >= 0; j--) g.lineTo(xOf(snaps[j]), yOf(base[j]));
        g.closePath();
        g.globalAlpha = 0.6; g.fillStyle = st.color; g.fill(); g.globalAlpha = 1;
        g.strokeStyle = st.color; g.lineWidth = 1; g.setLineDash([]);
        g.beginPath();
        snaps.forEach(function (s, j) { g[j ? "lineTo" : "moveTo"](xOf(s), yOf(tops[j])); });
        g.stroke();
        base = tops;
        return;
      }
      g.strokeStyle = st.color; g.lineWidth = 1.6; g.lineJoin = "round"; g.setLineDash(st.dash);
      g.beginPath();
      var started = false;
      snaps.forEach(function (s, j) {
        var v = rows[j] && rows[j][name];
        if ((v === null || v === undefined) && zero) v = 0;
        if (v === null || v === undefined) { started = false; return; }
        var x = xOf(s), y = yOf(v);
        if (!started) { g.moveTo(x, y); started = true; } else { g.lineTo(x, y); }
      });
      g.stroke();
    });
    if (at !== null) {
      var hx = Math.round(xOf(snaps[at])) + 0.5;
      g.setLineDash([]); g.strokeStyle = MUTED; g.lineWidth = 1;
      g.beginPath(); g.moveTo(hx, T); g.lineTo(hx, T + ph); g.stroke();
    }
    g.restore();
    g.setLineDash([]);
    g.textAlign = "left"; g.textBaseline = "middle"; g.font = "11px system-ui, sans-serif";
    items.forEach(function (it) {
      if (it[0] === null) { g.fillStyle = MUTED; g.fillText(it[1], it[2], it[3]); return; }
      var st = self.style(it[0]);
      g.strokeStyle = st.color; g.lineWidth = 2.5; g.setLineDash(st.dash.length ? [3, 2] : []);
      g.beginPath(); g.moveTo(it[2], it[3]); g.lineTo(it[2] + 12, it[3]); g.stroke();
      g.setLineDash([]);
      g.fillStyle = TEXT; g.fillText(it[1], it[2] + 16, it[3]);
    });
    if (note) { g.fillStyle = MUTED; g.fillText(note[0], note[1], note[2]); }
    this.info.points = snaps.length;
    this.info.max = max;
    this.info.series = all;
    this.info.drawn = names;
    this.info.last = last || {};
    this.info.hover = at !== null ? snaps[at].t : null;
  };

  function sum(obj) {
    var t = 0;
    Object.keys(obj || {}).forEach(function (k) { t += obj[k] || 0; });
    return t;
  }

  // Two series of one thing (a quota category, a backend service) share a
  // colour: the first solid, the second (queued, errors) dashed.
  function paired(suffix) {
    return function (name) {
      var dashed = name.slice(-suffix.length - 1) === " " + suffix;
      var base = name.replace(/ (running|queued|zombies|calls|errors)$/, "");
      return { color: this.color(base), dash: dashed ? [5, 3] : name.slice(-8) === " zombies" ? [1, 3] : [] };
    };
  }

  var charts = [
    new Chart("chart-requests", function (s) {
      var out = { total: s.rps };
      Object.keys(s.status_rps || {}).forEach(function (k) {
        if (s.status_rps[k] || k === "2xx") out[k] = s.status_rps[k];
      });
      return out;
    }, { zero: true, empty: "no requests yet" }),
    new Chart("chart-latency", function (s) {
      return s.latency_ms && s.latency_ms.p50 !== null ? s.latency_ms : {};
    }, { log: true, label: durationLabel, value: durationLabel,
         empty: "no requests answered in the window" }),
    new Chart("chart-errors", function (s) { return s.errors_rps || {}; },
              { zero: true, stack: true, average: 5, empty: "no error responses in the window" }),
    new Chart("chart-quota", function (s) {
      var out = {};
      Object.keys(s.quota || {}).forEach(function (c) {
        out[c + " running"] = s.quota[c].running;
        out[c + " queued"] = s.quota[c].queued;
        if (s.quota[c].zombies) out[c + " zombies"] = s.quota[c].zombies;
      });
      return out;
    }, { hideIdle: true, integer: true, style: paired("queued"),
         empty: "no thread-pipe jobs in the window" }),
    new Chart("chart-workers", function (s) {
      return s.workers ? { "calls/s": s.workers.calls_rps, busy: s.workers.busy,
                           "in flight": s.workers.in_flight, queued: s.workers.queued } : {};
    }, { empty: "no worker processes in this app" }),
    new Chart("chart-backends", function (s) {
      var out = {};
      Object.keys(s.backends || {}).forEach(function (b) {
        out[b + " calls"] = s.backends[b].calls_rps;
        out[b + " errors"] = s.backends[b].errors_rps;
      });
      return out;
    }, { hideIdle: true, style: paired("errors"), empty: "no backend calls in the window" }),
    new Chart("chart-comet", function (s) {
      return s.comet ? s.comet.connections : {};
    }, { integer: true, empty: "comet is not served by this app" }),
    new Chart("chart-messages", function (s) {
      return s.comet ? { published: s.comet.published_rps, delivered: s.comet.delivered_rps } : {};
    }, { empty: "comet is not served by this app" }),
    new Chart("chart-reactor", function (s) {
      return s.lag_ms === null || s.lag_ms === undefined ? {} : { "worst lag": s.lag_ms };
    }, { label: durationLabel, value: durationLabel, empty: "the lag probe is off" }),
  ];

  function tile(id, text, level) {
    document.getElementById(id).textContent = text;
    var box = document.getElementById(id + "-box");
    if (box) box.className = "tile" + (level ? " " + level : "");
  }

  function tiles(s) {
    var st = s.status_rps || {};
    var errors = (st["4xx"] || 0) + (st["5xx"] || 0);
    tile("tile-rps", fmt(s.rps), "");
    var p99 = duration(s.latency_ms && s.latency_ms.p99);
    tile("tile-p99", p99[0], "");
    document.getElementById("tile-p99-unit").textContent = p99[1];
    tile("tile-errors", fmt(errors), st["5xx"] ? "bad" : errors ? "warn" : "ok");
    document.getElementById("tile-errors-sub").textContent = s.rps > 0
      ? "4xx + 5xx, " + fmt(100 * errors / s.rps) + " % of requests" : "4xx + 5xx";
    tile("tile-inflight", fmt(s.in_flight), "");
    tile("tile-lag", fmt(s.lag_ms), s.lag_ms > 500 ? "bad" : s.lag_ms > 100 ? "warn" : "ok");
    tile("tile-comet", s.comet ? fmt(sum(s.comet.connections)) : "–", "");
    var d = new Date(s.t * 1000);
    document.getElementById("updated").textContent =
      "updated " + d.toLocaleTimeString([], { hour12: false });
    var p = state.process;
    if (p && p.started) document.getElementById("uptime").textContent = "up " + since(s.t - p.started);
    if (s.workers) {
      document.getElementById("workers-sub").textContent =
        "calls/s · busy of " + s.workers.size + " workers · calls in flight, queued";
    }
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

  function showProcess(p) {
    state.process = p;
    if (!p) return;
    document.getElementById("proc").textContent =
      "pid " + p.pid + " on " + p.host + " · pipecomet " + p.version + " · Twisted " +
      p.twisted + " · Python " + p.python;
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
    if (h.app) {
      state.app = h.app;
      document.getElementById("app").textContent = h.app;
      document.title = h.app + " · pipecomet dashboard";
    }
    showProcess(h.process || null);
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
