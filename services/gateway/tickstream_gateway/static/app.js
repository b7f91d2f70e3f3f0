// tickstream dashboard: minute-bar charts, rank tables by a chosen measure, alerts, feed states.
// What it receives stays small whatever the number of markets: rank tables are the top
// RANK_ROWS entries (plus the selected market) of the WebSocket's ranks channel, the stats
// poll asks for the selected market only, and markets are found by a server-side search.

import { ALERT_STATUS_TITLES, alertStatus, alertVersion, supersedes } from './alerts.js';
import { emptyState, feedBadgeOf, openStatus, originBadges, rowBadge } from './feeds.js';

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
// Rows per rank table: each ranks frame holds this many entries (about 220 bytes each) and
// comes at most once a second per kind, so the page's bytes per second stay bounded.
const RANK_ROWS = 15;
const SEARCH_RESULTS = 20; // markets shown for a search
const SEARCH_DELAY_MS = 250; // typing pauses this long before a search is sent
// What the gateway accepts in `q` and `quote` (docs/protocol.md, "Listing parameters").
const SEARCH_TEXT = /^[a-z0-9:-]{1,64}$/;
const QUOTE_TEXT = /^[a-z0-9]{1,32}$/;
// Descriptions of the measures the gateway may offer (GET /api/kinds says which per kind).
const MEASURE_TITLES = {
  std: 'population standard deviation of the minute values (in the metric\'s unit)',
  cv: 'std / |mean|: unitless, comparable across price levels and sizes',
  logret: 'std of minute-to-minute log returns: volatility, comparable across markets',
};

// With GATEWAY_JWT_SECRET set, open the page as /?token=<token>: it is passed on to /api and /ws.
const TOKEN = new URLSearchParams(location.search).get('token');

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const els = {
  search: byTestId('market-search'),
  results: byTestId('market-results'),
  quote: byTestId('rank-quote'),
  quotes: byTestId('quote-list'),
  rankPanels: byTestId('rank-panels'),
  stats: byTestId('stats'),
  staleBadge: byTestId('stale-badge'),
  selectedFeed: byTestId('selected-feed'),
  origins: byTestId('feed-origins'),
  emptyState: byTestId('empty-state'),
  status: byTestId('status'),
  lastUpdate: byTestId('last-update-time'),
  charts: byTestId('charts'),
  priceChart: byTestId('price-chart'),
  volumeChart: byTestId('volume-chart'),
  turnoverChart: byTestId('turnover-chart'),
  alerts: byTestId('alerts'),
  toasts: byTestId('toasts'),
  kind: {}, // kind -> {table, picker, stats}: the elements made for it (see buildKinds)
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
    this.turnover = []; // quote volume; NaN where the source does not say it (drawn as no bar)
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
    // null (unknown) must not read as 0: Number(null) is 0.
    const quote = bar.quote_volume == null ? NaN : Number(bar.quote_volume);
    const n = this.size;
    const at = n === 0 || minute > this.minute[n - 1] ? n : this._lowerBound(minute);
    if (at < n && this.minute[at] === minute) {
      if (!fromHistory && !(seq > this.seq[at])) return false;
      this.seq[at] = seq;
      this.close[at] = close;
      this.volume[at] = vol;
      this.turnover[at] = quote;
    } else {
      if (n > 0 && minute < this.lastMinute - WINDOW_MINUTES * MINUTE_MS) return false;
      this.minute.splice(at, 0, minute);
      this.seq.splice(at, 0, seq);
      this.close.splice(at, 0, close);
      this.volume.splice(at, 0, vol);
      this.turnover.splice(at, 0, quote);
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
    if (drop > 0) for (const arr of [this.minute, this.seq, this.close, this.volume, this.turnover]) arr.splice(0, drop);
  }
}


// ---------------------------------------------------------------- state

const state = {
  kinds: [], // [{kind, measures, default}] from GET /api/kinds; nothing is ranked before it
  selected: null,
  awaitingHistory: false, // bars before the market's history would be overwritten by it anyway
  series: new Series(),
  metrics: new Map(), // the selected market's metric id -> view (its poll, patched by ranks pushes)
  anyMetrics: null, // whether stats has any metric at all; null until the first poll says
  feeds: null, // market id -> feed report of the polled market(s); null until the first poll
  origins: null, // origin -> its markets summed up (`origins` of /api/metrics); null until then
  measure: {}, // kind -> what its rank table is ordered by
  quote: null, // rank only markets of this quote currency; null: every market
  ranks: {}, // kind -> {ranks, own, total} of its newest ranks frame; absent until one arrives
  // kind -> the selected market's rank label in that kind's newest ranks frame (top or own),
  // null when the frame does not hold it.
  selectedRank: {},
  results: null, // markets found by the search box, null while it is closed
  alerts: [], // newest first
  alertById: new Map(), // alert id -> its newest state held (see alertVersion)
  freshAlerts: new Set(),
  quotesSeen: new Set(), // for the quote box's suggestions: quotes of markets shown so far
};

const kindNames = () => state.kinds.map((k) => k.kind);
const kindInfo = (kind) => state.kinds.find((k) => k.kind === kind);

/** The selected market is stale when its metrics say so (every kind shares its last update). */
function isStale(market) {
  return kindNames().some((kind) => state.metrics.get(`${market}:${kind}`)?.stale === true);
}

/** "binance:btc-usdt" -> {exchange, quote}; null for anything else. */
function partsOf(market) {
  const match = /^([a-z0-9]+):[a-z0-9]+-([a-z0-9]+)$/.exec(market ?? '');
  return match ? { exchange: match[1], quote: match[2] } : null;
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
  ranks: () => kindNames().forEach(renderRanks),
  stats: renderStats,
  markets: renderMarkets,
  results: renderResults,
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

let axisWidth = 0; // shared left margin so the charts' time axes line up

function renderCharts() {
  const { series } = state;
  const needed = Math.max(
    drawChart(els.priceChart, series, series.close, { kind: 'line', zeroBased: false }, axisWidth),
    drawChart(els.volumeChart, series, series.volume, { kind: 'bars', zeroBased: true }, axisWidth),
    drawChart(els.turnoverChart, series, series.turnover, { kind: 'bars', zeroBased: true }, axisWidth),
  );
  if (needed !== axisWidth) {
    axisWidth = needed;
    markDirty('charts'); // one more frame, now with every chart on the same margin
  }
  els.lastUpdate.textContent = fmtDateTime(series.lastUpdateTs);
  els.lastUpdate.dateTime = series.lastUpdateTs === null ? '' : new Date(series.lastUpdateTs).toISOString();
  document.body.dataset.bars = String(series.size);
}

/** The selected market in the search box (unless being typed in), its stale mark. */
function renderMarkets() {
  if (document.activeElement !== els.search) els.search.value = state.selected ?? '';
  const stale = state.selected !== null && isStale(state.selected);
  els.staleBadge.hidden = !stale;
  els.charts.classList.toggle('is-stale', stale);
  document.body.dataset.stale = String(stale);
  const known = [...els.quotes.children].map((o) => o.value).join(',');
  const quotes = [...state.quotesSeen].sort();
  if (known !== quotes.join(',')) els.quotes.replaceChildren(...quotes.map((q) => new Option(q, q)));
}

/** The search box's list: the markets found, stale ones marked, how many more there are. */
function renderResults() {
  const found = state.results;
  els.results.hidden = found === null;
  if (found === null) return;
  const items = found.markets.map(({ market, stale }) => {
    const li = document.createElement('li');
    li.className = stale ? 'result stale' : 'result';
    li.dataset.market = market;
    li.setAttribute('role', 'option');
    li.textContent = stale ? `${market} (stale)` : market;
    return li;
  });
  if (found.markets.length === 0) items.push(resultNote(found.error ?? 'no market matches'));
  else if (found.more > 0) items.push(resultNote(`${found.more} more metrics match: type more`));
  els.results.replaceChildren(...items);
}

function resultNote(text) {
  const li = document.createElement('li');
  li.className = 'result-note';
  li.textContent = text;
  return li;
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
  // Only once a poll has said that stats has no metric at all.
  const empty = state.anyMetrics === false ? emptyState(state.origins, 0) : null;
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
  for (const { kind, measures } of state.kinds) {
    const row = els.kind[kind].stats;
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
    const items = [statItem('count', fmtCount(m.count)), statItem('mean', fmtSig(m.mean, 6))];
    for (const name of measures) items.push(statItem(name, fmtSig(m[name])));
    items.push(statItem('min', fmtSig(m.min, 6)), statItem('max', fmtSig(m.max, 6)));
    // As the table ranks it (its frame holds the selected market once subscribed); else,
    // among every market, the poll's position (older by up to METRICS_POLL_MS).
    const polled = state.quote ? null : m.ranks?.[measure]?.rank;
    const rank = m.stale ? 'stale' : state.selectedRank[kind] ?? polled ?? '—';
    const among = state.quote ? ` (${state.quote})` : '';
    items.push(statItem(`rank by ${measure}${among}`, rank, m.stale ? 'stat-stale' : 'stat-rank'));
    row.replaceChildren(label, ...items);
  }
}

function cell(text, className = '') {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function rankRow(kind, r) {
  const tr = document.createElement('tr');
  tr.dataset.metric = r.metric;
  const market = marketOf(r.metric);
  if (market === state.selected) {
    tr.classList.add('selected');
    tr.setAttribute('aria-current', 'true');
  }
  const feed = cell('', 'feed');
  const badge = rowBadge(state.feeds, state.origins, market);
  if (badge !== null) feed.append(feedBadge(badge));
  tr.append(cell(r.label ?? `${r.position}/${r.total}`, 'num'), cell(r.metric, 'metric'), feed, cell(fmtSig(r.value), 'num'));
  const measures = kindInfo(kind)?.measures ?? [];
  const values = measures.map((name) => `${name} ${fmtSig(r[name])}`).join(' · ');
  tr.title = `${values} · mean ${fmtSig(r.mean, 6)} · ${fmtCount(r.count)} minutes`;
  return tr;
}

/** One kind's table: its top RANK_ROWS rows, then the selected market's row if ranked lower. */
function renderRanks(kind) {
  const { table } = els.kind[kind];
  const measure = state.measure[kind];
  table.querySelector('.measure-head').textContent = measure;
  const shown = state.ranks[kind];
  const frag = document.createDocumentFragment();
  for (const r of shown?.ranks ?? []) frag.append(rankRow(kind, r));
  if (shown?.own?.length > 0) {
    const gap = document.createElement('tr');
    gap.className = 'gap';
    const td = cell('…');
    td.colSpan = 4;
    gap.append(td);
    frag.append(gap);
    for (const r of shown.own) frag.append(rankRow(kind, r));
  }
  if (!shown || shown.ranks.length === 0) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = cell(shown === undefined ? 'loading…' : shown.warming ? 'warming up…' : 'no live metrics');
    td.colSpan = 4;
    tr.append(td);
    frag.append(tr);
  }
  table.tBodies[0].replaceChildren(frag);
  const warming = shown?.warming ? ', warming up' : '';
  els.kind[kind].total.textContent = shown ? `${fmtCount(shown.total)} ranked${state.quote ? ` (${state.quote})` : ''}${warming}` : '';
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
  if (hi === -Infinity) return [0, 1]; // nothing known (every turnover unknown)
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
      if (!Number.isFinite(values[i])) continue; // unknown (turnover without a quote volume)
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
  // Kinds whose ranks subscribe is not answered yet: their ranks frames until `subscribed`
  // belong to the subscription it replaces.
  switchingRanks: new Set(),
};

const subKey = (sub) => `${sub.channel}|${sub.market ?? sub.kind ?? ''}`;

function send(frame) {
  if (conn.ws && conn.ws.readyState === WebSocket.OPEN) conn.ws.send(JSON.stringify(frame));
}

/** The subscribe frame for `sub` now: a market we already hold bars of asks only for the rest. */
function subscribeFrame(sub) {
  const frame = { op: 'subscribe', ...sub };
  if (sub.channel === 'ranks') conn.switchingRanks.add(sub.kind);
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
  error: (msg) => {
    // A market without bars: nothing to wait for (its stats, if any, still show).
    if (msg.code === 'unknown_market') {
      state.awaitingHistory = false;
      markDirty('charts');
    }
    toast(`${msg.code ?? 'error'}: ${msg.message ?? 'the server rejected a request'}`);
  },
  pong: () => {},
  subscribed: (msg) => {
    if (msg.channel === 'ranks') conn.switchingRanks.delete(msg.kind);
  },
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
  const kind = msg.kind;
  if (!kindInfo(kind) || !Array.isArray(msg.ranks)) return;
  // A frame of the subscription this kind had before a switch (measure or quote): the
  // gateway answers `subscribed` before the first frame of the new one.
  if (conn.switchingRanks.has(kind) || msg.by !== state.measure[kind]) return;
  applyRanks(kind, msg.by, {
    ranks: msg.ranks,
    own: Array.isArray(msg.own) ? msg.own : [],
    total: msg.total,
    // Stats is still warming up: the board may lack markets; said, not shown as complete.
    warming: msg.warming === true,
  });
}

function applyRanks(kind, measure, shown) {
  state.ranks[kind] = shown;
  for (const r of shown.ranks) {
    const quote = partsOf(marketOf(r.metric))?.quote;
    if (quote) state.quotesSeen.add(quote);
  }
  // Ranks pushes are fresher than the last metrics poll: patch the selected market's stats.
  const metric = `${state.selected}:${kind}`;
  const r = [...shown.ranks, ...shown.own].find((entry) => entry.metric === metric);
  state.selectedRank[kind] = r ? r.label : null;
  const held = state.metrics.get(metric);
  if (held && r) {
    for (const name of [...kindInfo(kind).measures, 'mean', 'count']) held[name] = r[name];
    held.stale = false;
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
  // no-cache: the browser revalidates with the ETag it holds, and an unchanged answer comes
  // back as a 304 without a body.
  const res = await fetch(url, { headers, cache: 'no-cache' });
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
    return true;
  } catch (err) {
    console.warn(`loading ${name} failed`, err);
    if (!failing.has(name)) toast(`Could not load ${name}: ${err.message}`);
    failing.add(name);
    return false;
  }
}

const query = (params) => Object.entries(params).map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join('&');

/**
 * Where the selected market's metrics are: one small page, whatever the number of markets.
 * No exchange or quote, so that positions are among every market; the search text is the
 * whole id, and the few other ids holding it (a longer quote) sort after it.
 */
function selectedMetricsUrl() {
  if (!partsOf(state.selected)) return `/api/metrics?${query({ limit: 1 })}`;
  return `/api/metrics?${query({ q: state.selected, limit: 2 * Math.max(1, state.kinds.length) })}`;
}

/**
 * The selected market's stats and every origin's feed state, every METRICS_POLL_MS. Without
 * a selection it asks for one metric: whether there are any, and a market to show first.
 */
async function pollMetrics() {
  const selected = state.selected;
  await load('metrics', selectedMetricsUrl(), (body) => {
    if (state.selected !== selected) return; // the selection changed meanwhile
    const metrics = Array.isArray(body.metrics) ? body.metrics : [];
    const ours = selected ? metrics.filter((m) => m.market === selected) : [];
    state.metrics = new Map(ours.map((m) => [m.id, m]));
    state.feeds = body.feeds !== null && typeof body.feeds === 'object' ? body.feeds : {};
    state.origins = body.origins !== null && typeof body.origins === 'object' ? body.origins : {};
    if (!selected || ours.length > 0) state.anyMetrics = (Number.isFinite(body.matching) ? body.matching : metrics.length) > 0;
    if (!selected && metrics.length > 0) selectMarket(metrics[0].market);
    markDirty('stats', 'markets', 'feeds', 'ranks', 'status');
  });
  clearTimeout(pollMetrics.timer);
  pollMetrics.timer = setTimeout(pollMetrics, METRICS_POLL_MS);
}

function loadAlerts() {
  return load('alerts', '/api/alerts?limit=50', (body) => addAlerts(Array.isArray(body.alerts) ? body.alerts : [], false));
}

/** The selected market's minute values (gzipped [minute, value] pairs: a fraction of a full
 * history frame); the live subscription then asks only for what came after them. */
async function loadHistory(market) {
  const values = new Map(); // minute -> {close, volume, quote_volume}
  const field = { price: 'close', volume: 'volume', turnover: 'quote_volume' };
  const take = (kind) => (body) => {
    for (const pair of Array.isArray(body.values) ? body.values : []) {
      if (!Array.isArray(pair)) continue;
      const held = values.get(pair[0]) ?? { minute: pair[0], seq: -1, close: NaN, volume: 0, quote_volume: null };
      held[field[kind]] = pair[1];
      values.set(pair[0], held);
    }
  };
  const url = (kind) => `/api/metrics/${encodeURIComponent(`${market}:${kind}`)}`;
  const [loaded] = await Promise.all([
    Promise.all(['price', 'volume'].map((kind) => load(`${kind} history`, url(kind), take(kind)))),
    // A market without a turnover metric (no minute with a quote volume, e.g. Coinbase REST
    // candles only) answers 404: its turnover is unknown, not an error to show.
    kindNames().includes('turnover') ? fetchJson(url('turnover')).then(take('turnover'), () => {}) : null,
  ]);
  if (state.selected !== market) return;
  // Without both, the subscription's history frame brings everything.
  if (loaded.every(Boolean)) state.series.merge([...values.values()].sort((a, b) => a.minute - b.minute));
  subscribe({ channel: 'market', market });
  markDirty('charts');
}

async function loadKinds() {
  while (!(await load('kinds', '/api/kinds', (body) => {
    if (Array.isArray(body.kinds)) state.kinds = body.kinds.filter((k) => k && typeof k.kind === 'string' && Array.isArray(k.measures));
  }))) {
    await new Promise((resolve) => setTimeout(resolve, BACKOFF_MAX_MS / 6));
  }
}

// ---------------------------------------------------------------- search (server-side `q`)

let searchTimer = 0;
let searchSeq = 0;

function onSearchInput() {
  clearTimeout(searchTimer);
  const text = els.search.value.trim().toLowerCase();
  if (!text) {
    state.results = null;
    markDirty('results');
    return;
  }
  if (!SEARCH_TEXT.test(text)) {
    state.results = { markets: [], more: 0, error: "use a-z, 0-9, ':' and '-' (at most 64)" };
    markDirty('results');
    return;
  }
  searchTimer = setTimeout(() => search(text), SEARCH_DELAY_MS);
}

async function search(text) {
  const seq = ++searchSeq;
  const limit = SEARCH_RESULTS * Math.max(1, state.kinds.length);
  await load('search', `/api/metrics?${query({ q: text, limit })}`, (body) => {
    if (seq !== searchSeq) return; // a newer search was sent meanwhile
    const metrics = Array.isArray(body.metrics) ? body.metrics : [];
    const markets = new Map();
    for (const m of metrics) {
      const held = markets.get(m.market);
      markets.set(m.market, { market: m.market, stale: (held?.stale ?? true) && m.stale === true });
      const quote = partsOf(m.market)?.quote;
      if (quote) state.quotesSeen.add(quote);
    }
    const shown = [...markets.values()].slice(0, SEARCH_RESULTS);
    const matching = Number.isFinite(body.matching) ? body.matching : metrics.length;
    state.results = { markets: shown, more: Math.max(0, matching - metrics.length) };
    markDirty('results', 'markets');
  });
}

function closeSearch() {
  state.results = null;
  els.search.value = state.selected ?? '';
  markDirty('results');
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
  for (const { kind, default: preset } of state.kinds) if (state.measure[kind] !== preset) parts.push(`${kind}_by=${state.measure[kind]}`);
  if (state.quote) parts.push(`quote=${state.quote}`);
  // replaceState: the hash remembers choices without a history entry per switch or a hashchange.
  window.history.replaceState(null, '', `#${parts.join('&')}`);
}

function selectMarket(market) {
  if (!market || market === state.selected || !partsOf(market)) return;
  if (state.selected) unsubscribe({ channel: 'market', market: state.selected });
  state.selected = market;
  state.series.clear();
  state.metrics = new Map();
  state.selectedRank = {};
  state.awaitingHistory = true;
  writeHash();
  loadHistory(market);
  pollMetrics();
  markDirty('charts', 'stats', 'ranks', 'markets', 'feeds');
}

/** The ranks subscription of a kind as chosen now; subscribing again switches it. */
function subscribeRanks(kind) {
  const sub = { channel: 'ranks', kind, by: state.measure[kind], limit: RANK_ROWS };
  if (state.quote) sub.quote = state.quote;
  subscribe(sub);
}

function selectMeasure(kind, measure) {
  const info = kindInfo(kind);
  if (!info || !info.measures.includes(measure) || measure === state.measure[kind]) return;
  state.measure[kind] = measure;
  delete state.ranks[kind]; // loading until the ranks by the new measure arrive
  delete state.selectedRank[kind];
  els.kind[kind].picker.value = measure;
  writeHash();
  subscribeRanks(kind);
  markDirty('ranks', 'stats');
}

function selectQuote(raw) {
  const quote = (raw ?? '').trim().toLowerCase() || null;
  if (quote !== null && !QUOTE_TEXT.test(quote)) {
    toast('A quote currency is 1 to 32 of a-z and 0-9, e.g. usdt', 'warn');
    return;
  }
  if (quote === state.quote) return;
  state.quote = quote;
  els.quote.value = quote ?? '';
  writeHash();
  for (const kind of kindNames()) {
    delete state.ranks[kind];
    delete state.selectedRank[kind];
    subscribeRanks(kind);
  }
  markDirty('ranks', 'stats');
}

// ---------------------------------------------------------------- start

/** A rank table and a stats row per kind the gateway ranks (GET /api/kinds). */
function buildKinds() {
  const panels = [];
  for (const { kind, measures, default: preset } of state.kinds) {
    const chosen = hashParam(`${kind}_by`);
    state.measure[kind] = measures.includes(chosen) ? chosen : measures.includes(preset) ? preset : measures[0];
    const panel = document.createElement('section');
    panel.className = 'panel';
    panel.setAttribute('aria-label', `${kind} ranks`);
    const head = document.createElement('div');
    head.className = 'panel-head';
    const title = document.createElement('h2');
    title.className = 'panel-title';
    title.textContent = `${kind} ranks`;
    const total = document.createElement('span');
    total.className = 'muted ranks-total';
    const picker = document.createElement('select');
    picker.dataset.testid = `rank-measure-${kind}`;
    picker.setAttribute('aria-label', `${kind} rank measure`);
    picker.replaceChildren(...measures.map((m) => {
      const option = new Option(m, m);
      option.title = MEASURE_TITLES[m] ?? m;
      return option;
    }));
    picker.value = state.measure[kind];
    picker.addEventListener('change', () => selectMeasure(kind, picker.value));
    const label = document.createElement('label');
    label.className = 'measure-picker';
    const by = document.createElement('span');
    by.className = 'muted';
    by.textContent = 'by';
    label.append(by, picker);
    head.append(title, total, label);
    const table = document.createElement('table');
    table.className = 'ranks';
    table.dataset.testid = `ranks-${kind}`;
    table.innerHTML = '<thead><tr><th class="num">#</th><th>metric</th><th>feed</th><th class="num measure-head"></th></tr></thead><tbody></tbody>';
    table.addEventListener('click', (event) => {
      const row = event.target.closest('tr[data-metric]');
      if (row) selectMarket(marketOf(row.dataset.metric));
    });
    panel.append(head, table);
    panels.push(panel);
    const stats = document.createElement('div');
    stats.className = 'stats-row';
    stats.dataset.testid = `stats-${kind}`;
    els.stats.append(stats);
    els.kind[kind] = { table, picker, stats, total };
  }
  els.rankPanels.replaceChildren(...panels);
}

function watchSize() {
  const redraw = () => markDirty('charts');
  new ResizeObserver(redraw).observe(els.priceChart);
  new ResizeObserver(redraw).observe(els.volumeChart);
  new ResizeObserver(redraw).observe(els.turnoverChart);
  // Moving the window to a screen of another pixel ratio resizes nothing, so watch the ratio too.
  const watchRatio = () => {
    matchMedia(`(resolution: ${window.devicePixelRatio}dppx)`).addEventListener('change', () => {
      redraw();
      watchRatio();
    }, { once: true });
  };
  watchRatio();
}

function watchSearch() {
  els.search.addEventListener('input', onSearchInput);
  els.search.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') closeSearch();
    if (event.key === 'Enter') {
      const first = state.results?.markets[0]?.market;
      const typed = els.search.value.trim().toLowerCase();
      selectMarket(partsOf(typed) ? typed : first);
      closeSearch();
    }
  });
  els.search.addEventListener('blur', () => setTimeout(closeSearch, 200)); // after a click on a result
  els.results.addEventListener('mousedown', (event) => {
    const item = event.target.closest('li[data-market]');
    if (item) {
      selectMarket(item.dataset.market);
      closeSearch();
    }
  });
  els.quote.addEventListener('change', () => selectQuote(els.quote.value));
}

async function start() {
  window.addEventListener('unhandledrejection', (event) => console.warn('unhandled rejection', event.reason));
  watchSize();
  watchSearch();
  subscribe({ channel: 'alerts' });
  connect();
  setInterval(heartbeat, PING_EVERY_MS);
  loadAlerts();
  markDirty('charts', 'alerts', 'markets', 'feeds', 'status');

  await loadKinds();
  buildKinds();
  const quote = hashParam('quote');
  state.quote = quote && QUOTE_TEXT.test(quote) ? quote : null;
  els.quote.value = state.quote ?? '';
  for (const kind of kindNames()) subscribeRanks(kind);
  window.addEventListener('hashchange', () => {
    selectMarket(hashParam('market'));
    for (const { kind, default: preset } of state.kinds) selectMeasure(kind, hashParam(`${kind}_by`) ?? preset);
    selectQuote(hashParam('quote'));
  });
  const chosen = hashParam('market');
  if (partsOf(chosen)) selectMarket(chosen); // also starts the poll
  else pollMetrics(); // finds a market to show first
  markDirty('stats', 'ranks');
}

start();
