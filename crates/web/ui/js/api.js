// The controller's public API (docs/api/controller.json), by relative URLs: the page is
// served on the API's own origin, so the session cookie (HttpOnly, SameSite=Strict, set
// by the one-time login) travels with every request without the page knowing about it.

/** An error reply of the API: its sentence, its `kind`, and for an impossible goal the
 *  per-VM `blocked` reasons and the recorded `plan`. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error ?? `HTTP ${status}`);
    this.status = status;
    this.kind = body?.kind ?? 'other';
    this.blocked = body?.blocked ?? [];
    this.plan = body?.plan ?? null;
  }
}

async function call(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = { error: text }; }
  if (!r.ok) throw new ApiError(r.status, json);
  return json;
}

const enc = encodeURIComponent;

export const api = {
  cluster: () => call('GET', 'v1/cluster'),
  /** The last `n` events, oldest first (`GET /v1/events?tail=N`). */
  recentEvents: (n) => call('GET', `v1/events?tail=${n}`),
  migrations: () => call('GET', 'v1/migrations'),
  migration: (id) => call('GET', `v1/migrations/${enc(id)}`),
  cancelMigration: (id) => call('POST', `v1/migrations/${enc(id)}/cancel`),
  plans: () => call('GET', 'v1/plans'),
  plan: (id) => call('GET', `v1/plans/${enc(id)}`),
  /** A dry run: `goal` is `{goal: 'place', vm, host}`, `{goal: 'drain', host}`,
   *  `{goal: 'rebalance'}` or `{goal: 'consolidate'}`. */
  propose: (goal) => call('POST', 'v1/plans', goal),
  execute: (id) => call('POST', `v1/plans/${enc(id)}/execute`),
  cancelPlan: (id) => call('POST', `v1/plans/${enc(id)}/cancel`),
  drain: (host) => call('POST', `v1/hosts/${enc(host)}/drain`),
  undrain: (host) => call('POST', `v1/hosts/${enc(host)}/undrain`),
  walks: () => call('GET', 'v1/walks'),
  startWalk: (opts) => call('POST', 'v1/walks', opts),
  startChairs: (opts) => call('POST', 'v1/games/musical-chairs', opts),
  /** Stops a walk or any game (`POST /v1/walks/{id}/stop`). */
  stopWalk: (id) => call('POST', `v1/walks/${enc(id)}/stop`),
  /** Starts Scotland Yard (`ScotlandOptions`). */
  startScotland: (opts) => call('POST', 'v1/games/scotland-yard', opts),
  /** A player's detective move `{detective, to, link?}` in game `id`. */
  gameMove: (id, mv) => call('POST', `v1/games/${enc(id)}/move`, mv),
  /** Starts the Towers of Hanoi with nested VMs (`HanoiOptions`). */
  startHanoi: (opts) => call('POST', 'v1/games/hanoi', opts),
  /** The Towers of Hanoi's planned moves for `levels` levels (the planner only). */
  hanoiPlan: (levels) => call('GET', `v1/games/hanoi/plan?levels=${enc(levels)}`),
  /** Protects `vm`: checkpoints shipped to a replica host (the controller picks it). */
  protect: (vm, opts = {}) => call('POST', `v1/vms/${enc(vm)}/protect`, opts),
  unprotect: (vm) => call('DELETE', `v1/vms/${enc(vm)}/protect`),
  failovers: () => call('GET', 'v1/failovers'),
};

/** The event stream: `onEvent(event)` for each change, `onState('live' | 'lost')` as the
 *  connection comes and goes (the browser reconnects by itself). */
export function subscribe(onEvent, onState) {
  const es = new EventSource('v1/events', { withCredentials: true });
  es.onopen = () => onState('live');
  es.onerror = () => onState('lost');
  for (const subject of ['host', 'vm', 'plan', 'migration', 'walk', 'failover']) {
    es.addEventListener(subject, (m) => {
      try { onEvent(JSON.parse(m.data)); } catch (e) { console.warn('bad event', e); }
    });
  }
  return es;
}
