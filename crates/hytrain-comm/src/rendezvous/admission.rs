//! Admission of nodes to a round of a standalone store, for a job whose node count is a range (`--nnodes MIN:MAX`,
//! `PET_NNODES=MIN:MAX`), as torchrun's c10d rendezvous does: nodes are admitted up to MAX; once MIN are in, a last
//! call of `last_call` lets more come, and the round closes when it ends or MAX are in. Each node gets its node rank
//! in the order it came, except that the nodes of the round before come first, in their old order (so the ranks
//! that carry on keep global rank 0 among them, and with it the state the others take). When the round before
//! ended with nodes known to come (its nodes but a lost one, and those that waited for it to end), the round closes
//! as soon as they are all in (with at least MIN), without the last call: ranks that carry on after a loss wait
//! for nobody else, and a node that comes later is made room for at a step boundary. A node that finds the round
//! closed waits for the next (the server's business); one that waits past its own deadline with fewer than MIN in
//! leaves and is told how many came.
//!
//! Only the bookkeeping lives here, under the store's lock; the server blocks the requests on its condition variable.

use std::time::{Duration, Instant};

/// What one node asks for; every node of a round must ask the same `min`, `max` and `local_world_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ask {
    /// Tells the node's processes apart from other nodes' (its host name and process id).
    pub(crate) node: String,
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) last_call: Duration,
    pub(crate) local_world_size: usize,
}

/// The admission of one round.
#[derive(Debug)]
pub(crate) struct Admission {
    ask: Ask,
    /// Admitted nodes, in the order they came: the index is the node rank.
    nodes: Vec<String>,
    /// When MIN nodes were first in: the last call runs from there.
    min_reached: Option<Instant>,
    closed: bool,
    /// The nodes of the round before, in node-rank order: they come first when the round closes.
    previous: Vec<String>,
    /// The nodes known to come (see the module's documentation); empty for a job's first round.
    expected: Vec<String>,
}

/// Where a node stands after a look at the admission.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Admitted: its node rank, and the round's node count.
    Admitted { node_rank: usize, nnodes: usize },
    /// Not yet decided; look again by this instant at the latest.
    Waiting { until: Option<Instant> },
    /// Refused, with the reason.
    Refused(String),
}

impl Admission {
    /// A round's admission, opened by its first node; `previous` are the nodes of the round before, in node-rank
    /// order, and `expected` those known to come.
    pub(crate) fn open(ask: &Ask, previous: Vec<String>, expected: Vec<String>) -> Admission {
        Admission { ask: ask.clone(), nodes: Vec::new(), min_reached: None, closed: false, previous, expected }
    }

    /// Processes per node.
    pub(crate) fn local_world_size(&self) -> usize {
        self.ask.local_world_size
    }

    /// The admitted nodes, in node-rank order once closed.
    pub(crate) fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Whether the round's node count is settled.
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    /// Processes of the round once closed: nodes times processes per node.
    pub(crate) fn world_size(&self) -> usize {
        self.nodes.len() * self.ask.local_world_size
    }

    /// Registers `ask`'s node (once) and says where it stands at `now`.
    pub(crate) fn arrive(&mut self, ask: &Ask, now: Instant) -> Standing {
        let mine = &self.ask;
        if (ask.min, ask.max, ask.local_world_size) != (mine.min, mine.max, mine.local_world_size) {
            return Standing::Refused(format!(
                "this node asks for {}:{} nodes of {} process(es) but the round was opened for {}:{} nodes of {}; \
                 every node must get the same --nnodes and processes per node",
                ask.min, ask.max, ask.local_world_size, mine.min, mine.max, mine.local_world_size
            ));
        }
        if !self.nodes.contains(&ask.node) {
            if self.closed {
                return Standing::Refused(format!(
                    "the round already closed with {} node(s); this node came too late (restarted, it joins the next run)",
                    self.nodes.len()
                ));
            }
            self.nodes.push(ask.node.clone());
            if self.nodes.len() == self.ask.min {
                self.min_reached = Some(now);
            }
        }
        self.look(&ask.node, now)
    }

    /// Where `node` stands at `now`, closing the round when MAX are in or the last call is over.
    pub(crate) fn look(&mut self, node: &str, now: Instant) -> Standing {
        let last_call_ends = self.min_reached.map(|t| t + self.ask.last_call);
        let all_expected = !self.expected.is_empty()
            && self.nodes.len() >= self.ask.min
            && self.expected.iter().all(|n| self.nodes.contains(n));
        if !self.closed
            && (self.nodes.len() >= self.ask.max || all_expected || last_call_ends.is_some_and(|t| now >= t))
        {
            self.closed = true;
            // Stable: the newcomers keep the order they came in.
            let previous = &self.previous;
            self.nodes.sort_by_key(|n| previous.iter().position(|p| p == n).unwrap_or(usize::MAX));
        }
        match self.nodes.iter().position(|n| n == node) {
            Some(node_rank) if self.closed => Standing::Admitted { node_rank, nnodes: self.nodes.len() },
            Some(_) => Standing::Waiting { until: last_call_ends },
            None => Standing::Refused("this node is not in the round".into()),
        }
    }

    /// `node` gives up before the round closed (its deadline passed): it no longer counts. Returns how many
    /// nodes came and how many were needed.
    pub(crate) fn leave(&mut self, node: &str) -> (usize, usize) {
        let came = self.nodes.len();
        if !self.closed {
            self.nodes.retain(|n| n != node);
            if self.nodes.len() < self.ask.min {
                self.min_reached = None;
            }
        }
        (came, self.ask.min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(node: &str, min: usize, max: usize) -> Ask {
        Ask { node: node.into(), min, max, last_call: Duration::from_secs(30), local_world_size: 1 }
    }

    #[test]
    fn nodes_get_ranks_in_the_order_they_came_and_the_round_closes_at_max() {
        let now = Instant::now();
        let mut a = Admission::open(&ask("a", 1, 3), Vec::new(), Vec::new());
        assert!(matches!(a.arrive(&ask("c", 1, 3), now), Standing::Waiting { until: Some(_) }));
        assert!(matches!(a.arrive(&ask("a", 1, 3), now), Standing::Waiting { .. }));
        assert_eq!(a.arrive(&ask("b", 1, 3), now), Standing::Admitted { node_rank: 2, nnodes: 3 });
        assert_eq!(a.look("c", now), Standing::Admitted { node_rank: 0, nnodes: 3 });
        assert_eq!(a.world_size(), 3);
    }

    #[test]
    fn once_min_are_in_the_round_closes_when_the_last_call_ends() {
        let t0 = Instant::now();
        let mut a = Admission::open(&ask("a", 2, 4), Vec::new(), Vec::new());
        assert_eq!(a.arrive(&ask("a", 2, 4), t0), Standing::Waiting { until: None });
        let until = t0 + Duration::from_secs(1) + Duration::from_secs(30);
        assert_eq!(a.arrive(&ask("b", 2, 4), t0 + Duration::from_secs(1)), Standing::Waiting { until: Some(until) });
        assert_eq!(a.look("a", until), Standing::Admitted { node_rank: 0, nnodes: 2 });
        let late = a.arrive(&ask("c", 2, 4), until);
        assert!(matches!(&late, Standing::Refused(why) if why.contains("already closed with 2 node(s)")), "{late:?}");
    }

    #[test]
    fn a_node_that_gives_up_below_min_no_longer_counts_and_hears_how_many_came() {
        let t0 = Instant::now();
        let mut a = Admission::open(&ask("a", 3, 3), Vec::new(), Vec::new());
        a.arrive(&ask("a", 3, 3), t0);
        a.arrive(&ask("b", 3, 3), t0);
        assert_eq!(a.leave("a"), (2, 3));
        assert_eq!(a.arrive(&ask("c", 3, 3), t0), Standing::Waiting { until: None });
        assert_eq!(a.arrive(&ask("d", 3, 3), t0), Standing::Admitted { node_rank: 2, nnodes: 3 });
    }

    #[test]
    fn a_node_asking_for_another_range_is_refused_naming_both() {
        let mut a = Admission::open(&ask("a", 1, 2), Vec::new(), Vec::new());
        let e = a.arrive(&ask("b", 1, 3), Instant::now());
        assert!(
            matches!(&e, Standing::Refused(why) if why.starts_with("this node asks for 1:3 nodes of 1 process(es) but the round was opened for 1:2 nodes of 1")),
            "{e:?}"
        );
    }

    #[test]
    fn the_nodes_of_the_round_before_come_first_in_their_old_order_then_newcomers_as_they_came() {
        let now = Instant::now();
        let mut a = Admission::open(&ask("new-1", 3, 4), vec!["b".into(), "a".into(), "c".into()], Vec::new());
        for node in ["new-1", "a", "new-2", "b"] {
            a.arrive(&ask(node, 3, 4), now);
        }
        assert!(a.closed());
        assert_eq!(a.nodes(), ["b", "a", "new-1", "new-2"]);
        assert_eq!(a.look("new-1", now), Standing::Admitted { node_rank: 2, nnodes: 4 });
    }

    #[test]
    fn a_round_whose_nodes_are_known_closes_once_they_are_in_without_the_last_call() {
        let now = Instant::now();
        // Three nodes ran, "b" was lost: "a" and "c" are expected, and the round closes once both are in.
        let previous = vec!["a".to_string(), "c".to_string()];
        let mut a = Admission::open(&ask("c", 2, 4), previous.clone(), previous);
        assert_eq!(a.arrive(&ask("c", 2, 4), now), Standing::Waiting { until: None });
        assert_eq!(a.arrive(&ask("a", 2, 4), now), Standing::Admitted { node_rank: 0, nnodes: 2 });
        assert_eq!(a.look("c", now), Standing::Admitted { node_rank: 1, nnodes: 2 });
        // Below MIN the known nodes alone do not close it.
        let mut b = Admission::open(&ask("a", 3, 4), vec!["a".into()], vec!["a".into()]);
        assert!(matches!(b.arrive(&ask("a", 3, 4), now), Standing::Waiting { .. }));
    }
}
