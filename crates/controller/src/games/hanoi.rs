//! Towers of Hanoi with nested VMs: the planner.
//!
//! Three hosts are the pegs; the VMs are the discs, numbered from the outermost (0, the
//! biggest: a hypervisor guest holding all the others at the start) to the innermost
//! (`levels - 1`, the smallest: a plain guest). A peg's stack is a chain of nesting: the
//! bottom VM runs on the host's agent, the next one on the agent inside the bottom VM,
//! and so on. A move live-migrates the innermost VM of a peg (one that holds no other)
//! to the top of another peg: onto that host directly when the peg is empty, else into
//! the agent of the innermost VM there, which must be bigger (the rule of Hanoi is the
//! rule of nesting: a VM only holds smaller ones).
//!
//! [`plan`] works from any legal state, not from a script of the classic start: to put
//! the biggest VM not yet in place onto the target peg, it first clears everything
//! smaller onto the third peg (recursively, from wherever those VMs are), moves it, and
//! goes on with the next smaller one. From the classic start this is the optimal
//! `2^levels - 1` moves. Executing a move (a migration through the agents' API) is the
//! caller's; this module has no I/O.

use std::fmt;

/// A peg: one of the three hosts, 0-2.
pub type Peg = usize;

/// One planned move: VM `vm` (0 = outermost) from peg `from` to peg `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The VM moved (0 = the biggest).
    pub vm: usize,
    /// The peg it leaves.
    pub from: Peg,
    /// The peg it joins, on top.
    pub to: Peg,
}

/// Where every VM is: three stacks, bottom first, each strictly decreasing in size
/// (increasing in VM number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The stack on each peg, outermost first.
    pub pegs: [Vec<usize>; 3],
}

/// Why a state or a move is not legal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HanoiError {
    /// A peg number outside 0-2.
    #[error("peg {0} does not exist (the pegs are 0, 1 and 2)")]
    NoSuchPeg(Peg),
    /// Moving from an empty peg.
    #[error("peg {0} holds no VM to move")]
    EmptyPeg(Peg),
    /// A VM onto a smaller one (it cannot nest inside it).
    #[error("VM {vm} cannot go into VM {onto}: a VM only holds smaller ones")]
    TooBig {
        /// The VM moved.
        vm: usize,
        /// The innermost VM of the destination peg.
        onto: usize,
    },
    /// A state that is not the VMs `0..levels` once each, in nesting order.
    #[error("not a legal state: {0}")]
    Illegal(String),
}

impl State {
    /// The classic start: all `levels` VMs nested on `peg`.
    pub fn start(levels: usize, peg: Peg) -> State {
        let mut pegs: [Vec<usize>; 3] = Default::default();
        if let Some(p) = pegs.get_mut(peg) {
            *p = (0..levels).collect();
        }
        State { pegs }
    }

    /// Checks that each VM `0..levels` is on exactly one peg and every stack nests.
    pub fn check(&self, levels: usize) -> Result<(), HanoiError> {
        let mut seen = vec![false; levels];
        for (p, stack) in self.pegs.iter().enumerate() {
            if stack.windows(2).any(|w| w[0] >= w[1]) {
                return Err(HanoiError::Illegal(format!("peg {p} holds {stack:?}: a VM above a bigger one")));
            }
            for &vm in stack {
                match seen.get_mut(vm) {
                    Some(s) if !*s => *s = true,
                    Some(_) => return Err(HanoiError::Illegal(format!("VM {vm} is on two pegs"))),
                    None => return Err(HanoiError::Illegal(format!("VM {vm} is not one of the {levels} levels"))),
                }
            }
        }
        match seen.iter().position(|s| !s) {
            Some(vm) => Err(HanoiError::Illegal(format!("VM {vm} is on no peg"))),
            None => Ok(()),
        }
    }

    /// The peg VM `vm` is on.
    pub fn peg_of(&self, vm: usize) -> Option<Peg> {
        self.pegs.iter().position(|s| s.contains(&vm))
    }

    /// The VM directly under `vm` (the one whose agent runs it), or `None` when `vm` runs
    /// on a host's agent.
    pub fn holder_of(&self, vm: usize) -> Option<usize> {
        let stack = &self.pegs[self.peg_of(vm)?];
        let i = stack.iter().position(|&v| v == vm)?;
        i.checked_sub(1).map(|below| stack[below])
    }

    /// The VM the next arrival on `peg` would run in (its innermost), or `None` for the
    /// host's own agent.
    pub fn top(&self, peg: Peg) -> Option<usize> {
        self.pegs.get(peg)?.last().copied()
    }

    /// Applies `m` if it is legal: the innermost VM of `m.from`, onto `m.to` whose
    /// innermost VM (if any) is bigger.
    pub fn apply(&mut self, m: Move) -> Result<(), HanoiError> {
        for p in [m.from, m.to] {
            if p >= 3 {
                return Err(HanoiError::NoSuchPeg(p));
            }
        }
        let Some(&vm) = self.pegs[m.from].last() else { return Err(HanoiError::EmptyPeg(m.from)) };
        if vm != m.vm {
            return Err(HanoiError::Illegal(format!("VM {} is not the innermost on peg {} (VM {vm} is)", m.vm, m.from)));
        }
        if let Some(onto) = self.top(m.to) {
            if onto >= vm {
                return Err(HanoiError::TooBig { vm, onto });
            }
        }
        self.pegs[m.from].pop();
        self.pegs[m.to].push(vm);
        Ok(())
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pegs: Vec<String> = self.pegs.iter().map(|s| format!("{s:?}")).collect();
        write!(f, "{}", pegs.join(" | "))
    }
}

/// The moves that bring every VM of `state` (levels `0..levels`) onto `target`, nested,
/// in the fewest moves; empty when they are there already.
pub fn plan(state: &State, levels: usize, target: Peg) -> Result<Vec<Move>, HanoiError> {
    state.check(levels)?;
    if target >= 3 {
        return Err(HanoiError::NoSuchPeg(target));
    }
    let mut s = state.clone();
    let mut moves = vec![];
    // The biggest first: once in place at the bottom of the target, it never moves again.
    for vm in 0..levels {
        place(&mut s, vm, levels, target, &mut moves)?;
    }
    Ok(moves)
}

/// Brings `vm` and every smaller VM onto `target`, stacked (the bigger ones of the
/// target below them stay where they are).
fn place(s: &mut State, vm: usize, levels: usize, target: Peg, moves: &mut Vec<Move>) -> Result<(), HanoiError> {
    let Some(from) = s.peg_of(vm) else { return Err(HanoiError::Illegal(format!("VM {vm} is on no peg"))) };
    if from != target {
        let spare = 3 - from - target;
        // Everything smaller out of the way, onto the spare peg.
        if vm + 1 < levels {
            place(s, vm + 1, levels, spare, moves)?;
        }
        let m = Move { vm, from, to: target };
        s.apply(m)?;
        moves.push(m);
    }
    if vm + 1 < levels {
        place(s, vm + 1, levels, target, moves)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies every move to `start`, each one legal, and returns where they end.
    fn play(start: &State, moves: &[Move]) -> State {
        let mut s = start.clone();
        for (i, m) in moves.iter().enumerate() {
            s.apply(*m).unwrap_or_else(|e| panic!("move {i} {m:?} from {s}: {e}"));
        }
        s
    }

    #[test]
    fn two_levels_take_three_moves_and_end_nested_on_the_target() {
        let start = State::start(2, 0);
        let moves = plan(&start, 2, 2).expect("a plan");
        assert_eq!(moves, vec![Move { vm: 1, from: 0, to: 1 }, Move { vm: 0, from: 0, to: 2 }, Move { vm: 1, from: 1, to: 2 }]);
        assert_eq!(play(&start, &moves), State::start(2, 2));
    }

    #[test]
    fn three_levels_take_seven_moves_and_end_nested_on_the_target() {
        let start = State::start(3, 0);
        let moves = plan(&start, 3, 2).expect("a plan");
        assert_eq!(moves.len(), 7);
        assert_eq!(moves[0], Move { vm: 2, from: 0, to: 2 });
        assert_eq!(moves[3], Move { vm: 0, from: 0, to: 2 });
        assert_eq!(play(&start, &moves), State::start(3, 2));
    }

    #[test]
    fn five_levels_take_the_optimal_thirty_one_moves() {
        let start = State::start(5, 0);
        let moves = plan(&start, 5, 2).expect("a plan");
        assert_eq!(moves.len(), 31);
        assert_eq!(play(&start, &moves), State::start(5, 2));
    }

    #[test]
    fn a_game_interrupted_half_way_is_planned_from_where_it_stands() {
        // After the first three moves of the 3-level game: VM 0 alone on peg 0, 1 ⊃ 2 on peg 1.
        let state = State { pegs: [vec![0], vec![1, 2], vec![]] };
        let moves = plan(&state, 3, 2).expect("a plan");
        assert_eq!(moves.len(), 4);
        assert_eq!(play(&state, &moves), State::start(3, 2));
    }

    #[test]
    fn a_finished_game_needs_no_move() {
        assert_eq!(plan(&State::start(3, 2), 3, 2), Ok(vec![]));
    }

    #[test]
    fn a_bigger_vm_cannot_go_into_a_smaller_one() {
        let mut s = State { pegs: [vec![0], vec![1], vec![]] };
        assert_eq!(s.apply(Move { vm: 0, from: 0, to: 1 }), Err(HanoiError::TooBig { vm: 0, onto: 1 }));
        assert_eq!(s.apply(Move { vm: 1, from: 2, to: 0 }), Err(HanoiError::EmptyPeg(2)));
    }

    #[test]
    fn an_illegal_state_is_refused_before_planning() {
        let upside_down = State { pegs: [vec![1, 0], vec![], vec![]] };
        assert!(matches!(plan(&upside_down, 2, 2), Err(HanoiError::Illegal(_))));
        let missing = State { pegs: [vec![0], vec![], vec![]] };
        assert!(matches!(plan(&missing, 2, 2), Err(HanoiError::Illegal(_))));
    }

    #[test]
    fn the_holder_of_a_vm_is_the_one_below_it() {
        let s = State::start(3, 1);
        assert_eq!(s.holder_of(0), None);
        assert_eq!(s.holder_of(2), Some(1));
        assert_eq!(s.top(1), Some(2));
        assert_eq!(s.top(0), None);
    }
}
