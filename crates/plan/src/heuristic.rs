//! The fast planner for large clusters: direct moves while any fit, and the cheapest
//! temporary move when they deadlock.
//!
//! Each round first moves every misplaced VM whose target host has room, in the chosen
//! [`Order`]. When none fits, the misplaced VMs form waiting chains that close into
//! cycles (vm5 waits for room on h2, held by vm7, which waits for room on h1 ...). The
//! deadlock is broken by moving one VM off a host that someone is waiting for, to a
//! third host with room: a misplaced VM costs one extra migration, a VM already in
//! place costs two, so misplaced ones go first and, among them, the smallest. The third
//! host is one that keeps room for what will arrive there. Near-linear per round: a
//! departure only re-examines the VMs waiting for that host.

use std::collections::{BinaryHeap, VecDeque};

use crate::problem::{Move, Problem, Res};

/// The order in which ready direct moves are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// As they become ready.
    Fifo,
    /// Largest VM first.
    Largest,
    /// Smallest VM first.
    Smallest,
}

/// Ready VMs, in some order.
enum Ready {
    Fifo(VecDeque<u32>),
    Heap(BinaryHeap<(u64, u32)>, bool),
}

impl Ready {
    fn new(order: Order) -> Ready {
        match order {
            Order::Fifo => Ready::Fifo(VecDeque::new()),
            Order::Largest => Ready::Heap(BinaryHeap::new(), true),
            Order::Smallest => Ready::Heap(BinaryHeap::new(), false),
        }
    }
    fn push(&mut self, v: u32, mem: u64) {
        match self {
            Ready::Fifo(q) => q.push_back(v),
            Ready::Heap(h, largest) => h.push((if *largest { mem } else { u64::MAX - mem }, v)),
        }
    }
    fn pop(&mut self) -> Option<u32> {
        match self {
            Ready::Fifo(q) => q.pop_front(),
            Ready::Heap(h, _) => h.pop().map(|(_, v)| v),
        }
    }
}

/// Working state of one greedy run.
struct Greedy<'a> {
    p: &'a Problem,
    pos: Vec<u32>,
    load: Vec<Res>,
    on_host: Vec<Vec<u32>>,
    slot: Vec<usize>,
    /// Misplaced VMs whose goal is the host (may hold VMs that since arrived).
    waiting: Vec<Vec<u32>>,
    target_load: Vec<Res>,
    ready: Ready,
    moves: Vec<Move>,
    misplaced: usize,
    /// The fewest misplaced VMs seen, and the number of moves that first reached it.
    best_misplaced: usize,
    best_len: usize,
}

/// Where the greedy rules got stuck: the moves made so far and the placement reached.
pub(crate) struct Stuck {
    pub moves: Vec<Move>,
    pub pos: Vec<u32>,
}

/// Plans greedily from placement `start` (the problem's start or a later one). On
/// failure, returns how far it got, so a stronger method can take over from there.
pub(crate) fn plan_from(p: &Problem, start: &[u32], order: Order) -> Result<Vec<Move>, Stuck> {
    let mut g = Greedy::new(p, start, order);
    if g.run() {
        return Ok(g.moves);
    }
    // Keep only the moves up to the first placement with the fewest misplaced VMs: the
    // temporary moves after it did not help.
    let mut moves = g.moves;
    moves.truncate(g.best_len);
    let mut pos = start.to_vec();
    for m in &moves {
        pos[m.vm as usize] = m.to;
    }
    Err(Stuck { moves, pos })
}

impl<'a> Greedy<'a> {
    fn new(p: &'a Problem, start: &[u32], order: Order) -> Greedy<'a> {
        let n = p.n_hosts();
        let mut on_host = vec![Vec::new(); n];
        let mut slot = vec![0; p.n_vms()];
        let mut waiting = vec![Vec::new(); n];
        let mut misplaced = 0;
        for v in 0..p.n_vms() {
            let h = start[v] as usize;
            slot[v] = on_host[h].len();
            on_host[h].push(v as u32);
            if start[v] != p.goal[v] {
                waiting[p.goal[v] as usize].push(v as u32);
                misplaced += 1;
            }
        }
        Greedy {
            p,
            pos: start.to_vec(),
            load: p.loads(start),
            on_host,
            slot,
            waiting,
            target_load: p.loads(&p.goal),
            ready: Ready::new(order),
            moves: Vec::new(),
            misplaced,
            best_misplaced: misplaced,
            best_len: 0,
        }
    }

    fn fits(&self, v: usize, h: usize) -> bool {
        self.load[h].fits_with(self.p.req[v], self.p.cap[h])
    }

    fn apply(&mut self, v: usize, to: usize) {
        let from = self.pos[v] as usize;
        let was_misplaced = from != self.p.goal[v] as usize;
        let list = &mut self.on_host[from];
        let i = self.slot[v];
        list.swap_remove(i);
        if let Some(&moved) = list.get(i) {
            self.slot[moved as usize] = i;
        }
        self.slot[v] = self.on_host[to].len();
        self.on_host[to].push(v as u32);
        self.load[from] = self.load[from].sub(self.p.req[v]);
        self.load[to] = self.load[to].add(self.p.req[v]);
        self.pos[v] = to as u32;
        let now_misplaced = to != self.p.goal[v] as usize;
        match (was_misplaced, now_misplaced) {
            (true, false) => self.misplaced -= 1,
            (false, true) => {
                self.misplaced += 1;
                self.waiting[self.p.goal[v] as usize].push(v as u32);
            }
            _ => {}
        }
        self.moves.push(Move { vm: v as u32, from: from as u32, to: to as u32 });
        if self.misplaced < self.best_misplaced {
            self.best_misplaced = self.misplaced;
            self.best_len = self.moves.len();
        }
    }

    /// Queues the VMs waiting for `h` that now fit there.
    fn wake(&mut self, h: usize) {
        let pos = &self.pos;
        self.waiting[h].retain(|&w| pos[w as usize] as usize != h);
        for i in 0..self.waiting[h].len() {
            let w = self.waiting[h][i] as usize;
            if self.fits(w, h) {
                self.ready.push(w as u32, self.p.req[w].mem);
            }
        }
    }

    fn run(&mut self) -> bool {
        for v in 0..self.p.n_vms() {
            if self.pos[v] != self.p.goal[v] && self.fits(v, self.p.goal[v] as usize) {
                self.ready.push(v as u32, self.p.req[v].mem);
            }
        }
        let mut temporaries = 0usize;
        let limit = 2 * self.p.n_vms() + 16;
        loop {
            while let Some(v) = self.ready.pop() {
                let v = v as usize;
                let goal = self.p.goal[v] as usize;
                if self.pos[v] as usize == goal || !self.fits(v, goal) {
                    continue;
                }
                let from = self.pos[v] as usize;
                self.apply(v, goal);
                self.wake(from);
            }
            if self.misplaced == 0 {
                return true;
            }
            // Safety net: a VM sent away temporarily may fit at home again.
            let mut any = false;
            for v in 0..self.p.n_vms() {
                if self.pos[v] != self.p.goal[v] && self.fits(v, self.p.goal[v] as usize) {
                    self.ready.push(v as u32, self.p.req[v].mem);
                    any = true;
                }
            }
            if any {
                continue;
            }
            temporaries += 1;
            if temporaries > limit || !self.break_deadlock() {
                return false;
            }
        }
    }

    /// The best third host for a temporary stay of `v`, away from `from`.
    fn temp_host(&self, v: usize, from: usize) -> Option<usize> {
        let req = self.p.req[v];
        let mut best: Option<(bool, bool, u64, usize)> = None;
        for t in 0..self.p.n_hosts() {
            if t == from || t == self.p.goal[v] as usize || !self.p.compatible(v, t) {
                continue;
            }
            if !self.fits(v, t) {
                continue;
            }
            let slack_ok = self.target_load[t].fits_with(req, self.p.cap[t]);
            let quiet = self.waiting[t].iter().all(|&w| self.pos[w as usize] as usize == t);
            let free = self.p.cap[t].mem - self.load[t].mem;
            let key = (slack_ok, quiet, free, usize::MAX - t);
            if best.is_none_or(|b| key > b) {
                best = Some(key);
            }
        }
        best.map(|(_, _, _, t)| usize::MAX - t)
    }

    /// Makes one temporary move (or a few, off one host) that lets a waiting VM in.
    fn break_deadlock(&mut self) -> bool {
        // (extra migrations, memory, vm, temp host)
        let mut best: Option<((u32, u64, u32), usize, usize)> = None;
        for s in 0..self.p.n_hosts() {
            let pos = &self.pos;
            self.waiting[s].retain(|&w| pos[w as usize] as usize != s);
            if self.waiting[s].is_empty() {
                continue;
            }
            for &v in &self.on_host[s] {
                let v = v as usize;
                let extra = if self.pos[v] != self.p.goal[v] { 1 } else { 2 };
                let key = (extra, self.p.req[v].mem, v as u32);
                if best.as_ref().is_some_and(|(b, _, _)| key >= *b) {
                    continue;
                }
                let freed = self.load[s].sub(self.p.req[v]);
                let unblocks = self.waiting[s].iter().any(|&w| {
                    let w = w as usize;
                    freed.fits_with(self.p.req[w], self.p.cap[s])
                });
                if !unblocks {
                    continue;
                }
                if let Some(t) = self.temp_host(v, s) {
                    best = Some((key, v, t));
                }
            }
        }
        if let Some((_, v, t)) = best {
            let from = self.pos[v] as usize;
            self.apply(v, t);
            self.wake(from);
            return true;
        }
        self.clear_one_host()
    }

    /// No single temporary move lets anyone in: empties room on the host whose waiting
    /// VM lacks the least, one VM at a time.
    fn clear_one_host(&mut self) -> bool {
        let mut best: Option<(u64, usize, usize)> = None;
        for s in 0..self.p.n_hosts() {
            for &w in &self.waiting[s] {
                let w = w as usize;
                let lack = (self.load[s].mem + self.p.req[w].mem).saturating_sub(self.p.cap[s].mem);
                if best.is_none_or(|(l, _, _)| lack < l) {
                    best = Some((lack, s, w));
                }
            }
        }
        let Some((_, s, w)) = best else { return false };
        let mut moved = false;
        while !self.fits(w, s) {
            let mut cands: Vec<usize> = self.on_host[s].iter().map(|&v| v as usize).collect();
            cands.sort_by_key(|&v| (self.pos[v] == self.p.goal[v], u64::MAX - self.p.req[v].mem));
            let Some((v, t)) = cands.into_iter().find_map(|v| self.temp_host(v, s).map(|t| (v, t))) else {
                return moved;
            };
            self.apply(v, t);
            moved = true;
        }
        self.wake(s);
        moved
    }
}
