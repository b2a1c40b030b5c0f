//! [`StandaloneStore`]: the rendezvous store in a process of its own (`hytrain rendezvous`), so that no worker's
//! loss takes the store away. It serves one job (its id and token) run after run, in rounds (see `server`).

use std::net::{IpAddr, SocketAddr};

use hytrain_cluster::JobToken;

use super::server::{Server, World};
use crate::CommError;

/// A rendezvous store that runs on its own, serving the job whose id and token it was given until it is dropped.
///
/// Workers reach it with [`CommOptions::external_store`](crate::CommOptions::external_store) and its address as
/// their master. Each run of the job is a round: the first worker to join sets the round's world size, the others
/// must say the same, and once a round is over (a rank was lost, or every rank left) the next join begins a new
/// round with nothing of the old one left in the store.
pub struct StandaloneStore {
    server: Server,
}

impl StandaloneStore {
    /// Starts listening on `listen` (an unspecified address such as 0.0.0.0 means every interface; port 0 lets
    /// the system pick) for workers of job `job_id` holding `token`.
    pub fn start(listen: SocketAddr, job_id: &str, token: JobToken) -> Result<StandaloneStore, CommError> {
        let only: Option<IpAddr> = Some(listen.ip()).filter(|ip| !ip.is_unspecified());
        let server = Server::start(only, listen.port(), job_id, World::FromJoiners, token)?;
        Ok(StandaloneStore { server })
    }

    /// The address it listens on (with the port the system picked, when asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

impl std::fmt::Debug for StandaloneStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneStore").field("listening", &self.local_addr()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::testutil::{member, on_ranks, opts};
    use crate::{CommOptions, Store};

    fn start() -> (StandaloneStore, CommOptions) {
        let o = CommOptions { external_store: true, ..opts(20, 20) };
        let store = StandaloneStore::start((Ipv4Addr::LOCALHOST, 0).into(), &o.job_id, o.token()).unwrap();
        (store, o)
    }

    #[test]
    fn a_standalone_store_outlives_rank_0_and_serves_the_next_run_with_nothing_of_the_last() {
        let (server, o) = start();
        let port = server.local_addr().port();
        // Run 1: rank 0 is killed after both ranks stored a key; rank 1 learns that rank 0 (not the store) is gone.
        let run1 = on_ranks(2, |rank| {
            let store = Store::rendezvous(&member(rank, 2, port), &o).unwrap();
            assert!(!store.store_in_rank_zero());
            store.set(&format!("run1/{rank}"), b"x").unwrap();
            store.barrier("set").unwrap();
            let live = store.liveness().unwrap();
            if rank == 0 {
                live.sever();
                return None;
            }
            Some((live.wait_lost(Some(Duration::from_secs(10))), store))
        });
        let (lost, old) = run1.into_iter().nth(1).unwrap().unwrap();
        let lost = lost.expect("rank 1 hears of the loss");
        assert_eq!((lost.rank, lost.store), (0, false), "{lost}");
        // Run 2 on the same store: a fresh key space, the same keys and barrier names work again.
        let run2 = on_ranks(2, |rank| -> Result<bool, crate::CommError> {
            let store = Store::rendezvous(&member(rank, 2, port), &o)?;
            let leftover = store.get_timeout("run1/0", Duration::from_millis(200)).is_ok();
            store.barrier("set")?;
            Ok(leftover)
        });
        for r in run2 {
            assert!(!r.unwrap(), "a key of the last run was still in the store");
        }
        // A rank of run 1 that comes back late is told its run is over, with the loss that ended it.
        let late = old.set("late", b"x").unwrap_err();
        assert!(matches!(&late, crate::CommError::RankLost(l) if l.rank == 0 && !l.store), "{late}");
    }

    #[test]
    fn a_standalone_store_serves_a_new_run_after_every_rank_of_the_last_left() {
        let (server, o) = start();
        let port = server.local_addr().port();
        for run in 0..2 {
            let results = on_ranks(3, |rank| {
                let store = Store::rendezvous(&member(rank, 3, port), &o)?;
                store.add("count", 1)?;
                store.barrier("counted")?;
                let n = store.add("count", 0)?;
                store.barrier("read")?;
                store.liveness().unwrap().leave();
                Ok::<_, crate::CommError>(n)
            });
            for r in results {
                assert_eq!(r.unwrap(), 3, "run {run}");
            }
        }
    }

    #[test]
    fn a_rank_whose_world_size_differs_from_its_rounds_is_refused_naming_both() {
        let (server, o) = start();
        let port = server.local_addr().port();
        let waiting = std::thread::spawn({
            let o = CommOptions { rendezvous_timeout: Duration::from_secs(3), ..o.clone() };
            move || Store::rendezvous(&member(0, 2, port), &o).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(500));
        let e = Store::rendezvous(&member(1, 3, port), &o).unwrap_err().to_string();
        assert!(
            e.contains("this rank has world_size 3 but the rank that joined this round of the standalone store before it (rank 0) has 2; every worker must get the same WORLD_SIZE"),
            "{e}"
        );
        assert!(waiting.join().unwrap().is_err(), "rank 0 waited in vain for rank 1");
    }

    #[test]
    fn nodes_of_a_range_are_ranked_in_the_order_they_came_and_rendezvous_as_that_many() {
        let (server, o) = start();
        let port = server.local_addr().port();
        let range = crate::NodeRange { min: 1, max: 3, last_call: Duration::from_millis(700) };
        let results = on_ranks(2, |i| -> Result<(usize, usize), crate::CommError> {
            // Node 1 comes a moment after node 0, inside the last call.
            std::thread::sleep(Duration::from_millis(200 * i as u64));
            let admitted = Store::admit(&member(0, 1, port), &o, &format!("node-{i}"), &range)?;
            let store = Store::rendezvous(&member(admitted.node_rank, admitted.nnodes, port), &o)?;
            store.barrier("admitted")?;
            Ok((admitted.node_rank, admitted.nnodes))
        });
        let got: Vec<(usize, usize)> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, [(0, 2), (1, 2)]);
    }

    #[test]
    fn a_node_that_comes_while_a_round_runs_waits_for_the_next_and_comes_after_the_nodes_of_the_last() {
        let (server, o) = start();
        let port = server.local_addr().port();
        let range = crate::NodeRange { min: 2, max: 3, last_call: Duration::from_millis(300) };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let joiner = std::thread::spawn({
            let o = o.clone();
            move || {
                rx.recv().unwrap();
                let admitted = Store::admit(&member(0, 1, port), &o, "newcomer", &range)?;
                let store = Store::rendezvous(&member(admitted.node_rank, admitted.nnodes, port), &o)?;
                store.barrier("round 2")?;
                Ok::<_, crate::CommError>((admitted.node_rank, admitted.nnodes))
            }
        });
        let results = on_ranks(2, |i| -> Result<Vec<(usize, usize)>, crate::CommError> {
            let node = format!("node-{i}");
            // Round 1: two nodes; node-1 comes first, so it is node rank 0.
            std::thread::sleep(Duration::from_millis(150 * (1 - i as u64)));
            let admitted = Store::admit(&member(0, 1, port), &o, &node, &range)?;
            let store = Store::rendezvous(&member(admitted.node_rank, admitted.nnodes, port), &o)?;
            store.barrier("round 1")?;
            if admitted.node_rank == 0 {
                tx.send(()).unwrap();
            }
            // The running round's ranks see the newcomer wait, and make room: they leave, and come again.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while store.nodes_waiting()? == 0 {
                assert!(std::time::Instant::now() < deadline, "the newcomer never showed as waiting");
                std::thread::sleep(Duration::from_millis(20));
            }
            store.barrier("seen")?;
            store.liveness().unwrap().leave();
            drop(store);
            let again = Store::admit(&member(0, 1, port), &o, &node, &range)?;
            let store = Store::rendezvous(&member(again.node_rank, again.nnodes, port), &o)?;
            store.barrier("round 2")?;
            assert_eq!(store.nodes_waiting()?, 0, "nobody waits any more");
            Ok(vec![(admitted.node_rank, admitted.nnodes), (again.node_rank, again.nnodes)])
        });
        let got: Vec<Vec<(usize, usize)>> = results.into_iter().map(Result::unwrap).collect();
        // node-1 came first in round 1 and keeps its place; the newcomer comes after the old nodes.
        assert_eq!(got, [vec![(1, 2), (1, 3)], vec![(0, 2), (0, 3)]]);
        assert_eq!(joiner.join().unwrap().unwrap(), (2, 3));
    }

    #[test]
    fn after_a_loss_the_nodes_left_are_admitted_as_soon_as_all_are_back_without_the_last_call() {
        let (server, o) = start();
        let port = server.local_addr().port();
        // A last call far longer than the test: only the nodes known to come can close the round after the loss.
        let range = crate::NodeRange { min: 2, max: 3, last_call: Duration::from_secs(60) };
        let results = on_ranks(3, |i| -> Result<Option<(usize, usize, f64)>, crate::CommError> {
            let node = format!("node-{i}");
            std::thread::sleep(Duration::from_millis(100 * i as u64));
            let admitted = Store::admit(&member(0, 1, port), &o, &node, &range)?;
            let store = Store::rendezvous(&member(admitted.node_rank, admitted.nnodes, port), &o)?;
            store.barrier("round 1")?;
            let live = store.liveness().unwrap();
            if admitted.node_rank == 1 {
                // Once the others are out of the barrier, whose answer the loss would otherwise be.
                std::thread::sleep(Duration::from_millis(300));
                live.sever();
                return Ok(None);
            }
            live.wait_lost(Some(Duration::from_secs(10))).expect("the loss is heard");
            drop(store);
            let started = std::time::Instant::now();
            let again = Store::admit(&member(0, 1, port), &o, &node, &range)?;
            let waited = started.elapsed().as_secs_f64();
            let store = Store::rendezvous(&member(again.node_rank, again.nnodes, port), &o)?;
            store.barrier("round 2")?;
            Ok(Some((again.node_rank, again.nnodes, waited)))
        });
        let got: Vec<(usize, usize, f64)> = results.into_iter().filter_map(|r| r.unwrap()).collect();
        assert_eq!(got.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(), [(0, 2), (1, 2)], "old order kept");
        assert!(got.iter().all(|g| g.2 < 10.0), "the last call was waited out: {got:?}");
    }

    #[test]
    fn a_node_whose_wait_for_the_running_round_ends_is_told_why() {
        let (server, o) = start();
        let port = server.local_addr().port();
        let range = crate::NodeRange { min: 1, max: 2, last_call: Duration::from_millis(100) };
        let admitted = Store::admit(&member(0, 1, port), &o, "running", &range).unwrap();
        let _store = Store::rendezvous(&member(admitted.node_rank, admitted.nnodes, port), &o).unwrap();
        let short = CommOptions { rendezvous_timeout: Duration::from_secs(1), ..o.clone() };
        let e = Store::admit(&member(0, 1, port), &short, "late", &range).unwrap_err().to_string();
        assert!(
            e.contains("the job's round of 1 node(s) (at most 2) was still running when this node's wait ended"),
            "{e}"
        );
    }

    #[test]
    fn a_job_below_min_fails_after_the_rendezvous_timeout_naming_how_many_came_and_were_needed() {
        let (server, o) = start();
        let port = server.local_addr().port();
        let o = CommOptions { rendezvous_timeout: Duration::from_secs(1), ..o };
        let range = crate::NodeRange { min: 2, max: 3, last_call: Duration::from_millis(200) };
        let e = Store::admit(&member(0, 1, port), &o, "alone", &range).unwrap_err();
        assert!(matches!(e, crate::CommError::TooFewNodes { came: 1, needed: 2, .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "only 1 of the at least 2 nodes the job needs (--nnodes 2:3) came to the rendezvous store at 127.0.0.1:{port} within 1 s"
            )),
            "{text}"
        );
        // Having left, it no longer counts: two nodes that come later make a round of two.
        let later = on_ranks(2, |i| Store::admit(&member(0, 1, port), &o, &format!("later-{i}"), &range));
        for r in later {
            assert_eq!(r.unwrap().nnodes, 2);
        }
    }

    #[test]
    fn a_node_that_dies_while_waiting_for_admission_no_longer_counts() {
        let (server, o) = start();
        let port = server.local_addr().port();
        let range = crate::NodeRange { min: 2, max: 3, last_call: Duration::from_millis(500) };
        // A node asks to be admitted, then its process dies (its connection closes) before MIN are in.
        let m = member(0, 1, port);
        let started = std::time::Instant::now();
        let deadline = started + Duration::from_secs(10);
        let mut dead = super::super::client::connect_with_retry(&m, &o, &["127.0.0.1"], started, deadline).unwrap();
        let ask = super::super::admission::Ask {
            node: "dead".into(),
            min: range.min,
            max: range.max,
            last_call: range.last_call,
            local_world_size: 1,
        };
        std::io::Write::write_all(
            &mut dead,
            &super::super::protocol::admit_request(&o.job_id, &ask, Duration::from_secs(10)),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(dead);
        std::thread::sleep(Duration::from_millis(600));
        // Two live nodes make a round of two: the dead one is not among them.
        let live = on_ranks(2, |i| Store::admit(&m, &o, &format!("live-{i}"), &range));
        for r in live {
            assert_eq!(r.unwrap().nnodes, 2);
        }
    }

    #[test]
    fn a_store_hosted_by_rank_0_refuses_a_range_of_nodes() {
        let port = crate::testutil::free_port();
        let o = opts(5, 5);
        let _rank0 = std::thread::spawn(move || Store::rendezvous(&member(0, 2, port), &opts(3, 3)));
        std::thread::sleep(Duration::from_millis(300));
        let range = crate::NodeRange { min: 1, max: 2, last_call: Duration::from_secs(1) };
        let e = Store::admit(&member(0, 1, port), &o, "n", &range).unwrap_err().to_string();
        assert!(e.contains("a range of nodes needs a standalone store (hytrain rendezvous)"), "{e}");
    }

    #[test]
    fn a_standalone_store_on_a_taken_port_fails_naming_the_port() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = taken.local_addr().unwrap();
        let e = StandaloneStore::start(addr, "job", hytrain_cluster::JobToken::default_for("job")).unwrap_err();
        assert!(e.to_string().contains(&format!("on port {}", addr.port())), "{e}");
    }
}
