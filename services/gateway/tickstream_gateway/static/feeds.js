// Feed reports (`feeds` and `origins` of /api/metrics) in the dashboard's words; pure, so node
// can test it. The states and their order are decided by the gateway (tickstream_shared
// feed_status.py): this file only names and colours them.

// "10 s" is STALE_AFTER_MS of tickstream_shared/feed_status.py, where the gateway decides `stale`.
export const FEED_TITLES = {
  connecting: 'connecting: no data from this feed yet since the watcher started',
  live: 'live: connected, data flowing',
  reconnecting: 'reconnecting: the connection was lost and is being re-established',
  unreachable: 'unreachable: connecting has failed for a while; the exchange cannot be reached',
  stale: "stale: silent while its exchange's other markets update, or no watcher has reported it for over 10 s",
  finished: 'finished: the replay has sent every candle it had',
  unknown: 'no feed report',
};

const SOURCE_TITLES = {
  replay: 'recorded candles replayed, not live market data',
  synthetic: 'a random walk made up by the watcher, not market data',
};

// Green is for live exchange data only; a replay or the random walk is never shown green.
const TONES = {
  live: 'good',
  connecting: 'warn',
  reconnecting: 'warn',
  stale: 'warn',
  unreachable: 'bad',
  finished: 'neutral',
  unknown: 'muted',
};

const stateOf = (report) => (Object.hasOwn(FEED_TITLES, report?.state) ? report.state : 'unknown');

/**
 * How a report, or an origin's summary (both have `source` and `state`), is shown:
 * {state, text, tone, title}. Live exchange data is named by its state ("live",
 * "unreachable"); other data by its kind first ("replay", "synthetic stale"), never green.
 */
export function feedBadge(report) {
  const state = stateOf(report);
  if (state === 'unknown') return { state, text: 'unknown', tone: TONES.unknown, title: FEED_TITLES.unknown };
  if (report.source === 'live') return { state, text: state, tone: TONES[state], title: FEED_TITLES[state] };
  const kind = Object.hasOwn(SOURCE_TITLES, report.source) ? report.source : 'unknown source';
  const about = `${kind}: ${SOURCE_TITLES[kind] ?? 'not live market data'}`;
  if (state === 'live') return { state, text: kind, tone: 'neutral', title: `${about}; data flowing` };
  return { state, text: `${kind} ${state}`, tone: TONES[state], title: `${about}; ${FEED_TITLES[state]}` };
}

/** A market's badge: from its report, `unknown` without one; null before any load. */
export function feedBadgeOf(feeds, market) {
  if (!feeds) return null;
  return feedBadge(Object.hasOwn(feeds, market) ? feeds[market] : null);
}

const isObject = (value) => value !== null && typeof value === 'object';

/**
 * A rank row's badge: its market's report when one was loaded (the selected market's), else
 * the summary of the market's origin (its exchange, or `replay`/`synthetic`): the dashboard
 * loads the reports of the markets it shows in detail only. The summary is the worst of its
 * markets' states, so a row is never shown greener than its market's feed. Null before any
 * load.
 */
export function rowBadge(feeds, origins, market) {
  if (!feeds && !origins) return null;
  if (isObject(feeds) && Object.hasOwn(feeds, market)) return feedBadge(feeds[market]);
  const origin = String(market).split(':', 1)[0];
  const summary = isObject(origins) && Object.hasOwn(origins, origin) ? origins[origin] : null;
  if (!isObject(summary)) return feedBadge(null);
  const badge = feedBadge(summary);
  return { ...badge, title: `${origin}: ${badge.title} (the exchange's state)` };
}

/** The origins with a summary, sorted by name: [[origin, summary], ...]. */
function originList(origins) {
  return Object.entries(isObject(origins) ? origins : {})
    .filter(([, summary]) => isObject(summary))
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

/** "3 live, 1 unreachable": an origin's markets per state, as the gateway counted them. */
function marketCounts(summary) {
  const counts = Object.entries(isObject(summary.markets) ? summary.markets : {});
  return counts.map(([state, n]) => `${n} ${state}`).join(', ');
}

/**
 * One badge per origin (exchange, replay, synthetic), by name: "binance live",
 * "kraken unreachable", "replay", "synthetic stale". Each is {origin, state, text, tone, title}.
 */
export function originBadges(origins) {
  return originList(origins).map(([origin, summary]) => {
    const badge = feedBadge(summary);
    const text = summary.source === 'live' ? `${origin} ${badge.text}` : badge.text;
    const counts = marketCounts(summary);
    return { origin, ...badge, text, title: `${origin}: ${badge.title}${counts ? ` (markets: ${counts})` : ''}` };
  });
}

/** Whether any market of the origin is live (its summary's state is the worst of them). */
const flows = (summary) => Number(isObject(summary.markets) ? summary.markets.live : 0) > 0;

/** "binance: unreachable, coinbase: reconnecting". */
const describe = (list) => list.map(([origin, summary]) => `${origin}: ${stateOf(summary)}`).join(', ');

/**
 * The connection indicator while the WebSocket is open: {state, text, title}. `connected`
 * (green) only when some market's feed is live; otherwise it says why no data comes:
 * `down` (red) when every origin is unreachable, `finished` when every replay is done,
 * `waiting` (amber) otherwise. `origins` is null before the first load.
 */
export function openStatus(origins) {
  if (!isObject(origins)) return { state: 'waiting', text: 'waiting for data', title: 'connected; loading the feeds' };
  const list = originList(origins);
  if (list.length === 0) {
    return { state: 'waiting', text: 'no data', title: 'connected, but no watcher reports any feed' };
  }
  const states = list.map(([, summary]) => stateOf(summary));
  const why = describe(list);
  if (list.some(([, summary]) => flows(summary))) return { state: 'connected', text: 'connected', title: why };
  if (states.every((s) => s === 'finished')) return { state: 'finished', text: 'replay finished', title: why };
  if (states.every((s) => s === 'unreachable')) return { state: 'down', text: 'unreachable', title: why };
  return { state: 'waiting', text: 'no live data', title: why };
}

/**
 * Why the page has no statistics, or null when it has some (or before the first load):
 * "Waiting for data from binance: unreachable".
 */
export function emptyState(origins, metricCount) {
  if (metricCount > 0 || !isObject(origins)) return null;
  const list = originList(origins);
  if (list.length === 0) return 'No data: no watcher reports any feed (is the watcher running?).';
  const flowing = list.filter(([, summary]) => flows(summary));
  if (flowing.length > 0) {
    return `Data is arriving from ${flowing.map(([origin]) => origin).join(', ')}: statistics appear once the stats service has processed it.`;
  }
  return `Waiting for data from ${describe(list)}.`;
}
