// The cluster as a board: one column per host (status, maintenance, memory and vCPU
// bars, its buttons), the VMs it runs as cards in it, and a dashed stand-in for each VM
// on its way in.

import { h, fill, keyed } from './dom.js';
import { mib } from './format.js';
import { makeCard, updateCard, makeIncoming, updateIncoming } from './card.js';
import { state, isFinal } from './store.js';

const NOWHERE = '~nowhere';
const cards = new Map();

/** The card of VM `name`, made once and moved between columns. */
function cardOf(name, actions) {
  if (!cards.has(name)) cards.set(name, makeCard(name, actions));
  return cards.get(name);
}

/** Brings the board in `root` up to date with the state. */
export function renderBoard(root, actions) {
  if (!state.hosts.length && !state.vms.length) {
    root.replaceChildren(h('p.hint', {}, 'No host yet: start the controller with --agent URL, or register one with POST /v1/hosts.'));
    return;
  }
  root.querySelector(':scope > p.hint')?.remove();
  const names = state.hosts.map((x) => x.name);
  const homeless = state.vms.filter((v) => !v.host || !names.includes(v.host));
  const cols = keyed(root, homeless.length ? [...names, NOWHERE] : names, (k) => makeColumn(k, actions));
  const incoming = [...state.migrations.values()].filter((m) => !isFinal(m));
  for (const host of state.hosts) {
    const col = cols.get(host.name);
    updateColumn(col, host, actions);
    const vms = state.vms.filter((v) => v.host === host.name).sort((a, b) => a.name.localeCompare(b.name));
    fillCards(col, vms, incoming.filter((m) => m.to === host.name), actions);
  }
  if (homeless.length) {
    const col = cols.get(NOWHERE);
    fill(col.parts.title, 'no host');
    for (const k of ['drain', 'undrain', 'here']) col.parts[k].hidden = true;
    for (const k of ['mem', 'cpu']) col.parts[k].el.hidden = true;
    fillCards(col, homeless, [], actions);
  }
  for (const [name, el] of cards) if (!state.vms.some((v) => v.name === name)) { el.remove(); cards.delete(name); }
}

function fillCards(col, vms, arriving, actions) {
  const keys = [...vms.map((v) => `vm:${v.name}`), ...arriving.map((m) => `in:${m.id}`)];
  const els = keyed(col.parts.list, keys, (k) => {
    if (k.startsWith('vm:')) return cardOf(k.slice(3), actions);
    const m = state.migrations.get(k.slice(3));
    return makeIncoming(m);
  });
  for (const v of vms) updateCard(els.get(`vm:${v.name}`), v, actions);
  for (const m of arriving) updateIncoming(els.get(`in:${m.id}`), m);
}

function makeColumn(name, actions) {
  const parts = {
    title: h('h3', {}, name),
    badges: h('div.badges'),
    mem: meter('memory'),
    cpu: meter('vCPUs'),
    facts: h('div.facts'),
    reason: h('p.reason'),
    drain: h('button.drain', { type: 'button', onclick: () => actions.drain(name) }, 'Drain…'),
    undrain: h('button.undrain', { type: 'button', onclick: () => actions.undrain(name) }, 'Undrain'),
    here: h('button.here.primary', { type: 'button', onclick: () => actions.placeSelected(name) }),
    list: h('div.vms'),
  };
  const col = h('section.host', { 'data-host': name, 'aria-label': `host ${name}` },
    h('header', {}, parts.title, parts.badges, parts.mem.el, parts.cpu.el, parts.facts, parts.reason,
      h('div.buttons', {}, parts.drain, parts.undrain, parts.here)),
    parts.list);
  col.parts = parts;
  return col;
}

function meter(label) {
  const fillEl = h('div.fill');
  const inEl = h('div.in');
  const text = h('span.text');
  const el = h('div.meter', { 'data-meter': label }, h('div.track', {}, fillEl, inEl), text);
  return { el, fillEl, inEl, text };
}

function setMeter(m, used, arriving, cap, text) {
  const pct = (x) => `${cap ? Math.min(100, (100 * x) / cap) : 0}%`;
  m.fillEl.style.width = pct(used);
  m.inEl.style.width = pct(arriving);
  m.el.classList.toggle('full', cap > 0 && used + arriving >= cap);
  m.text.textContent = text;
}

function updateColumn(col, host, actions) {
  const P = col.parts;
  col.dataset.status = host.status;
  col.dataset.maintenance = host.maintenance;
  fill(P.badges,
    h('span.badge', { 'data-status': host.status }, host.status),
    h('span.badge', { 'data-maintenance': host.maintenance }, host.maintenance.replace('_', ' ')));
  const mine = state.vms.filter((v) => v.host === host.name);
  const active = mine.filter((v) => ['starting', 'running', 'paused', 'migrating'].includes(v.state));
  const arrivingMib = [...state.migrations.values()]
    .filter((m) => !isFinal(m) && m.to === host.name)
    .reduce((s, m) => s + (state.vms.find((v) => v.name === m.vm)?.memory_mib ?? 0), 0);
  const usedMib = Math.max(0, host.used_mib - Math.min(arrivingMib, host.used_mib));
  setMeter(P.mem, usedMib, arrivingMib, host.capacity_mib,
    `${mib(host.used_mib)} of ${mib(host.capacity_mib)}${arrivingMib ? ` (${mib(arrivingMib)} arriving)` : ''}`);
  const vcpus = active.reduce((s, v) => s + v.vcpus, 0);
  setMeter(P.cpu, vcpus, 0, host.cpus, `${vcpus} vCPUs on ${host.cpus} CPUs`);
  fill(P.facts, host.cpu_model || '', host.status === 'down' && host.down_reason ? h('div.bad', {}, host.down_reason) : null);
  P.reason.textContent = host.maintenance_reason ?? '';
  P.reason.hidden = !host.maintenance_reason;
  P.drain.hidden = host.maintenance === 'draining' || host.maintenance === 'drained';
  P.undrain.hidden = host.maintenance === 'active';
  const sel = state.selected && state.vms.find((v) => v.name === state.selected);
  P.here.hidden = !sel || sel.host === host.name;
  P.here.textContent = sel ? `Move ${sel.name} here` : '';
}
