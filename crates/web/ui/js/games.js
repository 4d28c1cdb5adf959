// The Games panel: Scotland Yard (start it with bots or play the detectives, watch the
// board, the rounds, each move's migration and downtime and Mr X's reveals as the event
// stream brings them, stop it) and the Towers of Hanoi: its planned moves, and the game
// played by the controller with nested VMs (start it on the chosen pegs, watch its stage,
// the pegs with the nested tower and each move's downtime as they land, stop it). The
// walk and musical chairs stay in the top bar (ops.js).

import { h, fill } from './dom.js';
import { ms } from './format.js';
import { api } from './api.js';
import { state, report, refreshWalks } from './store.js';

/** How long the controller waits for a player's detective move before a bot plays it. */
const PLAYER_WAIT_MS = 120_000;
/** The board's drawing. */
const W = 360;
const H = 260;
const R = 95;

/** What the user chose in the forms; kept across redraws. */
const form = { mrX: null, detectives: null, players: false, rounds: 6, reveal: 3, levels: 3, pegs: [null, null, null] };
/** Keys of what is drawn, so an unchanged part is not redrawn (a click never lands on
 *  an element replaced under it). */
const drawn = { forms: '', game: '', hanoi: '', hanoiGame: '' };
/** The levels the controller plays with real nested VMs. */
const HANOI_LEVELS = 2;
/** The Hanoi plan shown (HanoiPlan), if any. */
let hanoi = null;
/** Moves a player asked, by detective: `{to, moves}`, `moves` the game's count of moves
 *  then (the ask is shown until that detective's next move is recorded). */
const asked = new Map();

const $ = (id) => document.getElementById(id);

/** Builds the panel's parts once. */
export function setupGames(root) {
  fill(root,
    h('h2', { id: 'games-title' }, 'Games'),
    h('div.game-forms', { id: 'game-forms' }),
    h('div.game', { id: 'sy-game', hidden: true }),
    h('div.game.hanoi-game', { id: 'hanoi-game', hidden: true }),
    h('div.hanoi', { id: 'hanoi-plan', hidden: true }));
}

/** The latest game of Scotland Yard: the one running, else the newest. */
function currentGame() {
  const games = state.walks.filter((w) => w.kind === 'scotland_yard' && w.scotland).sort((a, b) => b.started_ms - a.started_ms);
  return games.find((w) => w.status === 'running') ?? games[0] ?? null;
}

/** The latest game of the Towers of Hanoi: the one running, else the newest. */
function currentHanoi() {
  const games = state.walks.filter((w) => w.kind === 'hanoi' && w.hanoi).sort((a, b) => b.started_ms - a.started_ms);
  return games.find((w) => w.status === 'running') ?? games[0] ?? null;
}

/** Draws what changed. */
export function renderGames() {
  renderForms($('game-forms'));
  renderGame($('sy-game'), currentGame());
  renderHanoiGame($('hanoi-game'), currentHanoi());
  renderHanoi($('hanoi-plan'));
}

function renderForms(root) {
  const vms = state.vms.map((v) => v.name).sort();
  const hosts = state.hosts.map((x) => x.name).sort();
  if (form.mrX === null || !vms.includes(form.mrX)) form.mrX = vms[0] ?? null;
  if (form.detectives === null && vms.length) form.detectives = new Set(vms.filter((v) => v !== form.mrX));
  if (form.detectives === null) return;
  form.pegs = form.pegs.map((p, i) => (p && hosts.includes(p) ? p : hosts[i] ?? null));
  const key = JSON.stringify([vms, hosts]);
  if (key === drawn.forms) return;
  drawn.forms = key;
  const num = (id, label, value, min, max, set) => h('label', {}, label, ' ',
    h('input', { type: 'number', id, min, max, value, onchange: (e) => set(Number(e.target.value)) }));
  const mrX = h('select', { id: 'sy-mrx', onchange: (e) => { form.mrX = e.target.value; form.detectives.delete(form.mrX); drawn.forms = ''; renderForms(root); } },
    vms.map((v) => h('option', { value: v, selected: v === form.mrX }, v)));
  const detectives = vms.filter((v) => v !== form.mrX).map((v) => h('label.check', {},
    h('input', { type: 'checkbox', class: 'sy-detective', value: v, checked: form.detectives.has(v),
      onchange: (e) => { if (e.target.checked) form.detectives.add(v); else form.detectives.delete(v); } }), ' ', v));
  const pegs = [0, 1, 2].map((i) => h('select', { id: `hanoi-peg${i + 1}`, 'aria-label': `peg ${i + 1}`, onchange: (e) => { form.pegs[i] = e.target.value; drawn.hanoi = ''; } },
    hosts.map((x) => h('option', { value: x, selected: x === form.pegs[i] }, x))));
  fill(root,
    h('fieldset', {},
      h('legend', {}, 'Scotland Yard'),
      h('div.row', {}, h('label', {}, 'Mr X ', mrX), h('span', {}, 'detectives: ', detectives.length ? detectives : 'no other VM')),
      h('div.row', {},
        num('sy-rounds', 'rounds', form.rounds, 1, 50, (n) => { form.rounds = n; }),
        num('sy-reveal', 'Mr X shown every', form.reveal, 1, 50, (n) => { form.reveal = n; }),
        h('label.check', {}, h('input', { type: 'checkbox', id: 'sy-players', checked: form.players, onchange: (e) => { form.players = e.target.checked; } }),
          ' I play the detectives')),
      h('div.row', {}, h('button', { type: 'button', id: 'sy-start', class: 'primary', onclick: startScotland }, 'Start Scotland Yard'))),
    h('fieldset', {},
      h('legend', {}, 'Towers of Hanoi'),
      h('div.row', {}, num('hanoi-levels', 'levels', form.levels, 1, 10, (n) => { form.levels = n; }), h('span', {}, 'pegs ', pegs)),
      h('div.row', {},
        h('button', { type: 'button', id: 'hanoi-start', onclick: planHanoi }, 'Plan the Towers of Hanoi'),
        h('button', { type: 'button', id: 'hanoi-play', class: 'primary', onclick: playHanoi }, `Play ${HANOI_LEVELS} levels with nested VMs`))));
}

async function startScotland() {
  const detectives = [...form.detectives].filter((d) => d !== form.mrX).sort();
  const body = {
    mr_x: form.mrX,
    detectives,
    players: form.players ? detectives : [],
    rounds: Math.max(1, form.rounds || 1),
    reveal_every: Math.max(1, form.reveal || 1),
    player_wait_ms: PLAYER_WAIT_MS,
  };
  try {
    await api.startScotland(body);
    asked.clear();
    report(null);
    refreshWalks();
  } catch (e) {
    report(e);
  }
}

async function planHanoi() {
  try {
    hanoi = await api.hanoiPlan(Math.max(1, form.levels || 1));
    drawn.hanoi = '';
    renderHanoi($('hanoi-plan'));
  } catch (e) {
    report(e);
  }
}

/** Starts the Towers of Hanoi on the chosen pegs (`POST /v1/games/hanoi`). */
async function playHanoi() {
  try {
    await api.startHanoi({ pegs: form.pegs.filter(Boolean), levels: HANOI_LEVELS });
    report(null);
    refreshWalks();
  } catch (e) {
    report(e);
  }
}

/** The hosts of the board, in a stable order around a circle. */
function boardHosts(links) {
  return [...new Set(links.flatMap((l) => [l.a, l.b]))].sort();
}

/** The moves detective `d` may make now: a link to a host no other detective holds. */
function legalMoves(g, d) {
  const at = g.detective_hosts[d];
  const held = new Set(Object.entries(g.detective_hosts).filter(([o]) => o !== d).map(([, x]) => x));
  return g.links.filter((l) => l.a === at || l.b === at).map((l) => ({ to: l.a === at ? l.b : l.a, kind: l.kind })).filter((m) => !held.has(m.to));
}

function renderGame(root, w) {
  const key = w ? JSON.stringify([w, [...asked]]) : '';
  if (key === drawn.game) return;
  drawn.game = key;
  root.hidden = !w;
  if (!w) return;
  const g = w.scotland;
  root.dataset.game = w.id;
  root.dataset.status = w.status;
  if (g.winner) root.dataset.winner = g.winner; else delete root.dataset.winner;
  const running = w.status === 'running';
  const winner = g.winner ? (g.winner === 'mr_x' ? 'Mr X wins' : 'the detectives win') : null;
  const seen = g.mr_x_seen ? `Mr X (${g.mr_x}) seen on ${g.mr_x_seen.host} in round ${g.mr_x_seen.round}` : `Mr X (${g.mr_x}) not seen yet`;
  fill(root,
    h('div.game-head', {},
      h('strong', {}, `${w.id}: Scotland Yard`), ` · ${w.status} · round `, h('span.round', {}, String(g.round)), ` of ${g.rounds}`,
      ` · Mr X shown every ${g.reveal_every} · `, h('span.seen', {}, seen),
      winner ? h('span.winner', {}, ` · ${winner}`) : '',
      running ? h('button', { type: 'button', id: 'sy-stop', onclick: () => api.stopWalk(w.id).then(refreshWalks).catch(report) }, 'Stop the game') : ''),
    w.result ? h('div.reason', {}, w.result) : '',
    h('div.game-body', {}, board(g), moves(w)),
    running && g.players.length ? picker(w) : '');
}

/** The board: hosts round a circle, links by kind, the pieces where they are known. */
function board(g) {
  const hosts = boardHosts(g.links);
  const at = new Map(hosts.map((x, i) => {
    const a = (2 * Math.PI * i) / hosts.length - Math.PI / 2;
    return [x, { x: W / 2 + R * Math.cos(a), y: H / 2 + R * Math.sin(a) }];
  }));
  const links = g.links.map((l) => {
    const [p, q] = [at.get(l.a), at.get(l.b)];
    return h('line', { x1: p.x, y1: p.y, x2: q.x, y2: q.y, class: `link ${l.kind}`, 'data-link': `${l.a}-${l.b}` },
      h('title', {}, `${l.a} – ${l.b}: ${l.kind}`));
  });
  const pieces = new Map(hosts.map((x) => [x, []]));
  for (const [d, x] of Object.entries(g.detective_hosts)) pieces.get(x)?.push(d);
  const xAt = g.mr_x_seen?.host;
  const nodes = hosts.map((x) => {
    const p = at.get(x);
    const here = pieces.get(x);
    return h('g', { class: `station${xAt === x ? ' mr-x' : ''}${here.length ? ' detective' : ''}`, 'data-station': x },
      h('circle', { cx: p.x, cy: p.y, r: 22 }),
      h('text', { x: p.x, y: p.y + 4, 'text-anchor': 'middle' }, x),
      here.length ? h('text', { x: p.x, y: p.y + 38, 'text-anchor': 'middle', class: 'piece' }, here.join(', ')) : null,
      xAt === x ? h('text', { x: p.x, y: p.y - 28, 'text-anchor': 'middle', class: 'piece x' }, `X (round ${g.mr_x_seen.round})`) : null);
  });
  const legend = ['taxi', 'bus', 'underground'].map((k, i) => h('g', {},
    h('line', { x1: 8, y1: 12 + i * 14, x2: 30, y2: 12 + i * 14, class: `link ${k}` }),
    h('text', { x: 34, y: 16 + i * 14, class: 'legend' }, k)));
  return h('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': 'the board', class: 'sy-board' }, links, nodes, legend);
}

/** Every move: round, piece, link, from and to (hidden for Mr X until shown), its
 *  migration and downtime (from the game's hops), how it ended. */
function moves(w) {
  const g = w.scotland;
  const hop = new Map(w.hops.map((x) => [x.migration, x]));
  const rows = g.moves.map((m, i) => {
    const x = m.migration ? hop.get(m.migration) : null;
    const who = m.side === 'mr_x' ? `Mr X (${m.vm})` : m.vm;
    const where = m.to ? `${m.from} → ${m.to}` : 'hidden';
    return h('tr', { class: 'move', 'data-move': i, 'data-round': m.round, 'data-vm': m.vm, 'data-result': m.result, 'data-migration': m.migration ?? '' },
      h('td', {}, String(m.round)), h('td', {}, who), h('td', {}, m.by), h('td', { class: `ticket ${m.link}` }, m.link), h('td', {}, where),
      h('td', {}, m.migration ?? '–'),
      h('td', { class: 'downtime', 'data-downtime-ms': x?.downtime_ms ?? '' }, x ? ms(x.downtime_ms) : '–'),
      h('td', {}, m.result));
  });
  return h('table.moves', {},
    h('thead', {}, h('tr', {}, ['round', 'piece', 'by', 'ticket', 'move', 'migration', 'downtime', 'result'].map((t) => h('th', {}, t)))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'no move yet'))));
}

/** The player's detectives: each legal destination a button (`POST /v1/games/{id}/move`). */
function picker(w) {
  const g = w.scotland;
  return h('div.picker', { id: 'sy-picker' },
    h('p', {}, `Your detectives (played in the detectives' turn of round ${Math.max(g.round, 1)}; a bot plays after ${PLAYER_WAIT_MS / 1000} s without a move):`),
    g.players.map((d) => h('div.row', { 'data-detective': d },
      h('span', {}, `${d} on ${g.detective_hosts[d]}: `),
      pending(g, d) ? h('span.asked', {}, `asked to go to ${asked.get(d).to}; `) : '',
      legalMoves(g, d).map((m) => h('button', { type: 'button', class: 'dest', 'data-detective': d, 'data-to': m.to, 'data-link': m.kind,
        onclick: () => playerMove(w.id, d, m) }, `${m.to} (${m.kind})`)))));
}

/** Whether detective `d` has a move asked and not yet played. */
function pending(g, d) {
  const a = asked.get(d);
  return Boolean(a) && !g.moves.slice(a.moves).some((m) => m.vm === d);
}

async function playerMove(id, d, m) {
  try {
    await api.gameMove(id, { detective: d, to: m.to, link: m.kind });
    const w = state.walks.find((x) => x.id === id);
    asked.set(d, { to: m.to, moves: w?.scotland?.moves.length ?? 0 });
    drawn.game = '';
    refreshWalks();
  } catch (e) {
    report(e);
  }
}

/** A place of the plan (`peg2`, `hanoi0@peg3`) with the peg's host. */
function place(p) {
  return p.replace(/peg([123])/, (s, n) => (form.pegs[n - 1] ? `${s} (${form.pegs[n - 1]})` : s));
}

function renderHanoi(root) {
  const key = hanoi ? JSON.stringify([hanoi.levels, form.pegs]) : '';
  if (key === drawn.hanoi) return;
  drawn.hanoi = key;
  root.hidden = !hanoi;
  if (!hanoi) return;
  root.dataset.levels = hanoi.levels;
  fill(root,
    h('p', {}, `Towers of Hanoi, ${hanoi.levels} level(s): ${hanoi.steps.length} moves take the tower (${hanoi.vms.join(' ⊃ ')}) from peg 1 to peg 3, `,
      'each a live migration into or out of the VM below. Planned by the controller; played with real nested VMs (',
      `${HANOI_LEVELS} levels) by the Play button or `, h('code', {}, 'walkabout game hanoi'), '.'),
    h('ol.hanoi-steps', { id: 'hanoi-steps' },
      hanoi.steps.map((s) => h('li', { 'data-step': s.number, 'data-vm': s.vm }, `${s.vm}: ${place(s.from)} → ${place(s.to)}`))));
}

/** What a stage of the Towers of Hanoi means, for people. */
function stageText(g) {
  const first = g.pegs[0] ?? '?';
  switch (g.stage) {
    case 'booting': return `booting: ${g.vms[0]} (a hypervisor guest: its own agent and QEMU) and ${g.vms.slice(1).join(', ')} start on ${first}; the agent inside takes a minute or more`;
    case 'building': return `building the tower: ${g.vms.slice(1).join(', ')} migrates into ${g.vms[0]} on ${first}`;
    case 'playing': return 'playing the planned moves';
    default: return g.solved ? 'over: solved' : 'over';
  }
}

/** A game of the Towers of Hanoi: its stage, the pegs with the nested tower as it
 *  stands, every move with its downtime and the guest's check, Stop while it runs. */
function renderHanoiGame(root, w) {
  const key = w ? JSON.stringify(w) : '';
  if (key === drawn.hanoiGame) return;
  drawn.hanoiGame = key;
  root.hidden = !w;
  if (!w) return;
  const g = w.hanoi;
  const running = w.status === 'running';
  root.dataset.game = w.id;
  root.dataset.status = w.status;
  root.dataset.stage = g.stage;
  fill(root,
    h('div.game-head', {},
      h('strong', {}, `${w.id}: Towers of Hanoi`), ` · ${w.status} · `, h('span.stage', { id: 'hanoi-stage' }, stageText(g)),
      g.hyper_boot_ms ? ` · ${g.vms[0]}'s agent answered after ${ms(g.hyper_boot_ms)}` : '',
      running ? h('button', { type: 'button', id: 'hanoi-stop', onclick: () => api.stopWalk(w.id).then(refreshWalks).catch(report) }, 'Stop the game') : ''),
    w.result ? h('div.reason', {}, w.result) : '',
    h('div.game-body', {}, pegs(g), hanoiMoves(g)));
}

/** The three pegs, each with its tower: the bottom VM on the host, each next one inside it. */
function pegs(g) {
  const nest = (vms) => (vms.length ? h('div.disc', { 'data-vm': vms[0] }, h('span', {}, vms[0]), nest(vms.slice(1))) : null);
  return h('div.hanoi-pegs', { id: 'hanoi-pegs' },
    g.pegs.map((host, i) => h('div.peg', { 'data-peg': i + 1, 'data-peg-host': host },
      h('div.tower', {}, nest(g.tower[i] ?? [])),
      h('div.peg-name', {}, `peg ${i + 1}: ${host}`))));
}

/** The moves played: the tower's building, then the planned ones. */
function hanoiMoves(g) {
  const rows = [...g.setup, ...g.moves].map((m) => h('tr', { class: 'move', 'data-number': m.number, 'data-vm': m.vm, 'data-result': m.result },
    h('td', {}, m.number ? String(m.number) : 'tower'), h('td', {}, m.vm), h('td', {}, `${m.from} → ${m.to}`), h('td', {}, m.result),
    h('td', { class: 'downtime', 'data-downtime-ms': m.downtime_ms ?? '' }, ms(m.downtime_ms)), h('td', {}, ms(m.total_ms)),
    h('td', {}, `${m.heartbeats} / ${m.seq_breaks} / ${m.corrupt_pages}`),
    h('td', {}, m.reason ?? (m.attempts > 1 ? `${m.attempts} attempts` : ''))));
  return h('table.moves', { id: 'hanoi-moves' },
    h('thead', {}, h('tr', {}, ['#', 'VM', 'move', 'result', 'downtime', 'took', 'heartbeats / breaks / corrupt', ''].map((t) => h('th', {}, t)))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'no move yet'))));
}
