// A VM as a card: its state, size, workload, heartbeat, disks and NICs (whatever the API
// lists), and its migration, live or last.

import { h, fill } from './dom.js';
import { mib, bytes, summary, ago } from './format.js';
import { renderProgress, renderHop } from './progress.js';
import { state, inFlightOf, lastHopOf } from './store.js';

/** A new, empty card for VM `name`; `actions.select(name)` toggles the keyboard choice. */
export function makeCard(name, actions) {
  const el = h('article.vm', { 'data-vm': name, tabindex: 0, role: 'button', 'aria-pressed': 'false' });
  el.parts = {
    head: h('header', {}, h('span.name', {}, name), h('span.state')),
    facts: h('div.facts'),
    heart: h('div.heartbeat'),
    devices: h('div.devices'),
    guard: h('div.protection'),
    live: h('div.progress', { 'aria-live': 'polite' }),
    hop: h('div.last'),
  };
  el.append(...Object.values(el.parts));
  el.addEventListener('keydown', (e) => {
    if (e.target !== el) return;
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); actions.select(name); }
    if (e.key === 'Escape') actions.select(null);
  });
  return el;
}

/** Brings the card of `vm` (a ClusterVm) up to date. */
export function updateCard(el, vm, actions) {
  const P = el.parts;
  el.dataset.state = vm.state;
  el.classList.toggle('selected', state.selected === vm.name);
  el.setAttribute('aria-pressed', String(state.selected === vm.name));
  el.setAttribute('aria-label', `VM ${vm.name}, ${vm.state} on ${vm.host ?? 'no host'}`);
  const st = P.head.querySelector('.state');
  st.textContent = vm.state;
  st.dataset.state = vm.state;
  fill(P.facts, `${mib(vm.memory_mib)} · ${vm.vcpus} vCPU · ${vm.workload}`, vm.reason ? h('div.reason', {}, vm.reason) : null);
  const g = vm.guest ?? {};
  const healthy = g.seq_breaks === 0 && g.corrupt_pages === 0 && !g.kernel_trouble && !(g.alerts ?? []).length;
  el.classList.toggle('unhealthy', !healthy);
  fill(P.heart,
    h('span.beat', { 'data-seq': g.last_seq ?? '' }, g.ready ? `♥ ${g.last_seq ?? '–'}` : 'booting'),
    ` · ${g.seq_breaks ?? 0} breaks · ${g.corrupt_pages ?? 0} corrupt`,
    g.kernel_trouble ? h('b.bad', {}, ' · kernel trouble') : null,
    (g.alerts ?? []).length ? h('div.bad', {}, g.alerts.at(-1)) : null);
  fill(P.devices, devices('disk', vm.disks ?? vm.spec?.disks), devices('nic', vm.nics ?? vm.spec?.nics));
  fill(P.guard, ...protection(vm, actions));
  const m = inFlightOf(vm.name);
  P.live.hidden = !m;
  if (m) renderProgress(P.live, m, state.passes.get(m.id), actions.cancelMigration);
  const last = lastHopOf(vm.name);
  P.hop.hidden = !!m || !last;
  if (last && !m) renderHop(P.hop, last);
}

/** The VM's protection: its replica host and its last checkpoint shipped there (the age
 *  is the recovery point if its host died now), with the button that turns it on or off. */
function protection(vm, actions) {
  const p = vm.protection;
  const st = vm.protection_status ?? {};
  if (!p) {
    const on = vm.state === 'running' ? h('button.protect', { type: 'button', onclick: () => actions.protect(vm.name) }, 'Protect') : null;
    return [h('span.unprotected', {}, 'not protected'), on];
  }
  const last = st.last;
  const shipped = last ? `checkpoint ${last.n} ${ago(last.taken_ms)}${last.shipped_bytes != null ? `, ${bytes(last.shipped_bytes)} shipped` : ''}` : 'no checkpoint yet';
  return [
    h('span.replica', { 'data-replica': p.replica }, `⛨ replica ${p.replica} · ${st.checkpoints ?? 0} checkpoints · ${shipped}`),
    st.last_error ? h('div.bad', {}, st.last_error) : null,
    st.fenced_ms ? h('div.bad', {}, `fenced ${ago(st.fenced_ms)}`) : null,
    h('button.unprotect', { type: 'button', onclick: () => actions.unprotect(vm.name) }, 'Unprotect'),
  ];
}

function devices(kind, list) {
  if (!Array.isArray(list) || !list.length) return null;
  return h('ul.chips', { 'data-kind': kind }, list.map((d) => h('li', { title: JSON.stringify(d) }, `${kind} ${summary(d)}`)));
}

/** A dashed stand-in on the destination's column while `m` brings its VM there. */
export function makeIncoming(m) {
  return h('div.vm.incoming', { 'data-incoming': m.vm });
}

/** Brings an incoming stand-in up to date. */
export function updateIncoming(el, m) {
  const p = m.progress ?? {};
  const pct = p.total_bytes ? Math.round(100 * (1 - p.remaining_bytes / p.total_bytes)) : 0;
  fill(el, h('span.name', {}, m.vm), ` arriving from ${m.from} · ${m.phase}${p.iteration ? ` · pass ${p.iteration} ${pct}%` : ''}`);
}
