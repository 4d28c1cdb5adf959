// A migration on its card: where it is (phase, pass), the bytes left at each pass as a
// small bar chart, the rates, the strategy and its switches, an ETA; once it is over,
// the hop with QEMU's downtime (and the observed one, when the API reports it).

import { h, fill } from './dom.js';
import { bytes, rate, ms } from './format.js';

const CANCELLABLE = new Set(['pending', 'preparing', 'running']);

/** Fills `el` with the live figure of migration `m` (`passes`: pass -> bytes left);
 *  `onCancel(m)` cancels it. The figure's parts persist across updates. */
export function renderProgress(el, m, passes, onCancel) {
  if (!el.parts) {
    el.parts = {
      head: h('div.head'),
      bar: h('div.bar', { role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100 }, h('div.fill')),
      chart: h('svg.passes', { viewBox: '0 0 180 40', width: 180, height: 40, role: 'img' }),
      rates: h('div.rates'),
      strategy: h('div.strategy'),
      switches: h('ul.switches'),
      cancel: h('button.cancel', { type: 'button', onclick: (e) => { e.stopPropagation(); onCancel(el.migration); } }, 'Cancel migration'),
    };
    fill(el, Object.values(el.parts));
  }
  el.migration = m;
  const p = m.progress ?? {};
  const P = el.parts;
  const total = p.total_bytes || 0;
  const pct = total ? Math.max(0, Math.min(100, Math.round(100 * (1 - p.remaining_bytes / total)))) : 0;
  el.dataset.migration = m.id;
  el.dataset.transferred = String(p.transferred_bytes ?? 0);
  el.dataset.phase = m.phase;
  el.dataset.pass = String(p.iteration ?? 0);
  el.dataset.rate = String(p.transfer_rate_bps ?? 0);
  fill(P.head, h('b', {}, `→ ${m.to}`), ` · ${m.phase}`, p.iteration ? ` · pass ${p.iteration}` : '', p.throttle_pct ? ` · throttle ${p.throttle_pct}%` : '');
  P.bar.setAttribute('aria-valuenow', pct);
  P.bar.setAttribute('aria-label', `${m.vm}: pass ${p.iteration ?? 0} ${pct}% sent`);
  P.bar.firstChild.style.width = `${pct}%`;
  drawPasses(P.chart, passes, total, p.iteration);
  const eta = p.transfer_rate_bps > 0 ? Math.round((p.remaining_bytes * 1000) / p.transfer_rate_bps) : null;
  fill(P.rates,
    `${bytes(p.transferred_bytes)} sent · ${bytes(p.remaining_bytes)} left`, h('br'),
    `${rate(p.transfer_rate_bps)} · dirty ${rate(p.dirty_rate_bps)}`,
    eta !== null ? ` · ETA ${ms(eta)}` : '',
    p.expected_downtime_ms ? ` · expect ${ms(p.expected_downtime_ms)} pause` : '');
  fill(P.strategy, m.strategy ? [h('span.tag', {}, m.strategy.name), ' ', h('span.why', { title: m.strategy.reason }, gist(m.strategy.reason))] : '');
  P.strategy.dataset.strategy = m.strategy?.name ?? '';
  fill(P.switches, (m.switches ?? []).map((s) => h('li', { 'data-to': s.to }, h('b', {}, `+${ms(s.at_ms)} → ${s.to}`), `: ${s.reason}`)));
  P.cancel.hidden = !CANCELLABLE.has(m.phase);
}

/** The first clause of a long reason (the whole of it stays in the tooltip). */
function gist(reason) {
  const first = String(reason ?? '').split(/[;:]/)[0];
  return first.length > 90 ? `${first.slice(0, 88)}…` : first;
}

/** Bars of the bytes left at each pass, the current one highlighted. */
function drawPasses(svg, passes, total, current) {
  const entries = passes ? [...passes.entries()].sort((a, b) => a[0] - b[0]) : [];
  const top = Math.max(total, ...entries.map(([, v]) => v), 1);
  const w = Math.min(24, 180 / Math.max(entries.length, 1));
  fill(svg,
    h('line', { x1: 0, y1: 39.5, x2: 180, y2: 39.5, class: 'axis' }),
    entries.map(([pass, left], i) => {
      const bh = Math.max(1, (38 * left) / top);
      return h('rect', { x: i * w + 1, y: 39 - bh, width: Math.max(1, w - 2), height: bh, class: pass === current ? 'now' : 'past' },
        h('title', {}, `pass ${pass}: ${bytes(left)} left`));
    }));
}

/** Fills `el` with how migration `m` ended: the hop, its time, QEMU's downtime, and any
 *  other downtime the API reports (an observed one). */
export function renderHop(el, m) {
  const extra = Object.entries(m)
    .filter(([k, v]) => k !== 'downtime_ms' && k.endsWith('downtime_ms') && typeof v === 'number')
    .map(([k, v]) => {
      const kind = k.replace(/_downtime_ms$/, '');
      return [' · ', h('span', { 'data-kind': kind, 'data-ms': v }, `${kind.replace(/_/g, ' ')} ${ms(v)}`)];
    });
  if (m.probe_error) extra.push([' · ', h('span.probe', { title: m.probe_error }, 'observed: probe failed')]);
  const done = m.phase === 'completed';
  fill(el,
    h('div.hop', { 'data-result': m.phase }, `${m.from} → ${m.to} · ${m.phase}`, m.total_ms != null ? ` in ${ms(m.total_ms)}` : '',
      !done && m.reason ? `: ${m.reason}` : ''),
    done ? h('div.downtime', { 'data-downtime-ms': m.downtime_ms ?? '' }, `downtime ${ms(m.downtime_ms)} (QEMU)`, extra) : null,
    (m.switches ?? []).length ? h('div.switched', {}, `switched: ${m.switches.map((s) => s.to).join(', ')}`) : null);
}
