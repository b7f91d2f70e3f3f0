// Feed reports (the `feeds` of /api/metrics) in the dashboard's words; pure, so node can test it.

// "10 s" is STALE_AFTER_MS of tickstream_shared/feed_status.py, where the gateway decides `stale`.
export const FEED_TITLES = {
  live: 'feed live: the watcher reports data flowing from its source',
  reconnecting: 'feed reconnecting: the connection to the exchange is down and being re-established',
  finished: 'replay finished: the watcher has sent every candle it had',
  stale: 'feed stale: no watcher has reported this market for over 10 s',
  unknown: 'no feed report for this market',
};

/** A market's feed state as shown: the report's state, 'unknown' without one, null before any load. */
export function feedStateOf(feeds, market) {
  if (!feeds) return null;
  const state = feeds[market]?.state;
  return Object.hasOwn(FEED_TITLES, state) ? state : 'unknown';
}

/**
 * Where the data comes from, e.g. "live: binance, coinbase" or "replay · synthetic";
 * `stale` when no report is current (no watcher publishing). text is null without reports.
 */
export function sourceSummary(feeds) {
  const origins = new Map(); // source -> its origins (the exchanges, for live)
  let current = false;
  for (const report of Object.values(feeds ?? {})) {
    if (typeof report?.source !== 'string') continue;
    if (!origins.has(report.source)) origins.set(report.source, new Set());
    origins.get(report.source).add(String(report.origin));
    current ||= report.state !== 'stale';
  }
  if (origins.size === 0) return { text: null, stale: false };
  const parts = [...origins.keys()].sort().map((source) => (
    source === 'live' ? `live: ${[...origins.get(source)].sort().join(', ')}` : source
  ));
  return { text: parts.join(' · '), stale: !current };
}
