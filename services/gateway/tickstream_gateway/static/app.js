// tickstream dashboard: live price/volume charts, rank tables and alerts over one WebSocket.

const WINDOW_MS = 24 * 60 * 60 * 1000;
const MAX_ALERTS = 200;
const METRICS_POLL_MS = 5000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const STABLE_AFTER_MS = 10000; // a socket that lived this long earns a fresh 1 s backoff
const PING_EVERY_MS = 20000;
const SILENCE_LIMIT_MS = 45000; // no frame (not even a pong) for this long: the socket is dead
const TOAST_MS = 6000;
const FRESH_MS = 3000;
const KINDS = ['price', 'volume'];

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const els = {
  select: byTestId('market-select'),
  status: byTestId('status'),
  lastTick: byTestId('last-tick-time'),
  priceChart: byTestId('price-chart'),
  volumeChart: byTestId('volume-chart'),
  alerts: byTestId('alerts'),
  toasts: byTestId('toasts'),
};

// ---------------------------------------------------------------- formatting

const numberFormats = new Map();
function numberFormat(options) {
  // Intl formatters are slow to build and the tables re-render often, so cache them.
  const key = JSON.stringify(options);
  if (!numberFormats.has(key)) numberFormats.set(key, new Intl.NumberFormat('en-US', options));
  return numberFormats.get(key);
}

/** A number to `digits` significant digits, keeping every integer digit of large values. */
function fmtSig(value, digits = 4) {
  if (value === null || value === undefined || value === '') return '—';
  const x = Number(value);
  if (!Number.isFinite(x)) return '—';
  const abs = Math.abs(x);
  if (abs !== 0 && (abs < 1e-4 || abs >= 1e12)) return x.toExponential(digits - 1);
  if (abs >= 10 ** digits) return numberFormat({ maximumFractionDigits: 0 }).format(x);
  return numberFormat({ maximumSignificantDigits: digits }).format(x);
}

const fmtCount = (value) => (Number.isFinite(Number(value)) ? numberFormat({}).format(Number(value)) : '—');
const fmtRatio = (ratio) => `${fmtSig(ratio, 3)}x`;

/** Slice of the ISO form of an epoch-ms time; always UTC because toISOString is. */
function fmtUtc(ms, from, to) {
  const date = new Date(Number(ms));
  return Number.isNaN(date.getTime()) ? '—' : date.toISOString().slice(from, to);
}
const fmtHHMM = (ms) => fmtUtc(ms, 11, 16);
const fmtHHMMSS = (ms) => fmtUtc(ms, 11, 19);
const fmtDateTime = (ms) => (ms == null ? '—' : `${fmtUtc(ms, 0, 19).replace('T', ' ')} UTC`);

/** "binance:btc-usdt:price" -> "binance:btc-usdt". */
const marketOf = (metric) => String(metric).slice(0, String(metric).lastIndexOf(':'));

// ---------------------------------------------------------------- tick series

/** One market's ticks in event-time order; a head index makes dropping old points cheap. */
class Series {
  constructor() { this.clear(); }

  clear() {
    this.ts = [];
    this.price = [];
    this.volume = [];
    this.start = 0;
  }

  get size() { return this.ts.length - this.start; }

  get lastTs() { return this.size > 0 ? this.ts[this.ts.length - 1] : null; }

  replace(ticks) {
    this.clear();
    for (const tick of ticks) this.add(tick);
  }

  /** Adds one tick; returns false when it is malformed or already older than the window. */
  add(tick) {
    const ts = Number(tick.ts);
    const price = Number(tick.price);
    const volume = Number(tick.volume);
    if (!Number.isFinite(ts) || !Number.isFinite(price)) return false;
    const vol = Number.isFinite(volume) ? volume : 0;
    const last = this.lastTs;
    if (last === null || ts >= last) {
      this.ts.push(ts);
      this.price.push(price);
      this.volume.push(vol);
    } else {
      // Exchanges occasionally deliver out of order; insert so the line never zigzags in time.
      if (ts < last - WINDOW_MS) return false;
      const at = this._firstAfter(ts);
      this.ts.splice(at, 0, ts);
      this.price.splice(at, 0, price);
      this.volume.splice(at, 0, vol);
    }
    this._trim();
    return true;
  }

  _firstAfter(ts) {
    let lo = this.start;
    let hi = this.ts.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.ts[mid] <= ts) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  _trim() {
    const cutoff = this.lastTs - WINDOW_MS;
    while (this.start < this.ts.length && this.ts[this.start] < cutoff) this.start += 1;
    // Compact only now and then: splicing the arrays' fronts on every tick would be O(n) each.
    if (this.start > 1024 && this.start * 2 > this.ts.length) {
      for (const arr of [this.ts, this.price, this.volume]) arr.splice(0, this.start);
      this.start = 0;
    }
  }
}

// ---------------------------------------------------------------- state

const state = {
  markets: [],
  selected: null,
  awaitingHistory: false, // ticks before the market's history would be overwritten by it anyway
  series: new Series(),
  metrics: new Map(), // metric id -> stats from /api/metrics, patched by ranks pushes
  ranks: { price: null, volume: null },
  alerts: [], // newest first
  alertIds: new Set(),
  freshAlerts: new Set(),
};

// ---------------------------------------------------------------- rendering (coalesced per frame)

const dirty = new Set();
let frameRequested = false;

function markDirty(...parts) {
  for (const part of parts) dirty.add(part);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(renderFrame);
  }
}

function renderFrame() {
  frameRequested = false;
  const parts = [...dirty];
  dirty.clear();
  for (const part of parts) {
    try {
      renderers[part]();
    } catch (err) {
      console.error(`rendering ${part} failed`, err);
    }
  }
}

const renderers = {
  charts: renderCharts,
  ranks: () => KINDS.forEach(renderRanks),
  stats: renderStats,
  alerts: renderAlerts,
};

function setStatus(status, detail = '') {
  els.status.dataset.state = status;
  els.status.querySelector('.status-text').textContent = status;
  els.status.title = detail;
}

function toast(text, level = 'error') {
  // The same message twice at once is noise (e.g. a poll failing every 5 s).
  for (const el of els.toasts.children) if (el.dataset.text === text) return;
  const el = document.createElement('div');
  el.className = `toast toast--${level}`;
  el.textContent = text;
  el.dataset.text = text;
  el.title = 'click to dismiss';
  el.addEventListener('click', () => el.remove());
  els.toasts.append(el);
  while (els.toasts.children.length > 3) els.toasts.firstElementChild.remove();
  setTimeout(() => el.remove(), TOAST_MS);
}

let axisWidth = 0; // shared left margin so the two charts' time axes line up

function renderCharts() {
  const { series } = state;
  const needed = Math.max(
    drawChart(els.priceChart, series, series.price, { kind: 'line', zeroBased: false }, axisWidth),
    drawChart(els.volumeChart, series, series.volume, { kind: 'bars', zeroBased: true }, axisWidth),
  );
  if (needed !== axisWidth) {
    axisWidth = needed;
    markDirty('charts'); // one more frame, now with both charts on the same margin
  }
  els.lastTick.textContent = fmtDateTime(series.lastTs);
  els.lastTick.dateTime = series.lastTs === null ? '' : new Date(series.lastTs).toISOString();
  document.body.dataset.ticks = String(series.size);
}

function statItem(key, value, className = '') {
  const span = document.createElement('span');
  span.className = `stat ${className}`.trim();
  const k = document.createElement('span');
  k.className = 'stat-key';
  k.textContent = key;
  span.append(k, value);
  return span;
}

function renderStats() {
  for (const kind of KINDS) {
    const row = byTestId(`stats-${kind}`);
    const m = state.selected ? state.metrics.get(`${state.selected}:${kind}`) : undefined;
    const label = document.createElement('span');
    label.className = 'stats-kind';
    label.textContent = kind;
    if (!m) {
      row.replaceChildren(label, statItem('', 'no stats yet'));
      continue;
    }
    const rank = m.rank ?? (m.position ? `${m.position}/${m.total}` : '—');
    row.replaceChildren(
      label,
      statItem('count', fmtCount(m.count)),
      statItem('mean', fmtSig(m.mean, 6)),
      statItem('std', fmtSig(m.std)),
      statItem('min', fmtSig(m.min, 6)),
      statItem('max', fmtSig(m.max, 6)),
      statItem('rank', rank, 'stat-rank'),
    );
  }
}

function cell(text, className = '') {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderRanks(kind) {
  const tbody = byTestId(`ranks-${kind}`).tBodies[0];
  const rows = state.ranks[kind] ?? [];
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement('tr');
    tr.dataset.metric = r.metric;
    if (marketOf(r.metric) === state.selected) {
      tr.classList.add('selected');
      tr.setAttribute('aria-current', 'true');
    }
    tr.append(cell(r.label ?? `${r.position}/${r.total}`, 'num'), cell(r.metric, 'metric'), cell(fmtSig(r.std), 'num'));
    tr.title = `mean ${fmtSig(r.mean, 6)} · count ${fmtCount(r.count)}`;
    frag.append(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = cell(state.ranks[kind] === null ? 'loading…' : 'no metrics yet');
    td.colSpan = 3;
    tr.append(td);
    frag.append(tr);
  }
  tbody.replaceChildren(frag);
}

function alertRow(alert) {
  const li = document.createElement('li');
  li.className = 'alert';
  li.dataset.alertId = alert.alert_id;
  li.dataset.metric = alert.metric;
  const time = document.createElement('time');
  time.className = 'alert-time';
  time.textContent = fmtHHMMSS(alert.exchange_ts);
  time.title = fmtDateTime(alert.exchange_ts);
  const metric = document.createElement('span');
  metric.className = 'alert-metric';
  metric.textContent = alert.metric;
  const detail = document.createElement('span');
  detail.className = 'alert-detail';
  detail.textContent = `value ${fmtSig(alert.value, 6)} · mean ${fmtSig(alert.mean, 6)}`;
  const ratio = document.createElement('span');
  ratio.className = 'alert-ratio';
  ratio.textContent = fmtRatio(alert.ratio);
  if (Number.isFinite(alert.window_seconds)) {
    ratio.title = `threshold ${fmtSig(alert.factor, 3)}x the ${Math.round(alert.window_seconds / 60)} min mean`;
  }
  li.append(time, metric, detail, ratio);
  if (state.freshAlerts.delete(alert.alert_id)) {
    li.classList.add('fresh');
    setTimeout(() => li.classList.remove('fresh'), FRESH_MS);
  }
  return li;
}

function renderAlerts() {
  // Keyed update: existing rows stay in place so only new ones flash.
  const list = els.alerts;
  const existing = new Map([...list.children].map((el) => [el.dataset.alertId, el]));
  const keep = new Set(state.alerts.map((a) => a.alert_id));
  for (const [id, el] of existing) if (!keep.has(id)) el.remove();
  let cursor = list.firstElementChild;
  for (const alert of state.alerts) {
    const el = existing.get(alert.alert_id) ?? alertRow(alert);
    if (el === cursor) cursor = cursor.nextElementSibling;
    else list.insertBefore(el, cursor);
  }
  document.body.dataset.alerts = String(list.children.length);
}

// ---------------------------------------------------------------- charts

let palette = null;
function readPalette() {
  // Colours live in style.css so the theme is defined in one place.
  const css = getComputedStyle(document.documentElement);
  const v = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  return {
    line: v('--chart-line', '#4cc9f0'),
    bar: v('--chart-bar', '#7c8cf8'),
    grid: v('--chart-grid', 'rgba(139,148,158,0.18)'),
    text: v('--chart-text', '#8b949e'),
  };
}

/** Sizes the backing store to CSS size x devicePixelRatio so lines stay crisp. */
function prepareCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  const pw = Math.max(1, Math.round(w * dpr));
  const ph = Math.max(1, Math.round(h * dpr));
  if (canvas.width !== pw || canvas.height !== ph) {
    canvas.width = pw;
    canvas.height = ph;
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = '11px system-ui, sans-serif';
  return { ctx, w, h };
}

/** Round-number ticks covering [lo, hi], about `target` of them. */
function niceTicks(lo, hi, target) {
  const raw = (hi - lo) / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const first = Math.floor(lo / step);
  const last = Math.ceil(hi / step);
  const ticks = [];
  for (let i = first; i <= last; i += 1) ticks.push(i * step);
  return { step, ticks, lo: first * step, hi: last * step };
}

function axisFormatter(step) {
  if (step >= 1e5) return (v) => numberFormat({ notation: 'compact', maximumSignificantDigits: 4 }).format(v);
  const decimals = Math.max(0, -Math.floor(Math.log10(step)));
  const fmt = numberFormat({ minimumFractionDigits: decimals, maximumFractionDigits: decimals });
  return (v) => fmt.format(v);
}

const TIME_STEPS_S = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200];
function timeTicks(t0, t1, width) {
  const maxTicks = Math.max(2, Math.floor(width / 70));
  const steps = TIME_STEPS_S.map((s) => s * 1000);
  const step = steps.find((s) => (t1 - t0) / s <= maxTicks) ?? steps[steps.length - 1];
  const ticks = [];
  // Multiples of the step since the epoch fall on round UTC times.
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return { ticks, label: step < 60000 ? fmtHHMMSS : fmtHHMM };
}

function valueRange(values, start, zeroBased) {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = start; i < values.length; i += 1) {
    if (values[i] < lo) lo = values[i];
    if (values[i] > hi) hi = values[i];
  }
  if (zeroBased) lo = Math.min(0, lo);
  if (hi === lo) return [lo - (Math.abs(lo) * 0.001 || 1), hi + (Math.abs(hi) * 0.001 || 1)];
  const pad = zeroBased ? 0 : (hi - lo) * 0.03;
  return [lo - pad, hi + pad];
}

/** Draws one chart with at least `minPadLeft` px for y labels; returns the width its labels need. */
function drawChart(canvas, series, values, opts, minPadLeft) {
  if (!palette) palette = readPalette();
  const { ctx, w, h } = prepareCanvas(canvas);
  if (series.size === 0) {
    ctx.fillStyle = palette.text;
    ctx.textAlign = 'center';
    ctx.textBaseline = 'middle';
    const message = !state.selected ? 'no market selected' : state.awaitingHistory ? 'waiting for history…' : 'no ticks in the last 24 h';
    ctx.fillText(message, w / 2, h / 2);
    return 0;
  }
  const t1 = series.lastTs;
  // A minute of span at least, so a lone point still gets an axis.
  const t0 = Math.min(series.ts[series.start], t1 - 60000);
  const [lo, hi] = valueRange(values, series.start, opts.zeroBased);
  const y = niceTicks(lo, hi, Math.max(2, Math.floor(h / 45)));
  const label = axisFormatter(y.step);
  const labels = y.ticks.map(label);
  const needed = Math.ceil(Math.max(...labels.map((s) => ctx.measureText(s).width))) + 10;
  const padLeft = Math.max(needed, minPadLeft);
  const plot = { x: padLeft, y: 6, w: w - padLeft - 10, h: h - 6 - 20 };
  if (plot.w < 20 || plot.h < 20) return needed;
  const xOf = (t) => plot.x + ((t - t0) / (t1 - t0)) * plot.w;
  const yOf = (v) => plot.y + plot.h - ((v - y.lo) / (y.hi - y.lo)) * plot.h;
  drawAxes(ctx, plot, y.ticks, labels, yOf, timeTicks(t0, t1, plot.w), xOf);
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.x, plot.y, plot.w, plot.h);
  ctx.clip();
  if (opts.kind === 'line') drawLine(ctx, series, values, xOf, yOf);
  else drawBars(ctx, series, values, xOf, yOf, plot, { t0, t1, base: yOf(Math.max(0, y.lo)) });
  ctx.restore();
  return needed;
}

function drawAxes(ctx, plot, yTicks, yLabels, yOf, time, xOf) {
  ctx.strokeStyle = palette.grid;
  ctx.fillStyle = palette.text;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  yTicks.forEach((v, i) => {
    const py = Math.round(yOf(v)) + 0.5;
    ctx.moveTo(plot.x, py);
    ctx.lineTo(plot.x + plot.w, py);
    ctx.fillText(yLabels[i], plot.x - 6, py);
  });
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (const t of time.ticks) {
    const px = Math.round(xOf(t)) + 0.5;
    ctx.moveTo(px, plot.y);
    ctx.lineTo(px, plot.y + plot.h);
    const text = time.label(t);
    const half = ctx.measureText(text).width / 2;
    // Keep edge labels inside the canvas rather than half cut off.
    ctx.fillText(text, Math.min(Math.max(px, plot.x + half), plot.x + plot.w - half), plot.y + plot.h + 5);
  }
  ctx.stroke();
}

function drawLine(ctx, series, values, xOf, yOf) {
  const { ts, start } = series;
  ctx.strokeStyle = palette.line;
  ctx.fillStyle = palette.line;
  ctx.lineWidth = 1.5;
  ctx.lineJoin = 'round';
  if (series.size === 1) {
    ctx.beginPath();
    ctx.arc(xOf(ts[start]), yOf(values[start]), 3, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(xOf(ts[start]), yOf(values[start]));
  if (series.size <= 2 * (ctx.canvas.clientWidth || 1)) {
    for (let i = start + 1; i < ts.length; i += 1) ctx.lineTo(xOf(ts[i]), yOf(values[i]));
    ctx.stroke();
    return;
  }
  // Per pixel column draw first/min/max/last only: the same picture at a bounded cost for 86k points.
  let col = null;
  let first = 0;
  let min = 0;
  let max = 0;
  let last = 0;
  const emit = () => {
    if (col === null) return;
    if (first === min && min === max) ctx.lineTo(col, yOf(first));
    else for (const v of [first, min, max, last]) ctx.lineTo(col, yOf(v));
  };
  for (let i = start; i < ts.length; i += 1) {
    const x = Math.round(xOf(ts[i]));
    const v = values[i];
    if (x !== col) {
      emit();
      col = x;
      first = min = max = last = v;
    } else {
      if (v < min) min = v;
      if (v > max) max = v;
      last = v;
    }
  }
  emit();
  ctx.stroke();
}

function drawBars(ctx, series, values, xOf, yOf, plot, { t0, t1, base }) {
  const { ts, start } = series;
  const n = series.size;
  const barPx = 3;
  const cols = Math.max(1, Math.floor(plot.w / barPx));
  ctx.fillStyle = palette.bar;
  if (n <= cols) {
    const width = Math.min(Math.max((plot.w / n) * 0.7, 1), 10);
    for (let i = start; i < ts.length; i += 1) {
      const top = yOf(values[i]);
      ctx.fillRect(xOf(ts[i]) - width / 2, Math.min(top, base), width, Math.abs(base - top));
    }
    return;
  }
  // Too many ticks for one bar each: show the largest per column so spikes stay visible.
  const peaks = new Float64Array(cols);
  for (let i = start; i < ts.length; i += 1) {
    const c = Math.min(cols - 1, Math.floor(((ts[i] - t0) / (t1 - t0)) * cols));
    if (values[i] > peaks[c]) peaks[c] = values[i];
  }
  for (let c = 0; c < cols; c += 1) {
    if (peaks[c] <= 0) continue;
    const top = yOf(peaks[c]);
    ctx.fillRect(plot.x + c * barPx, top, barPx - 1, base - top);
  }
}

// ---------------------------------------------------------------- WebSocket connection

const conn = {
  ws: null,
  everOpened: false,
  openedAt: 0,
  lastFrameAt: 0,
  delay: BACKOFF_MIN_MS,
  retryTimer: 0,
  subs: new Map(), // what to (re-)subscribe on every open, keyed by channel and target
};

const subKey = (sub) => `${sub.channel}|${sub.market ?? sub.kind ?? ''}`;

function send(frame) {
  if (conn.ws && conn.ws.readyState === WebSocket.OPEN) conn.ws.send(JSON.stringify(frame));
}

function subscribe(sub) {
  conn.subs.set(subKey(sub), sub);
  send({ op: 'subscribe', ...sub });
}

function unsubscribe(sub) {
  if (conn.subs.delete(subKey(sub))) send({ op: 'unsubscribe', ...sub });
}

function connect() {
  clearTimeout(conn.retryTimer);
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  let ws;
  try {
    ws = new WebSocket(`${scheme}//${location.host}/ws`);
  } catch (err) {
    console.error('cannot open WebSocket', err);
    scheduleReconnect();
    return;
  }
  conn.ws = ws;
  ws.onopen = () => onOpen(ws);
  ws.onmessage = (event) => {
    conn.lastFrameAt = Date.now();
    handleFrame(event.data);
  };
  ws.onclose = (event) => {
    if (conn.ws !== ws) return; // a socket we already gave up on
    conn.ws = null;
    if (event.code === 1013) toast('Fell behind the live stream; reconnecting', 'warn');
    scheduleReconnect();
  };
  ws.onerror = () => {}; // a close event always follows; reconnecting happens there
}

function onOpen(ws) {
  const reconnected = conn.everOpened;
  conn.everOpened = true;
  conn.openedAt = conn.lastFrameAt = Date.now();
  setStatus('connected');
  // The server forgot us: ask again for everything; the market's history replaces the chart.
  if (state.selected) state.awaitingHistory = true;
  for (const sub of conn.subs.values()) ws.send(JSON.stringify({ op: 'subscribe', ...sub }));
  if (reconnected) loadAlerts(); // pick up alerts raised while we were away
}

function scheduleReconnect() {
  if (conn.openedAt && Date.now() - conn.openedAt >= STABLE_AFTER_MS) conn.delay = BACKOFF_MIN_MS;
  conn.openedAt = 0;
  const delay = conn.delay;
  conn.delay = Math.min(conn.delay * 2, BACKOFF_MAX_MS);
  setStatus('reconnecting', `next attempt in ${Math.round(delay / 1000)} s`);
  clearTimeout(conn.retryTimer);
  conn.retryTimer = setTimeout(connect, delay);
}

function heartbeat() {
  const ws = conn.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (Date.now() - conn.lastFrameAt > SILENCE_LIMIT_MS) {
    // A half-open TCP connection never fires close on its own; drop it and start over.
    conn.ws = null;
    ws.close();
    scheduleReconnect();
    return;
  }
  send({ op: 'ping' });
}

const frameHandlers = {
  history: onHistory,
  tick: onTick,
  ranks: onRanks,
  alert: (msg) => addAlerts([msg.alert], true),
  error: (msg) => toast(`${msg.code ?? 'error'}: ${msg.message ?? 'the server rejected a request'}`),
  pong: () => {},
  subscribed: () => {},
  unsubscribed: () => {},
};

function handleFrame(data) {
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    console.warn('ignoring a non-JSON frame');
    return;
  }
  const handler = msg && frameHandlers[msg.type];
  if (!handler) {
    console.warn('ignoring a frame of unknown type', msg && msg.type);
    return;
  }
  try {
    handler(msg);
  } catch (err) {
    console.error(`handling a ${msg.type} frame failed`, err);
  }
}

function onHistory(msg) {
  if (msg.market !== state.selected || !Array.isArray(msg.ticks)) return;
  state.series.replace(msg.ticks);
  state.awaitingHistory = false;
  markDirty('charts');
}

function onTick(msg) {
  if (msg.market !== state.selected || state.awaitingHistory) return;
  if (state.series.add(msg)) markDirty('charts');
}

function onRanks(msg) {
  if (!KINDS.includes(msg.kind) || !Array.isArray(msg.ranks)) return;
  applyRanks(msg.kind, msg.ranks);
}

function applyRanks(kind, ranks) {
  state.ranks[kind] = ranks;
  // Ranks pushes are fresher than the last metrics poll, so patch the stats line with them.
  for (const r of ranks) {
    const m = state.metrics.get(r.metric) ?? { id: r.metric, market: marketOf(r.metric), kind };
    Object.assign(m, { std: r.std, mean: r.mean, count: r.count, position: r.position, total: r.total, rank: r.label });
    state.metrics.set(r.metric, m);
  }
  markDirty('ranks', 'stats');
}

function addAlerts(alerts, live) {
  let added = false;
  for (const alert of alerts) {
    if (!alert || typeof alert.alert_id !== 'string' || state.alertIds.has(alert.alert_id)) continue;
    state.alerts.push(alert);
    state.alertIds.add(alert.alert_id);
    if (live) state.freshAlerts.add(alert.alert_id);
    added = true;
  }
  if (!added) return;
  state.alerts.sort((a, b) => b.exchange_ts - a.exchange_ts || b.seq - a.seq);
  for (const old of state.alerts.splice(MAX_ALERTS)) {
    state.alertIds.delete(old.alert_id);
    state.freshAlerts.delete(old.alert_id);
  }
  markDirty('alerts');
}

// ---------------------------------------------------------------- REST

async function fetchJson(url) {
  const res = await fetch(url, { headers: { Accept: 'application/json' }, cache: 'no-store' });
  let body = null;
  try {
    body = await res.json();
  } catch {
    // Not JSON (a proxy error page, say): the status below says enough.
  }
  if (!res.ok) {
    throw new Error(body && body.message ? `${body.error ?? res.status}: ${body.message}` : `${url}: HTTP ${res.status}`);
  }
  if (body === null || typeof body !== 'object') throw new Error(`${url}: response is not a JSON object`);
  return body;
}

const failing = new Set();
/** Runs one REST load; toasts once per failure streak so a 5 s poll does not flood the screen. */
async function load(name, url, apply) {
  try {
    apply(await fetchJson(url));
    failing.delete(name);
  } catch (err) {
    console.warn(`loading ${name} failed`, err);
    if (!failing.has(name)) toast(`Could not load ${name}: ${err.message}`);
    failing.add(name);
  }
}

async function pollMetrics() {
  await load('metrics', '/api/metrics', (body) => {
    const metrics = Array.isArray(body.metrics) ? body.metrics : [];
    state.metrics = new Map(metrics.map((m) => [m.id, m]));
    setMarkets([...new Set(metrics.map((m) => m.market))].sort());
    markDirty('stats');
  });
  setTimeout(pollMetrics, METRICS_POLL_MS);
}

function loadAlerts() {
  return load('alerts', '/api/alerts?limit=50', (body) => addAlerts(Array.isArray(body.alerts) ? body.alerts : [], false));
}

function loadRanks(kind) {
  // Only a fallback for before the first push: a late reply must not overwrite fresher ranks.
  return load(`${kind} ranks`, `/api/ranks?kind=${kind}`, (body) => {
    if (state.ranks[kind] === null && Array.isArray(body.ranks)) applyRanks(kind, body.ranks);
  });
}

// ---------------------------------------------------------------- market selection

function marketFromHash() {
  const match = /(?:^#|&)market=([^&]*)/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]).trim().toLowerCase() || null; // the server's ids are lower case
  } catch {
    return null;
  }
}

function setMarkets(markets) {
  state.markets = markets;
  if (markets.length > 0 && !markets.includes(state.selected)) selectMarket(markets[0]);
  // Keep a hash-chosen market selectable while the metrics list is still empty.
  const options = state.selected && !markets.includes(state.selected) ? [state.selected, ...markets] : markets;
  const current = [...els.select.options].map((o) => o.value);
  if (current.join('\n') !== options.join('\n')) {
    els.select.replaceChildren(...options.map((m) => new Option(m, m)));
  }
  els.select.value = state.selected ?? '';
}

function selectMarket(market) {
  if (!market || market === state.selected) return;
  if (state.selected) unsubscribe({ channel: 'market', market: state.selected });
  state.selected = market;
  state.series.clear();
  state.awaitingHistory = true;
  // replaceState: the hash remembers the choice without a history entry per switch or a hashchange.
  window.history.replaceState(null, '', `#market=${market}`);
  subscribe({ channel: 'market', market });
  if (![...els.select.options].some((o) => o.value === market)) els.select.append(new Option(market, market));
  els.select.value = market;
  markDirty('charts', 'stats', 'ranks');
}

// ---------------------------------------------------------------- start

function watchSize() {
  const redraw = () => markDirty('charts');
  new ResizeObserver(redraw).observe(els.priceChart);
  new ResizeObserver(redraw).observe(els.volumeChart);
  // Moving the window to a screen of another pixel ratio resizes nothing, so watch the ratio too.
  const watchRatio = () => {
    matchMedia(`(resolution: ${window.devicePixelRatio}dppx)`).addEventListener('change', () => {
      redraw();
      watchRatio();
    }, { once: true });
  };
  watchRatio();
}

function start() {
  els.select.addEventListener('change', () => selectMarket(els.select.value));
  window.addEventListener('hashchange', () => selectMarket(marketFromHash()));
  for (const kind of KINDS) {
    byTestId(`ranks-${kind}`).addEventListener('click', (event) => {
      const row = event.target.closest('tr[data-metric]');
      if (row) selectMarket(marketOf(row.dataset.metric));
    });
  }
  window.addEventListener('unhandledrejection', (event) => console.warn('unhandled rejection', event.reason));
  watchSize();

  subscribe({ channel: 'alerts' });
  for (const kind of KINDS) subscribe({ channel: 'ranks', kind });
  selectMarket(marketFromHash()); // before the metrics arrive, to save a round trip
  connect();
  setInterval(heartbeat, PING_EVERY_MS);

  pollMetrics();
  loadAlerts();
  KINDS.forEach(loadRanks);
  markDirty('charts', 'stats', 'ranks', 'alerts');
}

start();
