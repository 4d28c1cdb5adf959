// What the page knows of the cluster, and how it stays current: the event stream says
// what changed, and the page reads the API again for it (plus a slow poll for what
// changes without an event: heartbeats, a migration's progress, a walk's hops).

import { api, subscribe } from './api.js';

const EVENTS_KEPT = 500;
const PRELOAD = 200;
const CLUSTER_POLL_MS = 2000;
const MIGRATION_POLL_MS = 400;

export const state = {
  hosts: [],
  vms: [],
  runningPlans: [],
  limits: null,
  /** Every migration the controller ordered, by id (ClusterMigration). */
  migrations: new Map(),
  /** Per migration id: pass (iteration) -> bytes remaining, as last seen in that pass. */
  passes: new Map(),
  walks: [],
  /** Plans the page has seen, by id (PlanRecord). */
  plans: new Map(),
  /** The latest events, oldest first. */
  events: [],
  /** The VM chosen for a keyboard move (or null). */
  selected: null,
  /** The event stream: 'connecting', 'live' or 'lost'. */
  conn: 'connecting',
  /** The last error to show, if any. */
  notice: null,
};

export const FINAL_PHASES = new Set(['completed', 'failed', 'cancelled']);
export const isFinal = (m) => FINAL_PHASES.has(m.phase);

const listeners = new Set();
let scheduled = false;

/** Calls `f(state)` after every change (coalesced). */
export function onChange(f) { listeners.add(f); }

/** Marks the state changed: listeners run once, shortly. */
export function changed() {
  if (scheduled) return;
  scheduled = true;
  setTimeout(() => {
    scheduled = false;
    for (const f of listeners) f(state);
  }, 0);
}

/** Shows `e` (an ApiError or a sentence) in the notice line. */
export function report(e) {
  state.notice = e ? (typeof e === 'string' ? e : e.message) : null;
  changed();
}

/** One run of `fn` at a time; a call during a run asks for one more run after it. */
function coalesced(fn) {
  let running = false;
  let again = false;
  return async function run() {
    if (running) { again = true; return; }
    running = true;
    try {
      do { again = false; await fn(); } while (again);
    } catch (e) {
      console.warn(e);
    } finally {
      running = false;
    }
  };
}

/** Records a migration as read from the API or an event, with its pass's remaining bytes. */
export function recordMigration(m) {
  if (!m || !m.id) return;
  state.migrations.set(m.id, m);
  if (isFinal(m)) {
    state.passes.delete(m.id);
    return;
  }
  const p = m.progress;
  if (p && (p.total_bytes > 0 || p.remaining_bytes > 0)) {
    if (!state.passes.has(m.id)) state.passes.set(m.id, new Map());
    state.passes.get(m.id).set(p.iteration, p.remaining_bytes);
  }
}

/** The migration of `vm` under way, if any. */
export function inFlightOf(vm) {
  for (const m of state.migrations.values()) if (m.vm === vm && !isFinal(m)) return m;
  return null;
}

/** The last finished migration of `vm`, if any. */
export function lastHopOf(vm) {
  let last = null;
  for (const m of state.migrations.values()) {
    if (m.vm === vm && isFinal(m) && (!last || (m.finished_ms ?? 0) >= (last.finished_ms ?? 0))) last = m;
  }
  return last;
}

export const refreshCluster = coalesced(async () => {
  const c = await api.cluster();
  state.hosts = c.hosts;
  state.vms = c.vms;
  state.runningPlans = c.running_plans;
  state.limits = c.limits;
  for (const id of c.running_plans) if (!state.plans.has(id)) refreshPlan(id);
  changed();
});

export const refreshMigrations = coalesced(async () => {
  for (const m of await api.migrations()) recordMigration(m);
  changed();
});

export const refreshWalks = coalesced(async () => {
  state.walks = await api.walks();
  changed();
});

async function refreshPlan(id) {
  try {
    state.plans.set(id, await api.plan(id));
    changed();
  } catch (e) {
    console.warn(e);
  }
}

const pollInFlight = coalesced(async () => {
  const live = [...state.migrations.values()].filter((m) => !isFinal(m));
  await Promise.all(live.map(async (m) => {
    try { recordMigration(await api.migration(m.id)); } catch (e) { console.warn(e); }
  }));
  if (live.length) changed();
});

function addEvents(evs) {
  const seen = new Set(state.events.map((e) => e.seq));
  const fresh = evs.filter((e) => !seen.has(e.seq)).map(({ seq, at_ms, subject, name, message }) => ({ seq, at_ms, subject, name, message }));
  state.events = state.events.concat(fresh).sort((a, b) => a.seq - b.seq).slice(-EVENTS_KEPT);
}

function onEvent(ev) {
  addEvents([ev]);
  switch (ev.subject) {
    case 'migration':
      if (ev.data && ev.data.id) recordMigration(ev.data);
      refreshCluster();
      break;
    case 'plan':
      if (ev.data && ev.data.id) state.plans.set(ev.data.id, ev.data);
      else refreshPlan(ev.name);
      refreshCluster();
      break;
    case 'walk':
      refreshWalks();
      break;
    default:
      refreshCluster();
  }
  changed();
}

/** Fills the events table with the last events at page load (`?tail=`), so it starts
 *  with the cluster's recent history however quiet the cluster is. */
async function preloadEvents() {
  try {
    addEvents(await api.recentEvents(PRELOAD));
    changed();
  } catch (e) {
    console.warn('event preload', e);
  }
}

/** Starts keeping the state current. */
export function start() {
  const everything = () => Promise.all([refreshCluster(), refreshMigrations(), refreshWalks()]);
  subscribe(onEvent, (conn) => {
    const back = conn === 'live' && state.conn !== 'live';
    state.conn = conn;
    if (back) everything();
    changed();
  });
  everything();
  preloadEvents();
  setInterval(refreshCluster, CLUSTER_POLL_MS);
  setInterval(pollInFlight, MIGRATION_POLL_MS);
  setInterval(() => { if (state.walks.some((w) => w.status === 'running')) refreshWalks(); }, CLUSTER_POLL_MS);
}
