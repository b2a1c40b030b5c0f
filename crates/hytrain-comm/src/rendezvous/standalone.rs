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
    fn a_standalone_store_on_a_taken_port_fails_naming_the_port() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = taken.local_addr().unwrap();
        let e = StandaloneStore::start(addr, "job", hytrain_cluster::JobToken::default_for("job")).unwrap_err();
        assert!(e.to_string().contains(&format!("on port {}", addr.port())), "{e}");
    }
}
