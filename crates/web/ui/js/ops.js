// Operations on the whole cluster (rebalance and consolidate dry runs, a walk, musical
// chairs), and what runs now: plans (with cancel) and games (with stop).

import { h, fill, keyed } from './dom.js';
import { ms, ago } from './format.js';
import { api } from './api.js';
import { state, report, refreshWalks } from './store.js';
import { propose, follow, describe } from './plan.js';

/** Fills the top bar's buttons. */
export function setupOps(nav) {
  const duration = h('input', { type: 'number', min: 5, value: 60, id: 'game-seconds', 'aria-label': 'game duration, seconds' });
  const opts = () => ({ duration_ms: Math.max(5, Number(duration.value) || 60) * 1000, parallel: 1, pause_ms: 1000 });
  const game = (start) => async () => {
    try {
      await start(opts());
      refreshWalks();
    } catch (e) {
      report(e);
    }
  };
  fill(nav,
    h('button', { type: 'button', id: 'op-rebalance', onclick: () => propose({ goal: 'rebalance' }) }, 'Rebalance…'),
    h('button', { type: 'button', id: 'op-consolidate', onclick: () => propose({ goal: 'consolidate' }) }, 'Consolidate…'),
    h('span.sep'),
    h('button', { type: 'button', id: 'op-walk', onclick: game(api.startWalk) }, 'Start a walk'),
    h('button', { type: 'button', id: 'op-chairs', onclick: game(api.startChairs) }, 'Musical chairs'),
    h('label', {}, duration, ' s'));
}

/** Shows the plans that run and the games, each with its button. */
export function renderActivity(root) {
  const plans = state.runningPlans.map((id) => state.plans.get(id) ?? { id, goal: null, status: 'running', steps: [] });
  const walks = [...state.walks].sort((a, b) => b.started_ms - a.started_ms).slice(0, 5);
  if (!plans.length && !walks.length) {
    root.hidden = true;
    return;
  }
  root.hidden = false;
  if (!root.lists) {
    root.lists = { plans: h('ul.plans'), walks: h('ul.walks') };
    fill(root, h('h2', {}, 'Under way'), root.lists.plans, root.lists.walks);
  }
  const pEls = keyed(root.lists.plans, plans.map((p) => p.id), (id) => h('li', { 'data-plan': id }));
  for (const p of plans) {
    const done = p.steps.filter((s) => s.status === 'completed').length;
    const todo = p.steps.filter((s) => s.round === p.round && s.status !== 'superseded').length;
    fill(pEls.get(p.id),
      h('button.link', { type: 'button', onclick: () => follow(p.id) }, `${p.id}: ${describe(p.goal)}`),
      ` · ${p.status} · ${done}/${todo} steps `,
      h('button', { type: 'button', onclick: () => api.cancelPlan(p.id).catch(report) }, 'Cancel'));
  }
  const wEls = keyed(root.lists.walks, walks.map((w) => w.id), (id) => h('li', { 'data-walk': id }));
  for (const w of walks) {
    const hops = w.hops.length;
    const downs = w.hops.filter((x) => typeof x.downtime_ms === 'number').map((x) => x.downtime_ms);
    fill(wEls.get(w.id),
      `${w.id}: ${w.kind.replace('_', ' ')} · ${w.status} · ${hops} hop(s)`,
      downs.length ? ` · worst downtime ${ms(Math.max(...downs))}` : '',
      w.rounds?.length ? ` · round ${w.rounds.length}` : '',
      ` · started ${ago(w.started_ms)}`,
      w.result ? h('div.reason', {}, w.result) : '',
      w.status === 'running' ? h('button', { type: 'button', onclick: () => api.stopWalk(w.id).then(refreshWalks).catch(report) }, 'Stop') : '');
  }
}
