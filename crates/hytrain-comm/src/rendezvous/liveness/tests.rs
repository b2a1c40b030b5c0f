//! Liveness on its own: both ends of real watch connections over loopback, with the store's side held by a small
//! [`WatchHost`] instead of a whole store. The only faults injected are a peer that goes silent or closes its socket.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;

const PEER_TIMEOUT: Duration = Duration::from_millis(500);
/// Far longer than any verdict takes; only reached when a test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// The store's liveness state without the store: what a server keeps under its lock.
struct Board {
    watches: Mutex<Watches>,
    changed: Condvar,
    world: usize,
}

impl Board {
    fn new(world: usize) -> Arc<Board> {
        Arc::new(Board { watches: Mutex::new(Watches::default()), changed: Condvar::new(), world })
    }

    fn lost(&self) -> Option<LostRank> {
        self.watches.lock().unwrap().lost().cloned()
    }

    /// Waits until the board records a loss.
    fn wait_lost(&self) -> LostRank {
        assert!(self.wait_watches(Instant::now() + PATIENCE, &mut |w| w.lost().is_some()), "no loss recorded");
        self.lost().unwrap()
    }
}

impl WatchHost for Board {
    fn with_watches(&self, f: &mut dyn FnMut(&mut Watches, usize)) {
        f(&mut self.watches.lock().unwrap(), self.world);
    }

    fn notify(&self) {
        self.changed.notify_all();
    }

    fn wait_watches(&self, deadline: Instant, ready: &mut dyn FnMut(&Watches) -> bool) -> bool {
        let mut w = self.watches.lock().unwrap();
        loop {
            if ready(&w) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            w = self.changed.wait_timeout(w, deadline - now).unwrap().0;
        }
    }
}

/// A connected loopback pair: (the rank's end, the store's end and the rank's address as the store sees it).
fn socket_pair() -> (TcpStream, TcpStream, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let rank_end = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (store_end, peer) = listener.accept().unwrap();
    (rank_end, store_end, peer)
}

/// Serves the store's end of a watch for `rank` on its own thread, as the server does after `OP_WATCH`.
fn serve(board: &Arc<Board>, store_end: TcpStream, peer: SocketAddr, rank: usize) -> JoinHandle<()> {
    let board = board.clone();
    std::thread::spawn(move || {
        let _ = serve_watch(store_end, peer, &*board, rank, PEER_TIMEOUT);
    })
}

/// `rank`'s watch on `board`, both ends real; `hosts_store` makes it rank 0, whose leave waits for the others.
fn watch(board: &Arc<Board>, rank: usize, hosts_store: bool) -> Liveness {
    let (mut rank_end, store_end, peer) = socket_pair();
    serve(board, store_end, peer, rank);
    rank_end.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(get_u8(&mut rank_end).unwrap(), ST_OK, "watch of rank {rank} refused");
    let server = hosts_store.then(|| board.clone() as Arc<dyn WatchHost>);
    Liveness::start(rank_end, rank, board.world, PEER_TIMEOUT, in_rank_zero("master:29500"), server).unwrap()
}

#[test]
fn a_rank_whose_watch_closes_without_a_goodbye_is_lost_and_every_other_rank_learns_it() {
    let board = Board::new(3);
    let ranks: Vec<Liveness> = (0..3).map(|r| watch(&board, r, r == 0)).collect();
    ranks[1].sever();
    let lost = board.wait_lost();
    assert_eq!(lost.rank, 1);
    assert_eq!(lost.host, "127.0.0.1");
    assert!(lost.cause.contains("closed"), "{}", lost.cause);
    for r in [0, 2] {
        assert_eq!(ranks[r].wait_lost(Some(PATIENCE)), Some(lost.clone()), "rank {r}");
    }
}

#[test]
fn only_the_first_loss_is_kept_so_ranks_failing_because_of_it_are_not_blamed() {
    let board = Board::new(3);
    let ranks: Vec<Liveness> = (0..3).map(|r| watch(&board, r, r == 0)).collect();
    ranks[1].sever();
    let first = ranks[0].wait_lost(Some(PATIENCE)).expect("rank 0 hears of the loss");
    assert_eq!(first.rank, 1);
    // Rank 2 gives up because of it, and its watch closes: neither replaces the first loss.
    ranks[2].abandon();
    std::thread::sleep(PEER_TIMEOUT);
    assert_eq!(board.lost(), Some(first.clone()));
    assert_eq!(ranks[0].lost(), Some(first));
}

#[test]
fn a_rank_that_abandons_is_lost_at_once_naming_its_own_error() {
    let board = Board::new(2);
    let rank0 = watch(&board, 0, true);
    let rank1 = watch(&board, 1, false);
    let started = Instant::now();
    rank1.abandon();
    let lost = rank0.wait_lost(Some(PATIENCE)).expect("rank 0 hears of it");
    assert!(started.elapsed() < PEER_TIMEOUT, "took {:?}", started.elapsed());
    assert_eq!(lost.rank, 1);
    assert!(lost.cause.contains("error of its own"), "{}", lost.cause);
    // The rank that gave up gets the same verdict as every other rank (its watch is not closed until the store
    // has told every watch), so all ranks report one cause.
    assert_eq!(rank1.wait_lost(Some(PATIENCE)), Some(lost));
}

#[test]
fn a_goodbye_is_no_loss_and_rank_0_leaves_once_every_rank_has() {
    let board = Board::new(3);
    let rank0 = watch(&board, 0, true);
    let rank1 = watch(&board, 1, false);
    let rank2 = watch(&board, 2, false);
    rank1.leave();
    drop(rank2); // dropping the last handle says goodbye too
    let started = Instant::now();
    rank0.leave();
    assert!(started.elapsed() < PEER_TIMEOUT, "rank 0 waited {:?} although every rank had left", started.elapsed());
    // Several peer timeouts later still nobody counts as lost: the closed watches were goodbyes.
    std::thread::sleep(PEER_TIMEOUT * 2);
    assert_eq!(board.lost(), None);
    assert_eq!(rank0.lost(), None);
    assert_eq!(rank1.lost(), None);
    assert!(board.watches.lock().unwrap().all_left(3));
    // A rank that left waits for nothing.
    assert_eq!(rank1.wait_lost(None), None);
}

#[test]
fn rank_0_leaving_waits_for_a_rank_still_at_work_at_most_the_peer_timeout() {
    let board = Board::new(2);
    let rank0 = watch(&board, 0, true);
    let rank1 = watch(&board, 1, false);
    let started = Instant::now();
    rank0.leave();
    let waited = started.elapsed();
    assert!(waited >= PEER_TIMEOUT, "rank 0 left after {waited:?}, before rank 1");
    assert!(waited < PATIENCE, "rank 0 waited {waited:?}");
    // Rank 1 beats on, so it is still not lost.
    assert_eq!(board.lost(), None);
    assert_eq!(rank1.lost(), None);
}

#[test]
fn a_rank_silent_past_the_peer_timeout_is_lost_though_its_connection_stays_open() {
    let board = Board::new(2);
    // The fault: a rank whose process is stopped keeps its socket open and sends nothing.
    let (mut silent, store_end, peer) = socket_pair();
    let started = Instant::now();
    serve(&board, store_end, peer, 1);
    assert_eq!(get_u8(&mut silent).unwrap(), ST_OK);
    let lost = board.wait_lost();
    let waited = started.elapsed();
    assert_eq!(lost.rank, 1);
    assert!(lost.cause.contains("no heartbeat"), "{}", lost.cause);
    assert!(waited >= PEER_TIMEOUT, "declared lost after {waited:?}");
    assert!(waited < PEER_TIMEOUT * 10, "declared lost only after {waited:?}");
    drop(silent);
}

#[test]
fn a_rank_that_beats_is_never_lost_however_long_it_is_idle() {
    let board = Board::new(2);
    let _rank0 = watch(&board, 0, true);
    let rank1 = watch(&board, 1, false);
    std::thread::sleep(PEER_TIMEOUT * 4);
    assert_eq!(board.lost(), None);
    assert_eq!(rank1.lost(), None);
}

#[test]
fn a_store_silent_past_the_peer_timeout_is_rank_0_lost() {
    // The fault: the store's process is stopped; its socket stays open and sends nothing.
    let (rank_end, _silent_store, _) = socket_pair();
    let started = Instant::now();
    let live = Liveness::start(rank_end, 1, 2, PEER_TIMEOUT, in_rank_zero("algo-1:7777"), None).unwrap();
    let lost = live.wait_lost(Some(PATIENCE)).expect("the silent store is noticed");
    let waited = started.elapsed();
    assert_eq!((lost.rank, lost.host.as_str()), (0, "algo-1:7777"));
    assert!(lost.cause.contains("sent nothing"), "{}", lost.cause);
    assert!(waited >= PEER_TIMEOUT, "declared lost after {waited:?}");
}

#[test]
fn a_store_that_closes_the_watch_is_rank_0_lost_at_once() {
    let (rank_end, store_end, _) = socket_pair();
    let live = Liveness::start(rank_end, 1, 2, PEER_TIMEOUT, in_rank_zero("algo-1:7777"), None).unwrap();
    let started = Instant::now();
    drop(store_end);
    let lost = live.wait_lost(Some(PATIENCE)).expect("the closed store is noticed");
    assert!(started.elapsed() < PEER_TIMEOUT, "took {:?}", started.elapsed());
    assert_eq!(lost.rank, 0);
    assert!(lost.cause.contains("closed") || lost.cause.contains("broke"), "{}", lost.cause);
}

#[test]
fn a_loss_runs_every_abort_and_wakes_every_waiter() {
    let board = Board::new(2);
    let rank0 = watch(&board, 0, true);
    let rank1 = watch(&board, 1, false);
    let (aborted, abort_seen) = mpsc::channel();
    let _registration = rank0.on_lost(move || {
        let _ = aborted.send(());
    });
    let dropped_runs = Arc::new(AtomicUsize::new(0));
    let dropped = rank0.on_lost({
        let runs = dropped_runs.clone();
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
        }
    });
    drop(dropped);
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let live = rank0.clone();
            std::thread::spawn(move || live.wait_lost(None))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    rank1.sever();
    abort_seen.recv_timeout(PATIENCE).expect("the abort ran on the loss");
    for w in waiters {
        assert_eq!(w.join().unwrap().map(|l| l.rank), Some(1));
    }
    assert_eq!(dropped_runs.load(Ordering::SeqCst), 0, "a dropped registration ran");
    // Registered after the verdict: runs at once.
    let (late, late_seen) = mpsc::channel();
    let _late = rank0.on_lost(move || {
        let _ = late.send(());
    });
    late_seen.recv_timeout(Duration::from_millis(100)).expect("an abort registered after the loss runs at once");
}

#[test]
fn a_watch_for_a_rank_outside_the_job_or_watched_already_is_refused() {
    let board = Board::new(2);
    let _rank1 = watch(&board, 1, false);
    for rank in [1, 2] {
        let (mut rank_end, store_end, peer) = socket_pair();
        serve(&board, store_end, peer, rank).join().unwrap();
        rank_end.set_read_timeout(Some(PATIENCE)).unwrap();
        assert_eq!(get_u8(&mut rank_end).unwrap(), ST_ERR, "rank {rank}");
        let why = String::from_utf8(get_bytes_max(&mut rank_end, MAX_TEXT).unwrap()).unwrap();
        assert!(why.contains(&format!("rank {rank} cannot be watched")), "{why}");
    }
    assert_eq!(board.lost(), None, "a refused watch is no loss");
}

#[test]
fn beats_go_out_several_times_per_peer_timeout_but_at_least_once_a_second() {
    assert_eq!(beat_interval(Duration::from_secs(30)), Duration::from_secs(1));
    assert_eq!(beat_interval(Duration::from_millis(500)), Duration::from_millis(100));
    assert_eq!(beat_interval(Duration::from_millis(10)), Duration::from_millis(20));
}

#[test]
fn loss_notices_decode_what_they_encode() {
    let lost = LostRank { rank: 7, host: "10.0.0.7".into(), cause: "no heartbeat for 30 s".into(), store: false };
    let mut frame = Vec::new();
    encode_lost(&mut frame, &lost);
    assert_eq!(decode_lost(&mut frame.as_slice()).unwrap(), lost);
    assert!(decode_lost(&mut &frame[..frame.len() - 1]).is_err());
}

fn in_rank_zero(endpoint: &str) -> StoreSide {
    StoreSide { endpoint: endpoint.into(), in_rank_zero: true }
}

#[test]
fn a_standalone_store_that_closes_the_watch_is_the_store_lost_not_rank_0() {
    let (rank_end, store_end, _) = socket_pair();
    let side = StoreSide { endpoint: "rdzv:29400".into(), in_rank_zero: false };
    let live = Liveness::start(rank_end, 1, 2, PEER_TIMEOUT, side, None).unwrap();
    drop(store_end);
    let lost = live.wait_lost(Some(PATIENCE)).expect("the closed store is noticed");
    assert!(lost.store, "{lost}");
    let text = lost.to_string();
    assert!(text.starts_with("lost the rendezvous store at rdzv:29400: the store "), "{text}");
    assert!(text.contains("(its process exited or was killed)") && !text.contains("rank 0"), "{text}");
}
