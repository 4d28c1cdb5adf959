// The plan dialog: a goal's dry run (each step, its wave and round, its reason,
// temporary moves marked), or why no plan exists (per VM); "Run it" executes it, and the
// dialog then follows the plan until it ends.

import { h, fill } from './dom.js';
import { ms } from './format.js';
import { api } from './api.js';
import { state, onChange, report } from './store.js';

const dialog = () => document.getElementById('plan-dialog');

/** What the dialog shows: the plan's id, how to run it, or an error. */
const shown = { id: null, run: null, error: null, title: '' };

export function describe(goal) {
  switch (goal?.goal) {
    case 'drain': return `drain ${goal.host}`;
    case 'place': return `move ${goal.vm} to ${goal.host}`;
    case 'rebalance': return 'rebalance';
    case 'consolidate': return 'consolidate';
    default: return 'plan';
  }
}

/** Asks for `goal`'s dry run and shows it; `run(plan)` executes it on confirmation and
 *  returns the plan to follow (default: execute the proposed plan). */
export async function propose(goal, run = (p) => api.execute(p.id)) {
  open(`Planning: ${describe(goal)}…`);
  try {
    const p = await api.propose(goal);
    state.plans.set(p.id, p);
    show(p.id, run);
  } catch (e) {
    showError(describe(goal), e);
  }
}

/** Shows plan `id` (no confirmation: it runs or ran already). */
export function follow(id) {
  open('Plan');
  show(id, null);
}

/** Shows a refusal of `what`: its sentence and, for an impossible goal, each VM's reason. */
export function showError(what, e) {
  shown.id = null;
  shown.run = null;
  shown.error = e;
  shown.title = what;
  render();
  if (!dialog().open) dialog().showModal();
}

function open(title) {
  shown.id = null;
  shown.run = null;
  shown.error = null;
  shown.title = title;
  render();
  if (!dialog().open) dialog().showModal();
}

function show(id, run) {
  shown.id = id;
  shown.run = run;
  shown.error = null;
  render();
}

function render() {
  const d = dialog();
  const body = document.getElementById('plan-body');
  const confirm = document.getElementById('plan-confirm');
  const cancel = document.getElementById('plan-cancel');
  const p = shown.id ? state.plans.get(shown.id) : null;
  if (shown.error) {
    const e = shown.error;
    d.dataset.planStatus = 'refused';
    fill(document.getElementById('plan-title'), `Refused: ${shown.title}`);
    fill(body, h('p.error', {}, e.message), blocked(e.blocked ?? []));
    confirm.hidden = true;
    cancel.hidden = true;
    return;
  }
  if (!p) {
    d.dataset.planStatus = 'planning';
    fill(document.getElementById('plan-title'), shown.title);
    fill(body, h('p', {}, 'Asking the planner…'));
    confirm.hidden = true;
    cancel.hidden = true;
    return;
  }
  d.dataset.planStatus = p.status;
  d.dataset.planId = p.id;
  fill(document.getElementById('plan-title'), `${p.id}: ${describe(p.goal)}`);
  const current = p.steps.filter((s) => s.round === p.round);
  const waves = new Set(current.map((s) => s.wave)).size;
  fill(body,
    h('p.status', { 'data-plan-status': p.status }, h('span.badge', { 'data-plan': p.status }, p.status),
      p.status === 'proposed' ? ` · a dry run: ${current.length} migration(s) in ${waves} wave(s)` : '',
      p.status === 'proposed' && p.lower_bound ? ` · no plan needs fewer than ${p.lower_bound}${p.optimal ? ' (this one is minimal)' : ''}` : '',
      p.round ? ` · re-planned ${p.round} time(s)` : ''),
    p.reason ? h('p.reason', {}, p.reason) : null,
    p.steps.length ? steps(p) : (p.status === 'impossible' ? null : h('p.nothing', {}, 'Nothing to move: the goal already holds.')),
    blocked(p.blocked ?? []),
    (p.problems ?? []).length ? h('div.problems', {}, h('h3', {}, 'Problems'), h('ul', {}, p.problems.map((x) => h('li', { 'data-vm': x.vm }, h('b', {}, x.vm), `: ${x.reason}`)))) : null);
  // An empty plan has nothing to run, except a drain's (it still takes the host out).
  confirm.hidden = !(p.status === 'proposed' && shown.run && (current.length || p.goal?.goal === 'drain'));
  cancel.hidden = !(p.status === 'proposed' || p.status === 'running');
}

function steps(p) {
  return h('table.steps', {},
    h('thead', {}, h('tr', {}, ['round', 'wave', 'VM', 'move', 'why', 'status', 'downtime'].map((c) => h('th', {}, c)))),
    h('tbody', {}, p.steps.map((s, i) => {
      const temporary = p.target && p.target[s.vm] !== undefined && p.target[s.vm] !== s.to;
      return h('tr', { 'data-step': i, 'data-vm': s.vm, 'data-status': s.status, class: temporary ? 'temporary' : '' },
        h('td', {}, s.round), h('td', {}, s.wave), h('td', {}, h('b', {}, s.vm)),
        h('td', {}, `${s.from} → ${s.to}`, temporary ? h('span.tag', { title: `${s.vm} ends on ${p.target[s.vm]}` }, 'temporary') : ''),
        h('td', {}, s.why, s.reason ? h('div.reason', {}, s.reason) : ''),
        h('td', {}, s.status), h('td', {}, s.downtime_ms != null ? ms(s.downtime_ms) : ''));
    })));
}

function blocked(list) {
  if (!list.length) return null;
  return h('div.blocked', {}, h('h3', {}, 'Why no plan exists'),
    h('ul', {}, list.map((b) => h('li', { 'data-vm': b.vm }, h('b', {}, b.vm), ` needs ${b.needs}: ${b.why}`))));
}

/** Wires the dialog's buttons and keeps it current. */
export function setupPlanDialog() {
  const d = dialog();
  document.getElementById('plan-confirm').addEventListener('click', async () => {
    const p = state.plans.get(shown.id);
    if (!p || !shown.run) return;
    const run = shown.run;
    shown.run = null;
    render();
    try {
      const next = await run(p);
      if (next?.id) {
        state.plans.set(next.id, next);
        show(next.id, null);
      }
    } catch (e) {
      showError(describe(p.goal), e);
    }
  });
  document.getElementById('plan-cancel').addEventListener('click', async () => {
    if (!shown.id) return;
    try {
      state.plans.set(shown.id, await api.cancelPlan(shown.id));
      render();
    } catch (e) {
      report(e);
    }
  });
  document.getElementById('plan-close').addEventListener('click', () => d.close());
  d.addEventListener('close', () => {
    // A dry run nobody ran is dropped, so it does not linger as proposed.
    const p = shown.id && state.plans.get(shown.id);
    if (p && p.status === 'proposed') api.cancelPlan(p.id).then((x) => state.plans.set(x.id, x)).catch(() => {});
    shown.id = null;
  });
  onChange(() => { if (d.open) render(); });
}
