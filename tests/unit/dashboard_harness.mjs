// Runs the dashboard's app.js in node against a stand-in DOM, WebSocket and fetch, and prints
// what it shows. argv[2]: {"open": bool, "metrics": <every /api/metrics?… body>, "ranks": [...],
// "own": [...], "search": [...], "kinds": {...}, "frames": [...]} (`ranks`, `own`: the price ranks
// frame the socket delivers once open; `frames`: more frames delivered after it; `kinds`: the
// /api/kinds body; `search`: texts typed into the search box one after another, each left to
// settle).
// Run by tests/unit/test_gateway_dashboard.py from a folder holding app.js, feeds.js and alerts.js.

const scenario = JSON.parse(process.argv[2]);

/** Just enough of an element for app.js: what it sets is kept, what it draws is dropped. */
class El {
  constructor(tag = 'div') {
    this.tagName = tag;
    this.dataset = {};
    this.children = [];
    this.textContent = '';
    this.title = '';
    this.hidden = false;
    this.className = '';
    this.value = '';
    this.options = [];
    this.style = {};
    this.clientWidth = 300;
    this.clientHeight = 100;
    this.width = 0;
    this.height = 0;
    this.colSpan = 1;
    this.tBodies = tag === 'table' ? [new El('tbody')] : [];
    this.found = new Map();
    this.listeners = new Map();
    this.fills = 0; // fillRect calls on a canvas since its last clear: the bars of its last draw
  }

  get classList() { return { toggle() {}, add() {}, remove() {}, contains: () => false }; }

  get firstElementChild() { return this.children[0] ?? null; }

  querySelector(selector) {
    if (!this.found.has(selector)) this.found.set(selector, new El());
    return this.found.get(selector);
  }

  replaceChildren(...nodes) { this.children = nodes; }

  append(...nodes) { this.children.push(...nodes); }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  dispatch(type, event = {}) {
    for (const listener of this.listeners.get(type) ?? []) listener({ target: this, ...event });
  }

  setAttribute() {}

  remove() {}

  insertBefore() {}

  getContext() {
    const ignore = () => {};
    return new Proxy({}, {
      get: (held, key) => {
        if (key in held) return held[key];
        if (key === 'measureText') return () => ({ width: 10 });
        if (key === 'fillRect') return () => { this.fills += 1; };
        if (key === 'clearRect') return () => { this.fills = 0; }; // each draw starts with it
        return ignore;
      },
      set: (held, key, value) => { held[key] = value; return true; },
    });
  }
}

const byTestId = new Map();
globalThis.document = {
  querySelector(selector) {
    const id = /data-testid="([^"]+)"/.exec(selector)[1];
    if (!byTestId.has(id)) byTestId.set(id, new El(id.startsWith('ranks-') ? 'table' : 'div'));
    return byTestId.get(id);
  },
  createElement: (tag) => new El(tag),
  createDocumentFragment: () => new El('fragment'),
  body: new El('body'),
  documentElement: new El('html'),
};
globalThis.location = { protocol: 'http:', host: 'gateway', search: '', hash: '' };
globalThis.window = { addEventListener() {}, history: { replaceState() {} }, devicePixelRatio: 1 };
globalThis.getComputedStyle = () => ({ getPropertyValue: () => '' });
globalThis.Option = class extends El {
  constructor(text, value) {
    super('option');
    this.textContent = text;
    this.value = value;
  }
};
globalThis.ResizeObserver = class { observe() {} };
globalThis.matchMedia = () => ({ addEventListener() {} });
const frames = [];
globalThis.requestAnimationFrame = (render) => frames.push(render);
const sockets = [];
globalThis.WebSocket = class {
  static OPEN = 1;

  constructor() {
    this.readyState = 0;
    sockets.push(this);
  }

  send() {}

  close() {}
};
const KINDS = {
  kinds: [
    { kind: 'price', measures: ['std', 'cv', 'logret'], default: 'logret' },
    { kind: 'volume', measures: ['std', 'cv'], default: 'cv' },
  ],
};
const fetched = [];
globalThis.fetch = async (url) => {
  fetched.push(url);
  let body = { alerts: [] };
  if (url === '/api/kinds') body = scenario.kinds ?? KINDS;
  else if (url.startsWith('/api/metrics?')) body = scenario.metrics;
  else if (url.startsWith('/api/metrics/')) body = { values: [] };
  return { ok: true, status: 200, json: async () => body };
};

/** The element with data-testid `id` under `root` (the page's, or one app.js made). */
function findTestId(root, id) {
  if (root.dataset?.testid === id) return root;
  for (const child of root.children ?? []) {
    const found = child instanceof El ? findTestId(child, id) : null;
    if (found) return found;
  }
  return null;
}

/** Lets the fetches resolve, then renders the frames they asked for. */
async function settle() {
  for (let i = 0; i < 20; i += 1) await new Promise((resolve) => setImmediate(resolve));
  while (frames.length > 0) frames.shift()();
}

function status() {
  const el = byTestId.get('status');
  return { state: el.dataset.state, text: el.querySelector('.status-text').textContent, title: el.title };
}

await import('./app.js');
await settle();
const shown = { before_open: status() };
const sent = [];
if (scenario.open) {
  sockets[0].readyState = 1;
  sockets[0].send = (text) => sent.push(JSON.parse(text));
  sockets[0].onopen();
  await settle();
  const frame = (msg) => sockets[0].onmessage({ data: JSON.stringify(msg) });
  frame({ type: 'subscribed', channel: 'ranks', kind: 'price', by: 'logret', limit: 15 });
  const ranks = scenario.ranks ?? [];
  frame({ type: 'ranks', kind: 'price', by: 'logret', total: ranks.length, ranks, own: scenario.own ?? [] });
  await settle();
  for (const msg of scenario.frames ?? []) frame(msg);
  await settle();
}
shown.status = status();
const empty = byTestId.get('empty-state');
shown.empty = empty.hidden ? null : empty.textContent;
shown.origins = byTestId.get('feed-origins').children.map((badge) => [badge.textContent, badge.dataset.tone]);
const rows = findTestId(byTestId.get('rank-panels'), 'ranks-price').tBodies[0].children[0]?.children ?? [];
// A table without ranks has one row of a single cell saying so.
shown.rank_feeds = rows
  .filter((tr) => tr.children.length === 4)
  .map((tr) => tr.children[2].children.map((b) => [b.textContent, b.dataset.tone]));
shown.searches = [];
for (const text of scenario.search ?? []) {
  const box = byTestId.get('market-search');
  box.value = text;
  box.dispatch('input');
  await new Promise((resolve) => setTimeout(resolve, 300)); // past the typing pause
  await settle();
  const results = byTestId.get('market-results');
  shown.searches.push({ hidden: results.hidden, items: results.children.map((li) => li.textContent) });
}
/** Every text under `el`, depth first. */
const texts = (el) => [el.textContent, ...(el.children ?? []).flatMap((c) => (c instanceof El ? texts(c) : [String(c)]))].filter(Boolean);
shown.tables = {};
shown.stats = {};
for (const kind of (scenario.kinds ?? KINDS).kinds.map((k) => k.kind)) {
  const table = findTestId(byTestId.get('rank-panels'), `ranks-${kind}`);
  shown.tables[kind] = (table?.tBodies[0].children[0]?.children ?? []).map((tr) => tr.dataset.metric ?? tr.className);
  shown.stats[kind] = texts(findTestId(byTestId.get('stats'), `stats-${kind}`) ?? new El());
}
shown.bars_drawn = Object.fromEntries(['price', 'volume', 'turnover'].map((name) => [name, byTestId.get(`${name}-chart`).fills]));
shown.rank_rows = rows.map((tr) => tr.children.length === 4 ? tr.children[1].textContent : tr.className);
shown.fetched = fetched;
shown.sent = sent;
console.log(JSON.stringify(shown));
process.exit(0); // the polls and the heartbeat would keep node running
