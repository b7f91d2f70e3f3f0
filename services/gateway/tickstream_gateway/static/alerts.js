// Alert states (provisional, confirmed, retracted) in the dashboard's words; pure, so node can test it.

export const ALERT_STATUS_TITLES = {
  provisional: 'raised on a forming minute: judged again when the minute closes',
  confirmed: 'the closed minute crosses the threshold',
  retracted: 'the closed minute does not cross the threshold: it never stood',
};

/** The alert's status as shown; a message from before statuses was never judged: provisional. */
export function alertStatus(alert) {
  return Object.hasOwn(ALERT_STATUS_TITLES, alert.status) ? alert.status : 'provisional';
}

/** Orders the states of one alert: the larger is the newer (status_seq, else the raising seq). */
export function alertVersion(alert) {
  return Number.isFinite(alert.status_seq) ? alert.status_seq : alert.seq;
}

/** Whether `alert` replaces `held`, the state of the same alert shown so far (none: it is new). */
export function supersedes(alert, held) {
  return !held || alertVersion(alert) > alertVersion(held);
}
