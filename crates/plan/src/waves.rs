//! Packs a sequential plan into parallel waves.
//!
//! During a wave a migrating VM holds its resources on both ends: its source frees
//! them only when the wave ends, its destination holds them from the wave's start. So
//! the peak load of a host in wave `w` is its load when `w` starts plus everything
//! arriving in `w`. Each migration, in plan order, goes into the earliest wave after
//! its VM's previous migration where its destination's peak stays within capacity in
//! that wave and every later one (the later waves were packed assuming it absent),
//! and where neither end already takes part in `max_parallel` migrations. Putting it
//! there only lowers its source's later load, so every earlier placement stays valid,
//! and one migration per wave (the sequential plan itself) is always a fallback.

use crate::problem::{Move, Problem, Res};

/// Per host, the peak load of every wave packed so far, and the load after them.
struct Profile {
    peak: Vec<Vec<Res>>,
    parts: Vec<Vec<u32>>,
    end: Vec<Res>,
}

impl Profile {
    fn peak(&self, h: usize, w: usize) -> Res {
        self.peak[h].get(w).copied().unwrap_or(self.end[h])
    }

    fn parts(&self, h: usize, w: usize) -> u32 {
        self.parts[h].get(w).copied().unwrap_or(0)
    }

    fn extend(&mut self, h: usize, waves: usize) {
        let end = self.end[h];
        if self.peak[h].len() < waves {
            self.peak[h].resize(waves, end);
        }
        if self.parts[h].len() < waves {
            self.parts[h].resize(waves, 0);
        }
    }
}

/// The wave (0-based) of each move, and the number of waves.
pub(crate) fn pack(p: &Problem, moves: &[Move]) -> (Vec<u32>, u32) {
    let mut prof = Profile { peak: vec![Vec::new(); p.n_hosts()], parts: vec![Vec::new(); p.n_hosts()], end: p.loads(&p.start) };
    let mut last_wave: Vec<Option<usize>> = vec![None; p.n_vms()];
    let mut waves = 0usize;
    let mut out = Vec::with_capacity(moves.len());
    let limit = p.max_parallel;
    for m in moves {
        let (v, s, d) = (m.vm as usize, m.from as usize, m.to as usize);
        let req = p.req[v];
        let lo = last_wave[v].map_or(0, |w| w + 1);
        // Scan down from the newest wave: `ok` holds while d has room in w..waves.
        let mut chosen = waves.max(lo);
        let mut w = waves;
        while w > lo {
            w -= 1;
            if !prof.peak(d, w).fits_with(req, p.cap[d]) {
                break;
            }
            if prof.parts(s, w) < limit && prof.parts(d, w) < limit {
                chosen = w;
            }
        }
        let w = chosen;
        waves = waves.max(w + 1);
        prof.extend(s, waves);
        prof.extend(d, waves);
        for x in w..waves {
            prof.peak[d][x] = prof.peak[d][x].add(req);
        }
        for x in w + 1..waves {
            prof.peak[s][x] = prof.peak[s][x].sub(req);
        }
        prof.end[d] = prof.end[d].add(req);
        prof.end[s] = prof.end[s].sub(req);
        prof.parts[s][w] += 1;
        prof.parts[d][w] += 1;
        last_wave[v] = Some(w);
        out.push(u32::try_from(w).unwrap_or(u32::MAX));
    }
    (out, u32::try_from(waves).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Case;
    use crate::validate::compile;

    fn problem(json: &str) -> Problem {
        compile(&Case::from_json(json).expect("parses")).expect("valid").problem
    }

    const FOUR: &str = r#"[{"name":"h1","memory_mib":4096},{"name":"h2","memory_mib":4096},
                           {"name":"h3","memory_mib":4096},{"name":"h4","memory_mib":4096}]"#;

    #[test]
    fn independent_migrations_share_a_wave() {
        let p = problem(&format!(
            r#"{{"hosts":{FOUR},"vms":[{{"name":"a","memory_mib":1024}},{{"name":"b","memory_mib":1024}}],
               "current":{{"a":"h1","b":"h3"}},"target":{{"a":"h2","b":"h4"}}}}"#
        ));
        let moves = [Move { vm: 0, from: 0, to: 1 }, Move { vm: 1, from: 2, to: 3 }];
        assert_eq!(pack(&p, &moves), (vec![0, 0], 1));
    }

    #[test]
    fn parallel_limit_of_one_splits_migrations_sharing_a_host() {
        let p = problem(&format!(
            r#"{{"hosts":{FOUR},"vms":[{{"name":"a","memory_mib":1024}},{{"name":"b","memory_mib":1024}}],
               "current":{{"a":"h1","b":"h1"}},"target":{{"a":"h2","b":"h3"}}}}"#
        ));
        let moves = [Move { vm: 0, from: 0, to: 1 }, Move { vm: 1, from: 0, to: 2 }];
        assert_eq!(pack(&p, &moves), (vec![0, 1], 2));
    }

    #[test]
    fn source_memory_is_held_until_the_wave_ends() {
        // b can only enter h2 once a has left it, which frees h2 only after a's wave.
        let p = problem(
            r#"{"hosts":[{"name":"h1","memory_mib":3000},{"name":"h2","memory_mib":3000},
                         {"name":"h3","memory_mib":3000}],
                "vms":[{"name":"a","memory_mib":2000},{"name":"b","memory_mib":2000}],
                "current":{"a":"h2","b":"h3"},"target":{"a":"h1","b":"h2"}}"#,
        );
        let moves = [Move { vm: 0, from: 1, to: 0 }, Move { vm: 1, from: 2, to: 1 }];
        assert_eq!(pack(&p, &moves), (vec![0, 1], 2));
    }
}
