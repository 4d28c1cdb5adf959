// The console's entry point: keeps the state current (store.js) and draws it (board,
// activity, history), and turns a drop, a click or a key into a plan (plan.js).

import { api } from './api.js';
import { state, start, onChange, changed, report, recordMigration } from './store.js';
import { renderBoard } from './board.js';
import { enableDrag } from './drag.js';
import { propose, setupPlanDialog } from './plan.js';
import { setupOps, renderActivity } from './ops.js';
import { renderChart, renderEvents, renderFilter } from './history.js';
import { setupGames, renderGames } from './games.js';

const $ = (id) => document.getElementById(id);
let dragging = false;

/** Moves `vm` to `host`: the `place` goal's dry run first, executed on confirmation. */
function place(vm, host) {
  state.selected = null;
  changed();
  return propose({ goal: 'place', vm, host });
}

/** Drains `host`: the drain's dry run first; on confirmation the drain itself (which puts
 *  the host in maintenance and plans again from the cluster as it is then). */
function drain(host) {
  return propose({ goal: 'drain', host }, async (dry) => {
    const rec = await api.drain(host);
    if (rec.id !== dry.id) api.cancelPlan(dry.id).catch(() => {});
    return rec;
  });
}

const actions = {
  select(vm) {
    state.selected = vm && state.selected !== vm ? vm : null;
    changed();
  },
  placeSelected(host) {
    if (state.selected) place(state.selected, host);
  },
  drain,
  async undrain(host) {
    try { await api.undrain(host); } catch (e) { report(e); }
  },
  async protect(vm) {
    try { await api.protect(vm); changed(); } catch (e) { report(e); }
  },
  async unprotect(vm) {
    try { await api.unprotect(vm); changed(); } catch (e) { report(e); }
  },
  async cancelMigration(m) {
    try { recordMigration(await api.cancelMigration(m.id)); changed(); } catch (e) { report(e); }
  },
};

function draw() {
  const conn = $('conn');
  conn.dataset.state = state.conn;
  conn.textContent = { connecting: 'connecting…', live: 'live', lost: 'reconnecting…' }[state.conn];
  const notice = $('notice');
  notice.hidden = !state.notice;
  notice.textContent = state.notice ?? '';
  // A drag in progress keeps the board still; it catches up when the card is dropped.
  if (!dragging) renderBoard($('board'), actions);
  renderActivity($('activity'));
  renderGames();
  renderChart($('chart'));
  renderFilter($('event-subjects'));
  renderEvents($('events'), $('event-filter').value);
}

setupOps($('ops'));
setupGames($('games'));
setupPlanDialog();
enableDrag($('board'), {
  onDrop: place,
  onClick: (vm) => actions.select(vm),
  onDragChange: (on) => { dragging = on; if (!on) changed(); },
});
$('event-filter').addEventListener('input', () => renderEvents($('events'), $('event-filter').value));
$('notice').addEventListener('click', () => report(null));
document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && state.selected) actions.select(null); });
onChange(draw);
start();
