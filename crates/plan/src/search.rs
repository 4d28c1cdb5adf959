//! Exact search for small cases: A* over placements, minimising migrations, with an
//! admissible bound; memory moved breaks ties (and a plan is only accepted if it beats
//! the bound lexicographically), but is not itself proven minimal.
//!
//! A state is the host of every migrating VM; a step moves one VM to any compatible
//! host with room (its source keeps it until it lands, so only the destination needs
//! room). The bound is (misplaced VMs + deadlocks, memory of misplaced VMs). Each
//! misplaced VM moves at least once. A *deadlock* is a sink of the host graph (edge
//! T -> S when a misplaced VM on T belongs on S) that some misplaced VM wants to
//! enter while none of those fits: such a group of hosts only gains room when one of
//! its present VMs leaves to a host that is not its goal, so every deadlocked sink
//! costs at least one migration beyond the count of misplaced VMs, and sinks are
//! disjoint. The deadlock term is evaluated lazily when a state is popped, so making a
//! child costs O(1) (Zobrist hash) plus a table probe. Moves are reversible, so the
//! reachable states form an undirected graph: exhausting it without reaching the goal
//! proves no plan exists.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use crate::fxhash::FxBuild;
use crate::problem::{Move, Problem, Res};

/// Lexicographic cost: (migrations, MiB moved).
pub(crate) type Cost = (u32, u64);

/// What the exact search found.
#[derive(Debug)]
pub(crate) enum Found {
    /// A plan of least count (strictly below the bound given, if one was).
    Optimal(Vec<Move>),
    /// Every state below the bound was searched: nothing beats the bound. Without a
    /// bound this proves no plan exists; `reach` says, per VM, how close it ever came.
    Exhausted { states: usize, reach: Vec<Reach> },
    /// The budget ran out; no plan needs fewer migrations than `lower_bound`.
    Budget { lower_bound: u32 },
}

/// Over all reachable states: whether the VM was ever on its goal host, and the most
/// memory its goal host had free while the VM was elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reach {
    pub at_goal: bool,
    pub max_free_mem: u64,
}

/// A queue entry: (priority, h migrations, f memory, deadlock term applied, node).
type Entry = (u32, u32, u64, bool, u32);

struct Node {
    parent: u32,
    mv: Move,
    g: Cost,
    hash: u64,
}

#[inline]
fn zobrist(v: usize, h: u16) -> u64 {
    let mut z = (v as u64) << 16 ^ u64::from(h);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The state table: Zobrist hash -> node, probing on (astronomically rare) collisions.
struct Seen {
    map: HashMap<u64, u32, FxBuild>,
}

impl Seen {
    /// Finds the node holding `state`, or the free key to insert it under.
    fn find(&self, states: &[u16], n: usize, hash: u64, state: &dyn Fn(usize) -> u16) -> (u64, Option<u32>) {
        let mut key = hash;
        loop {
            match self.map.get(&key) {
                None => return (key, None),
                Some(&id) => {
                    let stored = &states[id as usize * n..(id as usize + 1) * n];
                    if stored.iter().enumerate().all(|(i, &h)| h == state(i)) {
                        return (key, Some(id));
                    }
                    key = key.wrapping_add(1);
                }
            }
        }
    }
}

/// Searches for a plan cheaper than `bound`, creating at most `budget` states and
/// stopping (as if out of budget) once `deadline` has passed. The node budget is what
/// normally ends a search, so results do not depend on the machine; the deadline is a
/// safety net, read every 1,024 expansions.
///
/// `weight` above 1 makes it a weighted A* (priority g + weight x h): it dives to some
/// plan much faster, but `Optimal` then only means "a plan" and `Budget` carries no
/// lower bound. Exhaustion still proves that nothing under the bound exists.
// Indices run over several parallel arrays at once; iterators would obscure that.
#[allow(clippy::needless_range_loop)]
pub(crate) fn astar(p: &Problem, bound: Option<Cost>, budget: usize, deadline: Option<Instant>, weight: u32) -> Found {
    let n = p.n_vms();
    let to16 = |h: u32| u16::try_from(h).unwrap_or(u16::MAX);
    let start: Vec<u16> = p.start.iter().map(|&h| to16(h)).collect();
    let goal: Vec<u16> = p.goal.iter().map(|&h| to16(h)).collect();
    let bound = bound.unwrap_or((u32::MAX, u64::MAX));
    let track = bound.0 == u32::MAX;
    let mut reach = vec![Reach::default(); n];

    let mut states: Vec<u16> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut seen = Seen { map: HashMap::default() };
    // Priority g + weight x h (f when the weight is 1); among equal priorities the
    // deepest state first, so the search dives instead of widening.
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::new();

    let (m0, mm0) = misplaced(p, &start, &goal);
    let h0: u64 = start.iter().enumerate().fold(0, |a, (v, &h)| a ^ zobrist(v, h));
    states.extend_from_slice(&start);
    nodes.push(Node { parent: u32::MAX, mv: Move { vm: 0, from: 0, to: 0 }, g: (0, 0), hash: h0 });
    seen.map.insert(h0, 0);
    heap.push(Reverse((weight * m0, m0, mm0, false, 0)));

    let mut pos = vec![0u16; n];
    let mut pos32 = vec![0u32; n];
    let mut sinks = Sinks::new(p.n_hosts());
    let mut expanded = 0u64;
    while let Some(Reverse((prio, hc, fm, checked, id))) = heap.pop() {
        let g = nodes[id as usize].g;
        let fc = g.0 + hc;
        pos.copy_from_slice(&states[id as usize * n..(id as usize + 1) * n]);
        let (_, best) = seen.find(&states, n, nodes[id as usize].hash, &|i| pos[i]);
        if best.is_some_and(|b| nodes[b as usize].g < g) {
            continue; // a cheaper way here was found after this entry was queued
        }
        if hc == 0 {
            return Found::Optimal(path(&nodes, id));
        }
        for (a, &b) in pos32.iter_mut().zip(&pos) {
            *a = u32::from(b);
        }
        let load = p.loads(&pos32);
        if track {
            note_reach(p, &pos, &goal, &load, &mut reach);
        }
        if !checked {
            let extra = sinks.deadlocks(p, &pos32, &load);
            if extra > 0 {
                if (fc + extra, fm) < bound {
                    heap.push(Reverse((prio + weight * extra, hc + extra, fm, true, id)));
                }
                continue;
            }
        }
        expanded += 1;
        let late = expanded & 1023 == 0 && deadline.is_some_and(|d| Instant::now() >= d);
        if nodes.len() > budget || late {
            let lower_bound = if weight == 1 { fc.min(bound.0) } else { 0 };
            return Found::Budget { lower_bound };
        }
        let (mis, mis_mem) = misplaced(p, &pos, &goal);
        let hash = nodes[id as usize].hash;
        for v in 0..n {
            let req = p.req[v];
            let from = pos[v];
            let cg = (g.0 + 1, g.1 + req.mem);
            for to in 0..p.n_hosts() {
                if to == from as usize || !p.compatible(v, to) || !load[to].fits_with(req, p.cap[to]) {
                    continue;
                }
                let to16 = to16(to as u32);
                let (cm, cmm) = child_misplaced(mis, mis_mem, from, to16, goal[v], req.mem);
                let f = (cg.0 + cm, cg.1 + cmm);
                if f >= bound {
                    continue;
                }
                let ch = hash ^ zobrist(v, from) ^ zobrist(v, to16);
                let (key, found) = seen.find(&states, n, ch, &|i| if i == v { to16 } else { pos[i] });
                if let Some(old) = found {
                    if nodes[old as usize].g <= cg {
                        continue;
                    }
                }
                let child = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
                seen.map.insert(key, child);
                let at = states.len();
                states.extend_from_slice(&pos);
                states[at + v] = to16;
                let mv = Move { vm: v as u32, from: u32::from(from), to: to as u32 };
                nodes.push(Node { parent: id, mv, g: cg, hash: ch });
                heap.push(Reverse((cg.0 + weight * cm, cm, f.1, false, child)));
            }
        }
    }
    Found::Exhausted { states: seen.map.len(), reach }
}

fn note_reach(p: &Problem, pos: &[u16], goal: &[u16], load: &[Res], reach: &mut [Reach]) {
    for v in 0..pos.len() {
        let gh = goal[v] as usize;
        if pos[v] == goal[v] {
            reach[v].at_goal = true;
        } else {
            let free = p.cap[gh].mem - load[gh].mem;
            reach[v].max_free_mem = reach[v].max_free_mem.max(free);
        }
    }
}

/// Counts deadlocked sinks of the host graph (see the module comment).
pub(crate) struct Sinks {
    index: Vec<u32>,
    low: Vec<u32>,
    on_stack: Vec<bool>,
    stack: Vec<u32>,
    comp: Vec<u32>,
    adj_start: Vec<u32>,
    adj: Vec<u32>,
}

impl Sinks {
    pub fn new(hosts: usize) -> Sinks {
        Sinks {
            index: vec![0; hosts],
            low: vec![0; hosts],
            on_stack: vec![false; hosts],
            stack: Vec::new(),
            comp: vec![0; hosts],
            adj_start: vec![0; hosts + 1],
            adj: Vec::new(),
        }
    }

    /// Migrations that must come on top of one per misplaced VM, from this state.
    // Indices run over several parallel arrays at once; iterators would obscure that.
    #[allow(clippy::needless_range_loop)]
    pub fn deadlocks(&mut self, p: &Problem, pos: &[u32], load: &[Res]) -> u32 {
        let h = p.n_hosts();
        // Edges T -> S for misplaced VMs on T whose goal is S (CSR).
        self.adj_start.iter_mut().for_each(|x| *x = 0);
        let mut any = false;
        for v in 0..pos.len() {
            if pos[v] != p.goal[v] {
                self.adj_start[pos[v] as usize + 1] += 1;
                any = true;
            }
        }
        if !any {
            return 0;
        }
        for i in 0..h {
            self.adj_start[i + 1] += self.adj_start[i];
        }
        self.adj.clear();
        self.adj.resize(self.adj_start[h] as usize, 0);
        let mut fill: Vec<u32> = self.adj_start[..h].to_vec();
        for v in 0..pos.len() {
            if pos[v] != p.goal[v] {
                let t = pos[v] as usize;
                self.adj[fill[t] as usize] = p.goal[v];
                fill[t] += 1;
            }
        }
        // Tarjan's SCC (iterative); components are numbered in reverse topological
        // order, so a component is a sink iff no edge leaves it.
        self.index.iter_mut().for_each(|x| *x = 0);
        let mut counter = 1u32;
        let mut comps = 0u32;
        for root in 0..h {
            if self.index[root] != 0 {
                continue;
            }
            let mut call: Vec<(u32, u32)> = vec![(root as u32, self.adj_start[root])];
            self.index[root] = counter;
            self.low[root] = counter;
            counter += 1;
            self.stack.push(root as u32);
            self.on_stack[root] = true;
            while let Some(&mut (u, ref mut next)) = call.last_mut() {
                let u = u as usize;
                if *next < self.adj_start[u + 1] {
                    let w = self.adj[*next as usize] as usize;
                    *next += 1;
                    if self.index[w] == 0 {
                        self.index[w] = counter;
                        self.low[w] = counter;
                        counter += 1;
                        self.stack.push(w as u32);
                        self.on_stack[w] = true;
                        call.push((w as u32, self.adj_start[w]));
                    } else if self.on_stack[w] {
                        self.low[u] = self.low[u].min(self.index[w]);
                    }
                } else {
                    call.pop();
                    if let Some(&(parent, _)) = call.last() {
                        let pu = parent as usize;
                        self.low[pu] = self.low[pu].min(self.low[u]);
                    }
                    if self.low[u] == self.index[u] {
                        while let Some(x) = self.stack.pop() {
                            self.on_stack[x as usize] = false;
                            self.comp[x as usize] = comps;
                            if x as usize == u {
                                break;
                            }
                        }
                        comps += 1;
                    }
                }
            }
        }
        // A component is a sink if none of its edges leaves it; it is deadlocked if
        // some misplaced VM wants in and none fits.
        let mut sink = vec![true; comps as usize];
        for t in 0..h {
            for e in self.adj_start[t]..self.adj_start[t + 1] {
                let s = self.adj[e as usize] as usize;
                if self.comp[s] != self.comp[t] {
                    sink[self.comp[t] as usize] = false;
                }
            }
        }
        // 0: nobody wants in, 1: wanted and blocked, 2: someone fits.
        let mut state = vec![0u8; comps as usize];
        for v in 0..pos.len() {
            let g = p.goal[v] as usize;
            if pos[v] as usize == g {
                continue;
            }
            let c = self.comp[g] as usize;
            if load[g].fits_with(p.req[v], p.cap[g]) {
                state[c] = 2;
            } else if state[c] == 0 {
                state[c] = 1;
            }
        }
        let count = (0..comps as usize).filter(|&c| sink[c] && state[c] == 1).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }
}

fn misplaced(p: &Problem, pos: &[u16], goal: &[u16]) -> (u32, u64) {
    let mut m = 0;
    let mut mm = 0;
    for v in 0..pos.len() {
        if pos[v] != goal[v] {
            m += 1;
            mm += p.req[v].mem;
        }
    }
    (m, mm)
}

fn child_misplaced(m: u32, mm: u64, from: u16, to: u16, goal: u16, mem: u64) -> (u32, u64) {
    match (from == goal, to == goal) {
        (false, true) => (m - 1, mm - mem),
        (true, false) => (m + 1, mm + mem),
        _ => (m, mm),
    }
}

fn path(nodes: &[Node], mut id: u32) -> Vec<Move> {
    let mut out = Vec::new();
    while nodes[id as usize].parent != u32::MAX {
        out.push(nodes[id as usize].mv);
        id = nodes[id as usize].parent;
    }
    out.reverse();
    out
}
