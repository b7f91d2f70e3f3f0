// tickstream dashboard: minute-bar charts, rank tables by a chosen measure, alerts, feed states.

import { ALERT_STATUS_TITLES, alertStatus, alertVersion, supersedes } from './alerts.js';
import { emptyState, feedBadgeOf, openStatus, originBadges } from './feeds.js';

const MINUTE_MS = 60000;
const WINDOW_MINUTES = 1440; // history is at most this + 1 bars (the forming one)
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
// What each kind can be ranked by (the gateway refuses logret for volume).
const MEASURES = { price: ['std', 'cv', 'logret'], volume: ['std', 'cv'] };
// The gateway's default per kind (DEFAULT_MEASURE_BY_KIND): measures that compare markets.
const DEFAULT_MEASURE = { price: 'logret', volume: 'cv' };
const MEASURE_TITLES = {
  std: 'population standard deviation of the minute values',
  cv: 'std / |mean|: unitless, comparable across price levels',
  logret: 'std of minute-to-minute log returns: volatility',
};

// With GATEWAY_JWT_SECRET set, open the page as /?token=<token>: it is passed on to /api and /ws.
const TOKEN = new URLSearchParams(location.search).get('token');

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const els = {
  select: byTestId('market-select'),
  staleBadge: byTestId('stale-badge'),
  selectedFeed: byTestId('selected-feed'),
  origins: byTestId('feed-origins'),
  emptyState: byTestId('empty-state'),
  status: byTestId('status'),
  lastUpdate: byTestId('last-update-time'),
  charts: byTestId('charts'),
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

// ---------------------------------------------------------------- bar series

/** One market's bars, one per minute in minute order; the forming bar is replaced in place. */
class Series {
  constructor() { this.clear(); }

  clear() {
    this.minute = [];
    this.seq = [];
    this.close = [];
    this.volume = [];
    this.lastUpdateTs = null; // exchange_ts of the newest update seen
  }

  get size() { return this.minute.length; }

  get lastMinute() { return this.size > 0 ? this.minute[this.size - 1] : null; }

  replace(bars) {
    this.clear();
    this.merge(bars);
  }

  /** History bars are the server's word for their minutes: they replace what is held. */
  merge(bars) {
    for (const bar of bars) this.put(bar, true);
  }

  /**
   * Puts one bar at its minute. A live update replaces the held bar only when its seq is
   * larger; returns false when nothing changed (malformed, older, or before the window).
   */
  put(bar, fromHistory = false) {
    const minute = Number(bar.minute);
    const seq = Number(bar.seq);
    const close = Number(bar.close);
    const volume = Number(bar.volume);
    if (!Number.isFinite(minute) || !Number.isFinite(close)) return false;
    const vol = Number.isFinite(volume) ? volume : 0;
    const n = this.size;
    const at = n === 0 || minute > this.minute[n - 1] ? n : this._lowerBound(minute);
    if (at < n && this.minute[at] === minute) {
      if (!fromHistory && !(seq > this.seq[at])) return false;
      this.seq[at] = seq;
      this.close[at] = close;
      this.volume[at] = vol;
    } else {
      if (n > 0 && minute < this.lastMinute - WINDOW_MINUTES * MINUTE_MS) return false;
      this.minute.splice(at, 0, minute);
      this.seq.splice(at, 0, seq);
      this.close.splice(at, 0, close);
      this.volume.splice(at, 0, vol);
      this._trim();
    }
    const ts = Number(bar.exchange_ts);
    if (Number.isFinite(ts) && (this.lastUpdateTs === null || ts > this.lastUpdateTs)) this.lastUpdateTs = ts;
    return true;
  }

  _lowerBound(minute) {
    let lo = 0;
    let hi = this.size;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.minute[mid] < minute) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  _trim() {
    // At most WINDOW_MINUTES + 1 bars, so splicing the fronts is cheap.
    const first = this.lastMinute - WINDOW_MINUTES * MINUTE_MS;
    let drop = 0;
    while (drop < this.size && this.minute[drop] < first) drop += 1;
    if (drop > 0) for (const arr of [this.minute, this.seq, this.close, this.volume]) arr.splice(0, drop);
  }
}

// ---------------------------------------------------------------- state

const state = {
  markets: [],
  selected: null,
  awaitingHistory: false, // bars before the market's history would be overwritten by it anyway
  series: new Series(),
  metrics: new Map(), // metric id -> view from /api/metrics, patched by ranks pushes
  feeds: null, // market id -> feed report from /api/metrics; null until the first poll
  origins: null, // origin -> its markets summed up (`origins` of /api/metrics); null until then
  measure: { ...DEFAULT_MEASURE }, // what each rank table is ordered by
  ranks: { price: null, volume: null },
  alerts: [], // newest first
  alertById: new Map(), // alert id -> its newest state held (see alertVersion)
  freshAlerts: new Set(),
};

/** A market is stale when its metrics say so (both kinds share the market's last update). */
function isStale(market) {
  return KINDS.some((kind) => state.metrics.get(`${market}:${kind}`)?.stale === true);
}

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
  markets: renderMarkets,
  feeds: renderFeeds,
  status: renderStatus,
  alerts: renderAlerts,
};

/** The connection indicator: the socket's state, and while it is open, whether data comes. */
function renderStatus() {
  const status = conn.socket === 'open'
    ? openStatus(state.origins)
    : { state: conn.socket, text: conn.socket, title: conn.detail };
  els.status.dataset.state = status.state;
  els.status.querySelector('.status-text').textContent = status.text;
  els.status.title = status.title;
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
    drawChart(els.priceChart, series, series.close, { kind: 'line', zeroBased: false }, axisWidth),
    drawChart(els.volumeChart, series, series.volume, { kind: 'bars', zeroBased: true }, axisWidth),
  );
  if (needed !== axisWidth) {
    axisWidth = needed;
    markDirty('charts'); // one more frame, now with both charts on the same margin
  }
  els.lastUpdate.textContent = fmtDateTime(series.lastUpdateTs);
  els.lastUpdate.dateTime = series.lastUpdateTs === null ? '' : new Date(series.lastUpdateTs).toISOString();
  document.body.dataset.bars = String(series.size);
}

function renderMarkets() {
  const options = state.selected && !state.markets.includes(state.selected) ? [state.selected, ...state.markets] : state.markets;
  const label = (m) => (isStale(m) ? `${m} (stale)` : m);
  const current = [...els.select.options].map((o) => `${o.value}\t${o.textContent}`);
  if (current.join('\n') !== options.map((m) => `${m}\t${label(m)}`).join('\n')) {
    els.select.replaceChildren(...options.map((m) => {
      const option = new Option(label(m), m);
      option.classList.toggle('stale', isStale(m));
      return option;
    }));
  }
  els.select.value = state.selected ?? '';
  const stale = state.selected !== null && isStale(state.selected);
  els.staleBadge.hidden = !stale;
  els.charts.classList.toggle('is-stale', stale);
  document.body.dataset.stale = String(stale);
}

function showFeed(span, badge) {
  span.dataset.feed = badge.state;
  span.dataset.tone = badge.tone;
  span.textContent = badge.text;
  span.title = badge.title;
}

function feedBadge(badge) {
  const span = document.createElement('span');
  span.className = 'feed-badge';
  showFeed(span, badge);
  return span;
}

/** The header: each origin's feed state, the selected market's; why the page is empty. */
function renderFeeds() {
  const badges = originBadges(state.origins);
  if (badges.length > 0) els.origins.replaceChildren(...badges.map(feedBadge));
  else els.origins.textContent = state.origins ? 'none reported' : '—';
  const feed = state.selected ? feedBadgeOf(state.feeds, state.selected) : null;
  els.selectedFeed.hidden = feed === null;
  if (feed !== null) showFeed(els.selectedFeed.querySelector('.feed-badge'), feed);
  const empty = emptyState(state.origins, state.metrics.size);
  els.emptyState.hidden = empty === null;
  els.emptyState.textContent = empty ?? '';
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
    row.classList.toggle('stale', m?.stale === true);
    if (!m) {
      row.replaceChildren(label, statItem('', 'no stats yet'));
      continue;
    }
    const measure = state.measure[kind];
    const items = [
      statItem('count', fmtCount(m.count)),
      statItem('mean', fmtSig(m.mean, 6)),
      statItem('std', fmtSig(m.std)),
      statItem('cv', fmtSig(m.cv)),
    ];
    if (kind === 'price') items.push(statItem('logret', fmtSig(m.logret)));
    items.push(statItem('min', fmtSig(m.min, 6)), statItem('max', fmtSig(m.max, 6)));
    const rank = m.stale ? 'stale' : m.ranks?.[measure]?.rank ?? '—';
    items.push(statItem(`rank by ${measure}`, rank, m.stale ? 'stat-stale' : 'stat-rank'));
    row.replaceChildren(label, ...items);
  }
}

function cell(text, className = '') {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderRanks(kind) {
  const table = byTestId(`ranks-${kind}`);
  const measure = state.measure[kind];
  table.querySelector('.measure-head').textContent = measure;
  const rows = state.ranks[kind] ?? [];
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement('tr');
    tr.dataset.metric = r.metric;
    if (marketOf(r.metric) === state.selected) {
      tr.classList.add('selected');
      tr.setAttribute('aria-current', 'true');
    }
    const feed = cell('', 'feed');
    const badge = feedBadgeOf(state.feeds, marketOf(r.metric));
    if (badge !== null) feed.append(feedBadge(badge));
    tr.append(cell(r.label ?? `${r.position}/${r.total}`, 'num'), cell(r.metric, 'metric'), feed, cell(fmtSig(r.value), 'num'));
    const logret = kind === 'price' ? ` · logret ${fmtSig(r.logret)}` : '';
    tr.title = `std ${fmtSig(r.std)} · cv ${fmtSig(r.cv)}${logret} · mean ${fmtSig(r.mean, 6)} · ${fmtCount(r.count)} minutes`;
    frag.append(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = cell(state.ranks[kind] === null ? 'loading…' : 'no live metrics');
    td.colSpan = 4;
    tr.append(td);
    frag.append(tr);
  }
  table.tBodies[0].replaceChildren(frag);
}

function alertRow(alert) {
  const li = document.createElement('li');
  const status = alertStatus(alert);
  li.className = `alert ${status}`;
  li.dataset.alertId = alert.alert_id;
  li.dataset.metric = alert.metric;
  li.dataset.status = status;
  li.dataset.version = String(alertVersion(alert));
  li.title = `${status}: ${ALERT_STATUS_TITLES[status]}`;
  const time = document.createElement('time');
  time.className = 'alert-time';
  time.textContent = fmtHHMMSS(alert.exchange_ts);
  time.title = `${fmtDateTime(alert.exchange_ts)} (minute ${fmtHHMM(alert.minute)})`;
  const metric = document.createElement('span');
  metric.className = 'alert-metric';
  metric.textContent = alert.metric;
  const detail = document.createElement('span');
  detail.className = 'alert-detail';
  detail.textContent = `value ${fmtSig(alert.value, 6)} · mean ${fmtSig(alert.mean, 6)}`;
  if (status === 'retracted' && Number.isFinite(alert.final_value)) {
    detail.textContent += ` · closed at ${fmtSig(alert.final_value, 6)}`;
  }
  if (status !== 'confirmed') detail.textContent = `${status} · ${detail.textContent}`;
  const ratio = document.createElement('span');
  ratio.className = 'alert-ratio';
  ratio.textContent = fmtRatio(alert.ratio);
  if (Number.isFinite(alert.window_minutes)) {
    ratio.title = `threshold ${fmtSig(alert.factor, 3)}x the mean of the ${alert.window_minutes} minutes before`;
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
  for (const [id, el] of existing) {
    // Gone, or superseded by a newer state (confirmed, retracted): its row is made again.
    const alert = state.alertById.get(id);
    if (!alert || el.dataset.version !== String(alertVersion(alert))) {
      el.remove();
      existing.delete(id);
    }
  }
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

const TIME_STEPS_MIN = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720];
function timeTicks(t0, t1, width) {
  const maxTicks = Math.max(2, Math.floor(width / 70));
  const steps = TIME_STEPS_MIN.map((m) => m * MINUTE_MS);
  const step = steps.find((s) => (t1 - t0) / s <= maxTicks) ?? steps[steps.length - 1];
  const ticks = [];
  // Multiples of the step since the epoch fall on round UTC times.
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return { ticks, label: fmtHHMM };
}

function valueRange(values, zeroBased) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
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
    const message = !state.selected ? 'no market selected' : state.awaitingHistory ? 'waiting for history…' : 'no bars in the last 24 h';
    ctx.fillText(message, w / 2, h / 2);
    return 0;
  }
  // The x axis spans bar open times, plus the newest bar's minute so it has room.
  const t1 = series.lastMinute + MINUTE_MS;
  const t0 = Math.min(series.minute[0], t1 - 10 * MINUTE_MS);
  const [lo, hi] = valueRange(values, opts.zeroBased);
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

/** The close of each minute, drawn at the middle of its minute. */
function drawLine(ctx, series, values, xOf, yOf) {
  const { minute } = series;
  const mid = MINUTE_MS / 2;
  ctx.strokeStyle = palette.line;
  ctx.fillStyle = palette.line;
  ctx.lineWidth = 1.5;
  ctx.lineJoin = 'round';
  if (series.size === 1) {
    ctx.beginPath();
    ctx.arc(xOf(minute[0] + mid), yOf(values[0]), 3, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(xOf(minute[0] + mid), yOf(values[0]));
  // At most 1,441 points: every one is drawn; the canvas merges those sharing a pixel.
  for (let i = 1; i < series.size; i += 1) ctx.lineTo(xOf(minute[i] + mid), yOf(values[i]));
  ctx.stroke();
}

/** One bar per minute, or the largest per pixel column when the minutes outnumber them. */
function drawBars(ctx, series, values, xOf, yOf, plot, { t0, t1, base }) {
  const { minute } = series;
  const n = series.size;
  const minutePx = (MINUTE_MS / (t1 - t0)) * plot.w;
  ctx.fillStyle = palette.bar;
  if (minutePx >= 2) {
    const width = Math.max(1, Math.min(minutePx * 0.7, 12));
    for (let i = 0; i < n; i += 1) {
      const top = yOf(values[i]);
      ctx.fillRect(xOf(minute[i] + MINUTE_MS / 2) - width / 2, Math.min(top, base), width, Math.abs(base - top));
    }
    return;
  }
  const barPx = 2;
  const cols = Math.max(1, Math.floor(plot.w / barPx));
  const peaks = new Float64Array(cols);
  for (let i = 0; i < n; i += 1) {
    const c = Math.min(cols - 1, Math.floor(((minute[i] - t0) / (t1 - t0)) * cols));
    if (values[i] > peaks[c]) peaks[c] = values[i];
  }
  for (let c = 0; c < cols; c += 1) {
    if (peaks[c] <= 0) continue;
    const top = yOf(peaks[c]);
    ctx.fillRect(plot.x + c * barPx, top, barPx - 0.5, base - top);
  }
}

// ---------------------------------------------------------------- WebSocket connection

const conn = {
  ws: null,
  socket: 'connecting', // then 'open' or 'reconnecting'
  detail: '', // the indicator's title while not open
  everOpened: false,
  openedAt: 0,
  lastFrameAt: 0,
  delay: BACKOFF_MIN_MS,
  retryTimer: 0,
  // What to (re-)subscribe on every open. Keyed by channel and market or kind, not by `by`:
  // the gateway holds one rank subscription per kind, and subscribing again switches it.
  subs: new Map(),
};

const subKey = (sub) => `${sub.channel}|${sub.market ?? sub.kind ?? ''}`;

function send(frame) {
  if (conn.ws && conn.ws.readyState === WebSocket.OPEN) conn.ws.send(JSON.stringify(frame));
}

/** The subscribe frame for `sub` now: a market we already hold bars of asks only for the rest. */
function subscribeFrame(sub) {
  const frame = { op: 'subscribe', ...sub };
  if (sub.channel === 'market' && sub.market === state.selected && state.series.size > 0) {
    // The newest held minute was probably still forming: ask for it again.
    frame.since = state.series.lastMinute;
  }
  return frame;
}

function subscribe(sub) {
  conn.subs.set(subKey(sub), sub);
  send(subscribeFrame(sub));
}

function unsubscribe(sub) {
  if (conn.subs.delete(subKey(sub))) send({ op: 'unsubscribe', ...sub });
}

function connect() {
  clearTimeout(conn.retryTimer);
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  let ws;
  try {
    const query = TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : '';
    ws = new WebSocket(`${scheme}//${location.host}/ws${query}`);
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
  conn.socket = 'open'; // shown green only once a feed is live: see openStatus
  markDirty('status');
  // The server forgot us: ask again for everything; bars since our newest minute are merged.
  if (state.selected) state.awaitingHistory = true;
  for (const sub of conn.subs.values()) ws.send(JSON.stringify(subscribeFrame(sub)));
  if (reconnected) loadAlerts(); // pick up alerts raised while we were away
}

function scheduleReconnect() {
  if (conn.openedAt && Date.now() - conn.openedAt >= STABLE_AFTER_MS) conn.delay = BACKOFF_MIN_MS;
  conn.openedAt = 0;
  const delay = conn.delay;
  conn.delay = Math.min(conn.delay * 2, BACKOFF_MAX_MS);
  conn.socket = 'reconnecting';
  conn.detail = `next attempt in ${Math.round(delay / 1000)} s`;
  markDirty('status');
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
  bar: onBar,
  // What we hold is older than the server's window: the history after it is the whole window.
  gap: (msg) => {
    if (msg.market === state.selected) state.series.replace([]);
  },
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
  if (msg.market !== state.selected || !Array.isArray(msg.bars)) return;
  // With `since` the frame holds only what we missed; without, it is the whole window.
  if (msg.since == null) state.series.replace(msg.bars);
  else state.series.merge(msg.bars);
  state.awaitingHistory = false;
  markDirty('charts');
}

function onBar(msg) {
  if (msg.market !== state.selected || state.awaitingHistory) return;
  if (state.series.put(msg)) markDirty('charts');
}

function onRanks(msg) {
  if (!KINDS.includes(msg.kind) || !Array.isArray(msg.ranks)) return;
  if (msg.by !== state.measure[msg.kind]) return; // a late frame of the previous measure
  applyRanks(msg.kind, msg.by, msg.ranks);
}

function applyRanks(kind, measure, ranks) {
  state.ranks[kind] = ranks;
  // Ranks pushes are fresher than the last metrics poll, so patch the stats with them.
  const ranked = new Set();
  for (const r of ranks) {
    ranked.add(r.metric);
    const m = state.metrics.get(r.metric) ?? { id: r.metric, market: marketOf(r.metric), kind, ranks: {} };
    Object.assign(m, { std: r.std, cv: r.cv, logret: r.logret, mean: r.mean, count: r.count, stale: false });
    m.ranks = { ...m.ranks, [measure]: { position: r.position, total: r.total, rank: r.label } };
    state.metrics.set(r.metric, m);
  }
  // A metric of this kind missing from the snapshot is stale or gone: it has no position.
  for (const m of state.metrics.values()) {
    if (m.kind === kind && !ranked.has(m.id) && m.ranks) {
      m.ranks = { ...m.ranks, [measure]: { position: null, total: ranks.length, rank: null } };
    }
  }
  markDirty('ranks', 'stats', 'markets');
}

function addAlerts(alerts, live) {
  let added = false;
  for (const alert of alerts) {
    if (!alert || typeof alert.alert_id !== 'string') continue;
    const held = state.alertById.get(alert.alert_id);
    // A newer state of a held alert replaces it; a repeated or older one changes nothing.
    if (!supersedes(alert, held)) continue;
    if (held) state.alerts[state.alerts.indexOf(held)] = alert;
    else state.alerts.push(alert);
    state.alertById.set(alert.alert_id, alert);
    if (live) state.freshAlerts.add(alert.alert_id);
    added = true;
  }
  if (!added) return;
  state.alerts.sort((a, b) => b.exchange_ts - a.exchange_ts || b.seq - a.seq);
  for (const old of state.alerts.splice(MAX_ALERTS)) {
    state.alertById.delete(old.alert_id);
    state.freshAlerts.delete(old.alert_id);
  }
  markDirty('alerts');
}

// ---------------------------------------------------------------- REST

async function fetchJson(url) {
  const headers = { Accept: 'application/json' };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  const res = await fetch(url, { headers, cache: 'no-store' });
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
    state.feeds = body.feeds !== null && typeof body.feeds === 'object' ? body.feeds : {};
    state.origins = body.origins !== null && typeof body.origins === 'object' ? body.origins : {};
    setMarkets([...new Set(metrics.map((m) => m.market))].sort());
    markDirty('stats', 'markets', 'feeds', 'ranks', 'status');
  });
  setTimeout(pollMetrics, METRICS_POLL_MS);
}

function loadAlerts() {
  return load('alerts', '/api/alerts?limit=50', (body) => addAlerts(Array.isArray(body.alerts) ? body.alerts : [], false));
}

function loadRanks(kind) {
  // Only a fallback for before the first push: a late reply must not overwrite fresher ranks.
  const measure = state.measure[kind];
  return load(`${kind} ranks`, `/api/ranks?kind=${kind}&by=${measure}`, (body) => {
    if (state.ranks[kind] === null && body.by === state.measure[kind] && Array.isArray(body.ranks)) {
      applyRanks(kind, body.by, body.ranks);
    }
  });
}

// ---------------------------------------------------------------- selection (kept in the URL hash)

function hashParam(name) {
  const match = new RegExp(`(?:^#|&)${name}=([^&]*)`).exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]).trim().toLowerCase() || null; // the server's ids are lower case
  } catch {
    return null;
  }
}

function writeHash() {
  const parts = state.selected ? [`market=${state.selected}`] : [];
  for (const kind of KINDS) if (state.measure[kind] !== DEFAULT_MEASURE[kind]) parts.push(`${kind}_by=${state.measure[kind]}`);
  // replaceState: the hash remembers choices without a history entry per switch or a hashchange.
  window.history.replaceState(null, '', `#${parts.join('&')}`);
}

function setMarkets(markets) {
  state.markets = markets;
  if (markets.length > 0 && !markets.includes(state.selected)) selectMarket(markets[0]);
  renderMarkets();
}

function selectMarket(market) {
  if (!market || market === state.selected) return;
  if (state.selected) unsubscribe({ channel: 'market', market: state.selected });
  state.selected = market;
  state.series.clear();
  state.awaitingHistory = true;
  writeHash();
  subscribe({ channel: 'market', market });
  markDirty('charts', 'stats', 'ranks', 'markets', 'feeds');
}

function selectMeasure(kind, measure) {
  if (!MEASURES[kind].includes(measure) || measure === state.measure[kind]) return;
  state.measure[kind] = measure;
  state.ranks[kind] = null; // loading until the snapshot by the new measure arrives
  byTestId(`rank-measure-${kind}`).value = measure;
  writeHash();
  subscribe({ channel: 'ranks', kind, by: measure }); // replaces the kind's rank subscription
  markDirty('ranks', 'stats');
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
  window.addEventListener('hashchange', () => {
    selectMarket(hashParam('market'));
    for (const kind of KINDS) selectMeasure(kind, hashParam(`${kind}_by`) ?? DEFAULT_MEASURE[kind]);
  });
  for (const kind of KINDS) {
    const picker = byTestId(`rank-measure-${kind}`);
    picker.replaceChildren(...MEASURES[kind].map((m) => {
      const option = new Option(m, m);
      option.title = MEASURE_TITLES[m];
      return option;
    }));
    const chosen = hashParam(`${kind}_by`);
    if (MEASURES[kind].includes(chosen)) state.measure[kind] = chosen;
    picker.value = state.measure[kind];
    picker.addEventListener('change', () => selectMeasure(kind, picker.value));
    byTestId(`ranks-${kind}`).addEventListener('click', (event) => {
      const row = event.target.closest('tr[data-metric]');
      if (row) selectMarket(marketOf(row.dataset.metric));
    });
  }
  window.addEventListener('unhandledrejection', (event) => console.warn('unhandled rejection', event.reason));
  watchSize();

  subscribe({ channel: 'alerts' });
  for (const kind of KINDS) subscribe({ channel: 'ranks', kind, by: state.measure[kind] });
  selectMarket(hashParam('market')); // before the metrics arrive, to save a round trip
  connect();
  setInterval(heartbeat, PING_EVERY_MS);

  pollMetrics();
  loadAlerts();
  KINDS.forEach(loadRanks);
  markDirty('charts', 'stats', 'ranks', 'alerts', 'markets', 'feeds', 'status');
}

start();
