// History: the latest migrations over time, hand-drawn in SVG (each hop's duration as a bar, its
// downtimes as dots on their own scale), and the recent events, filterable by host or VM.

import { h, fill } from './dom.js';
import { ms, clock } from './format.js';
import { state } from './store.js';

const W = 900;
const H = 160;
const PAD = { l: 48, r: 48, t: 10, b: 22 };
const MIN_SPAN_MS = 60_000;
/** The most recent migrations drawn. */
const CHART_KEPT = 200;

/** Draws the migrations chart into `figure`. */
export function renderChart(figure) {
  const done = [...state.migrations.values()].filter((m) => m.finished_ms).sort((a, b) => a.started_ms - b.started_ms).slice(-CHART_KEPT);
  let svg = figure.querySelector('svg');
  if (!svg) {
    svg = h('svg', { viewBox: `0 0 ${W} ${H}`, width: '100%', height: H, role: 'img', 'aria-label': 'migrations over time' });
    figure.prepend(svg);
  }
  if (!done.length) {
    fill(svg, h('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'empty' }, 'no migration yet'));
    return;
  }
  // At least a minute wide, so one hop is a bar and not the whole chart.
  const t0 = done[0].started_ms;
  const t1 = Math.max(...done.map((m) => m.finished_ms), t0 + MIN_SPAN_MS);
  const maxTotal = Math.max(...done.map((m) => m.total_ms ?? m.finished_ms - m.started_ms), 1);
  const downs = done.flatMap((m) => downtimes(m).map(([, v]) => v));
  const maxDown = Math.max(...downs, 1);
  const x = (t) => PAD.l + ((W - PAD.l - PAD.r) * (t - t0)) / (t1 - t0);
  const yT = (v) => H - PAD.b - ((H - PAD.t - PAD.b) * v) / maxTotal;
  const yD = (v) => H - PAD.b - ((H - PAD.t - PAD.b) * v) / maxDown;
  fill(svg,
    h('line', { x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, class: 'axis' }),
    h('text', { x: PAD.l - 4, y: PAD.t + 8, 'text-anchor': 'end', class: 'total' }, ms(maxTotal)),
    h('text', { x: W - PAD.r + 4, y: PAD.t + 8, class: 'down' }, ms(maxDown)),
    h('text', { x: PAD.l, y: H - 6 }, clock(t0)),
    h('text', { x: W - PAD.r, y: H - 6, 'text-anchor': 'end' }, clock(t1)),
    done.map((m) => {
      const total = m.total_ms ?? m.finished_ms - m.started_ms;
      const bx = x(m.started_ms);
      const bw = Math.max(2, x(m.started_ms + total) - bx);
      return h('g', { class: `mig ${m.phase}`, 'data-migration': m.id, 'data-vm': m.vm, 'data-total-ms': total },
        h('rect', { x: bx, y: yT(total), width: bw, height: H - PAD.b - yT(total) },
          h('title', {}, `${m.id} ${m.vm} ${m.from} → ${m.to} ${m.phase} in ${ms(total)}${m.downtime_ms != null ? `, downtime ${ms(m.downtime_ms)}` : ''}`)),
        downtimes(m).map(([kind, v], i) => h('circle', { cx: bx + bw / 2, cy: yD(v), r: 3, class: i ? 'observed' : 'qemu', 'data-kind': kind, 'data-ms': v },
          h('title', {}, `${m.vm}: ${kind} downtime ${ms(v)}`))));
    }));
}

/** `[kind, ms]` for every downtime field a migration has: QEMU's first. */
function downtimes(m) {
  const out = [];
  if (typeof m.downtime_ms === 'number') out.push(['QEMU', m.downtime_ms]);
  for (const [k, v] of Object.entries(m)) {
    if (k !== 'downtime_ms' && k.endsWith('downtime_ms') && typeof v === 'number') out.push([k.replace(/_downtime_ms$/, ''), v]);
  }
  return out;
}

/** Offers every host and VM as a suggestion for the filter (`host h1`, `vm a`). */
export function renderFilter(list) {
  const want = [...state.hosts.map((x) => `host ${x.name}`), ...state.vms.map((v) => `vm ${v.name}`)];
  const have = [...list.options].map((o) => o.value);
  if (want.join('\n') === have.join('\n')) return;
  fill(list, want.map((v) => h('option', { value: v })));
}

/** What a filter's text asks for: `host NAME` or `vm NAME` (that host or VM), a bare
 *  NAME (anything of that name), or nothing (every event). */
function parseFilter(text) {
  const t = String(text ?? '').trim();
  if (!t) return null;
  const m = /^(host|vm)\s+(\S+)$/i.exec(t);
  return m ? { kind: m[1].toLowerCase(), name: m[2] } : { kind: null, name: t };
}

/** Fills the events table, newest first, with those about the filter's host or VM: its
 *  own events, and those whose sentence names it. A filter nothing matches says so. */
export function renderEvents(table, text) {
  const f = parseFilter(text);
  const word = f ? new RegExp(`(^|[^\\w])${f.name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}($|[^\\w])`) : null;
  const rows = state.events
    .filter((e) => !f || (e.name === f.name && (!f.kind || e.subject === f.kind)) || word.test(e.message))
    .slice(-100)
    .reverse();
  table.dataset.filter = f ? `${f.kind ?? ''}:${f.name}` : '';
  if (!rows.length) {
    const none = f ? `no events about ${f.kind ? `${f.kind} ` : ''}“${f.name}”` : 'no events yet';
    fill(table.tBodies[0], h('tr.empty', { 'data-empty': f ? 'filtered' : 'none' }, h('td', { colspan: 4 }, none)));
    return;
  }
  fill(table.tBodies[0], rows.map((e) => h('tr', { 'data-seq': e.seq, 'data-subject': e.subject, 'data-name': e.name },
    h('td', {}, clock(e.at_ms)), h('td', {}, e.subject), h('td', {}, e.name), h('td', {}, e.message))));
}
