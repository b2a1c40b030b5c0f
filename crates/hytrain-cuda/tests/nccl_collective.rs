//! The NCCL backend ([`NcclCollective`]) on a machine without a GPU: stand-in `libcuda.so.1` and `libnccl.so.2`,
//! tiny C libraries built here with `cc` that export the real functions under their real names and signatures,
//! keep host memory as "device" memory, and let a test make an operation hang, fail or report an asynchronous
//! error on demand (what a real GPU cannot do on cue). They record the calls in one trace, so the tests check the
//! order of events, streams and NCCL calls. The id exchange runs through a real rendezvous store. Following
//! libtorch's current stream goes through the real stream shim and a stand-in libc10_cuda.so.

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hytrain_comm::testing::free_port;
use hytrain_cuda::{
    exchange_unique_id, CudaDriver, CudaError, DType, DeviceCollective, DeviceReduceOp, DeviceSlice, Nccl,
    NcclCollective, Origin, Search, SideStream, TorchStreams, UniqueId,
};

mod stand_in_c10_cuda;

fn build(dir: &Path, name: &str, source: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&c)
        .status()
        .unwrap_or_else(|e| panic!("these tests build stand-in libraries with a C compiler ({cc}): {e}"));
    assert!(status.success(), "{cc} failed on {}", c.display());
    out
}

/// A driver with two GPUs. Streams are numbers, events an int that says whether the work before them is done;
/// `standin_hang(1)` makes every event recorded on a communication stream (not stream 0) stay pending forever.
const DRIVER: &str = r#"
#include <stdlib.h>
#include <string.h>
static int hang = 0, retained = 0, events = 0, streams = 0;
static char trace[4096];
void standin_trace(const char *s) {
    if (strlen(trace) + strlen(s) + 2 < sizeof trace) { if (trace[0]) strcat(trace, " "); strcat(trace, s); }
}
const char *standin_trace_text(void) { return trace; }
void standin_hang(int h) { hang = h; }
int standin_live(void) { return retained * 100 + streams * 10 + events; }
int cuInit(unsigned f) { (void)f; return 0; }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuDeviceGetCount(int *n) { *n = 2; return 0; }
int cuGetErrorName(int c, const char **s) { (void)c; *s = "CUDA_ERROR_STAND_IN"; return 0; }
int cuGetErrorString(int c, const char **s) { (void)c; *s = "stand-in"; return 0; }
int cuDeviceGet(int *d, int o) { *d = o; return 0; }
int cuDeviceGetAttribute(int *v, int a, int d) { (void)a; (void)d; *v = 9; return 0; }
int cuDeviceGetName(char *s, int n, int d) { (void)n; (void)d; strcpy(s, "Stand-in GPU"); return 0; }
int cuDevicePrimaryCtxRetain(void **c, int d) { retained++; *c = (void *)(long)(d + 100); return 0; }
int cuDevicePrimaryCtxRelease_v2(int d) { (void)d; retained--; return 0; }
int cuCtxSetCurrent(void *c) { (void)c; return 0; }
static long created = 0;
static int stream_create_result = 0;
void standin_stream_create_result(int r) { stream_create_result = r; }
/* The first stream made is 0x1001 if non-blocking (flag 1), the second 0x2001, and so on. */
int cuStreamCreate(void **s, unsigned f) {
    if (stream_create_result) return stream_create_result;
    streams++; *s = (void *)(0x1000 * ++created + f); return 0;
}
int cuStreamDestroy_v2(void *s) { (void)s; streams--; return 0; }
int cuEventCreate(void **e, unsigned f) { (void)f; events++; *e = calloc(1, sizeof(int)); return 0; }
int cuEventDestroy_v2(void *e) { events--; free(e); return 0; }
static void *recorded[64], *waited[64];
static int nrecorded = 0, nwaited = 0;
void *standin_recorded(int i) { return i < nrecorded ? recorded[i] : (void *)-1; }
void *standin_waited(int i) { return i < nwaited ? waited[i] : (void *)-1; }
int cuEventRecord(void *e, void *s) {
    if (nrecorded < 64) recorded[nrecorded++] = s;
    *(int *)e = s != 0 && hang;
    standin_trace(s ? "record:comm" : "record:compute");
    return 0;
}
int cuEventQuery(void *e) { return *(int *)e ? 600 : 0; }
int cuStreamWaitEvent(void *s, void *e, unsigned f) {
    if (nwaited < 64) waited[nwaited++] = s;
    (void)e; (void)f; standin_trace(s ? "wait:comm" : "wait:compute"); return 0;
}
"#;

/// An NCCL 2.28.9 whose collectives work on host memory as if every rank held the same data.
const NCCL: &str = r#"
#include <stdlib.h>
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
static void (*trace)(const char *) = 0;
static int async_error = 0, call_result = 0, init_result = 0, aborts = 0, destroys = 0, nranks = 0, ids = 0;
static int last_dtype = -1, last_op = -1, last_root = -1;
static size_t last_count = 0;
static void *last_stream = 0;
void standin_set_trace(void (*f)(const char *)) { trace = f; }
static void t(const char *s) { if (trace) trace(s); }
void standin_async_error(int e) { async_error = e; }
void standin_call_result(int e) { call_result = e; }
void standin_init_result(int e) { init_result = e; }
int standin_aborts(void) { return aborts; }
int standin_destroys(void) { return destroys; }
void standin_last(int *dtype, int *op, size_t *count, int *root) {
    *dtype = last_dtype; *op = last_op; *count = last_count; *root = last_root;
}
static size_t size_of(int dt) { return dt == 6 || dt == 9 ? 2 : dt == 8 ? 8 : 4; }
int ncclGetVersion(int *v) { *v = 22809; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { ids++; memset(id->internal, ids, 128); return 0; }
const char *ncclGetErrorString(int r) {
    switch (r) {
    case 2: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case 5: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case 6: return "remote process exited or there was a network error";
    default: return "stand-in";
    }
}
int ncclCommInitRank(void **c, int n, ncclUniqueId id, int r) {
    (void)id; (void)r;
    if (init_result) return init_result;
    nranks = n; *c = malloc(1); t("init"); return 0;
}
int ncclCommInitRankConfig(void) { return 0; }
int ncclCommAbort(void *c) { aborts++; free(c); t("abort"); return 0; }
int ncclCommDestroy(void *c) { destroys++; free(c); return 0; }
int ncclCommFinalize(void *c) { (void)c; return 0; }
int ncclCommGetAsyncError(void *c, int *e) { (void)c; *e = async_error; return 0; }
static int note(const char *name, void *stream, size_t n, int dt, int op, int root) {
    last_stream = stream; last_count = n; last_dtype = dt; last_op = op; last_root = root;
    t(stream ? name : "nccl-on-stream-0");
    return call_result;
}
int ncclAllReduce(const void *s, void *r, size_t n, int dt, int op, void *c, void *st) {
    (void)c;
    if (s != r) memcpy(r, s, n * size_of(dt));
    return note("allreduce:comm", st, n, dt, op, -1);
}
int ncclBroadcast(const void *s, void *r, size_t n, int dt, int root, void *c, void *st) {
    (void)c;
    if (s != r) memcpy(r, s, n * size_of(dt));
    return note("broadcast:comm", st, n, dt, -1, root);
}
static const void *last_send = 0;
static void *last_recv = 0;
void standin_last_buffers(const void **s, void **r) { *s = last_send; *r = last_recv; }
/* In place (NCCL's in-place form: s == r + rank * n) every rank's part is already where it goes. */
int ncclAllGather(const void *s, void *r, size_t n, int dt, void *c, void *st) {
    (void)c;
    last_send = s; last_recv = r;
    for (int i = 0; i < nranks; i++)
        if ((char *)r + i * n * size_of(dt) != (const char *)s) memcpy((char *)r + i * n * size_of(dt), s, n * size_of(dt));
    return note("allgather:comm", st, n, dt, -1, -1);
}
/* One rank's data stands for every rank's: the result block is the input's block at the receive address. */
int ncclReduceScatter(const void *s, void *r, size_t n, int dt, int op, void *c, void *st) {
    (void)c;
    last_send = s; last_recv = r;
    return note("reduce_scatter:comm", st, n, dt, op, -1);
}
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 0; }
"#;

/// Both stand-ins in a folder of their own, loaded, with the test's handles on their hooks.
struct StandIns {
    _dir: tempfile::TempDir,
    cuda: libloading::Library,
    nccl: libloading::Library,
    search: Search,
}

impl StandIns {
    fn new() -> StandIns {
        let dir = tempfile::tempdir().unwrap();
        let cuda = build(dir.path(), "libcuda.so.1", DRIVER);
        let nccl = build(dir.path(), "libnccl.so.2", NCCL);
        // SAFETY: the stand-ins have no initialisers; these handles share the copies hytrain-cuda opens by path.
        let (cuda, nccl) =
            unsafe { (libloading::Library::new(&cuda).unwrap(), libloading::Library::new(&nccl).unwrap()) };
        let s = StandIns { search: Search::new().folder(dir.path(), Origin::Explicit), _dir: dir, cuda, nccl };
        let trace: extern "C" fn(*const c_char) = *s.hook(&s.cuda, b"standin_trace\0");
        s.call::<extern "C" fn(extern "C" fn(*const c_char))>(&s.nccl, b"standin_set_trace\0")(trace);
        s
    }

    fn hook<'a, F>(&self, lib: &'a libloading::Library, name: &[u8]) -> libloading::Symbol<'a, F> {
        // SAFETY: each hook is declared in the stand-in sources above with the type the caller names.
        unsafe { lib.get(name).unwrap() }
    }

    fn call<F: Copy>(&self, lib: &libloading::Library, name: &[u8]) -> F {
        *self.hook::<F>(lib, name)
    }

    fn set(&self, lib: &libloading::Library, name: &[u8], value: c_int) {
        self.call::<extern "C" fn(c_int)>(lib, name)(value)
    }

    fn count(&self, lib: &libloading::Library, name: &[u8]) -> c_int {
        self.call::<extern "C" fn() -> c_int>(lib, name)()
    }

    fn trace(&self) -> String {
        let text = self.call::<extern "C" fn() -> *const c_char>(&self.cuda, b"standin_trace_text\0")();
        // SAFETY: a NUL-terminated static buffer of the stand-in.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }

    fn last(&self) -> (c_int, c_int, usize, c_int) {
        let (mut dtype, mut op, mut count, mut root) = (0, 0, 0usize, 0);
        self.call::<extern "C" fn(*mut c_int, *mut c_int, *mut usize, *mut c_int)>(&self.nccl, b"standin_last\0")(
            &mut dtype, &mut op, &mut count, &mut root,
        );
        (dtype, op, count, root)
    }

    /// The streams cuEventRecord (`recorded`) or cuStreamWaitEvent (`waited`) got, in call order.
    fn streams(&self, which: &[u8], count: c_int) -> Vec<usize> {
        let at = self.call::<extern "C" fn(c_int) -> usize>(&self.cuda, which);
        (0..count).map(|i| at(i)).collect()
    }

    fn load(&self) -> (CudaDriver, Nccl) {
        (CudaDriver::load_from(&self.search).unwrap(), Nccl::load_from(&self.search).unwrap())
    }

    /// A side stream on GPU `gpu` through these stand-ins and the stand-in libc10_cuda.
    fn side_stream(&self, gpu: u32) -> Result<SideStream, CudaError> {
        stand_in_c10_cuda::load();
        let (driver, _) = self.load();
        SideStream::new(driver, gpu, TorchStreams::load().unwrap())
    }

    fn collective(&self, rank: usize, world: usize, timeout: Duration) -> NcclCollective {
        let (driver, nccl) = self.load();
        let id = nccl.unique_id().unwrap();
        NcclCollective::new(driver, nccl, 1, &id, rank, world, timeout).unwrap()
    }
}

fn slice<T>(values: &mut [T], dtype: DType) -> DeviceSlice<'_> {
    // SAFETY: the stand-ins treat device addresses as host memory; `values` is borrowed for the slice's life.
    unsafe { DeviceSlice::from_raw(values.as_mut_ptr() as u64, dtype, values.len()) }
}

#[test]
fn collectives_run_on_the_communication_stream_between_events_in_every_dtype() {
    let s = StandIns::new();
    let mut c = s.collective(0, 1, Duration::from_secs(30));
    assert_eq!(s.trace(), "init");
    let mut f32s = vec![1.5f32; 1000];
    c.allreduce(slice(&mut f32s, DType::F32), DeviceReduceOp::Avg).unwrap();
    assert_eq!(
        s.trace(),
        "init record:compute wait:comm allreduce:comm record:comm wait:compute",
        "the comm stream must wait for the compute stream before NCCL, and the compute stream for NCCL after"
    );
    // ncclFloat32 = 7, ncclAvg = 4 (nccl.h).
    assert_eq!(s.last(), (7, 4, 1000, -1));
    let mut bf16s = vec![0u16; 17];
    c.allreduce(slice(&mut bf16s, DType::Bf16), DeviceReduceOp::Sum).unwrap();
    assert_eq!(s.last(), (9, 0, 17, -1));
    let mut f16s = vec![0u16; 3];
    c.allreduce(slice(&mut f16s, DType::F16), DeviceReduceOp::Sum).unwrap();
    assert_eq!(s.last(), (6, 0, 3, -1));
    c.broadcast(slice(&mut f16s, DType::F16), 0).unwrap();
    assert_eq!(s.last(), (6, -1, 3, 0));
    assert!(!s.trace().contains("nccl-on-stream-0"), "{}", s.trace());
    assert_eq!(c.backend(), "nccl");
}

#[test]
fn following_libtorchs_current_stream_orders_each_collective_against_the_stream_current_at_its_call() {
    stand_in_c10_cuda::load();
    let s = StandIns::new();
    // On GPU 1, as `collective` makes it.
    let mut c = s.collective(0, 1, Duration::from_secs(30));
    let torch = TorchStreams::load().unwrap();
    // SAFETY: the stand-ins take any number as a stream.
    unsafe { torch.set_current(1, 0x2000 as *mut std::ffi::c_void) }.unwrap();
    c.follow_current_stream(TorchStreams::load().unwrap());
    let mut values = vec![1.0f32; 8];
    c.allreduce(slice(&mut values, DType::F32), DeviceReduceOp::Sum).unwrap();
    // SAFETY: as above.
    unsafe { torch.set_current(1, 0x3000 as *mut std::ffi::c_void) }.unwrap();
    c.allreduce(slice(&mut values, DType::F32), DeviceReduceOp::Sum).unwrap();
    let comm = 0x1001; // the stand-in's non-blocking stream
    assert_eq!(
        s.streams(b"standin_recorded\0", 4),
        [0x2000, comm, 0x3000, comm],
        "the ready event goes on libtorch's current stream of the moment, the done event on the comm stream"
    );
    assert_eq!(
        s.streams(b"standin_waited\0", 4),
        [comm, 0x2000, comm, 0x3000],
        "the current stream waits for the collective"
    );
}

/// What overlapping gradient allreduces with backward does on a GPU: the training thread's compute stream is
/// libtorch's current one; a communication thread enters the side stream, orders it after the compute stream,
/// reduces there (NCCL follows the current stream), and after the round the compute stream waits for the side one.
#[test]
fn work_on_the_side_stream_waits_for_the_compute_stream_and_the_compute_stream_for_it() {
    stand_in_c10_cuda::load();
    let s = StandIns::new();
    // On GPU 1, as `collective` makes it; its communication stream is the first stream made.
    let mut c = s.collective(0, 1, Duration::from_secs(30));
    c.follow_current_stream(TorchStreams::load().unwrap());
    let side = s.side_stream(1).unwrap();
    let (comm, side_stream, compute) = (0x1001, 0x2001, 0x5000);
    let torch = TorchStreams::load().unwrap();
    // SAFETY: the stand-ins take any number as a stream.
    unsafe { torch.set_current(1, compute as *mut std::ffi::c_void) }.unwrap();
    let training = side.current_stream().unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // A new thread starts on the default stream, as in libtorch.
                assert_eq!(torch.current(1).unwrap() as usize, 0);
                let entered = side.enter().unwrap();
                assert_eq!(torch.current(1).unwrap() as usize, side_stream);
                side.wait_for(training).unwrap();
                let mut values = vec![1.0f32; 8];
                c.allreduce(slice(&mut values, DType::F32), DeviceReduceOp::Avg).unwrap();
                drop(entered);
                assert_eq!(torch.current(1).unwrap() as usize, 0, "leaving restores the stream");
            })
            .join()
            .unwrap();
    });
    side.join_into(training).unwrap();
    assert_eq!(torch.current(1).unwrap() as usize, compute);
    // 0x..01: both streams are non-blocking (flag 1), so neither waits for stream 0 behind the scenes.
    assert_eq!(
        s.streams(b"standin_recorded\0", 4),
        [compute, side_stream, comm, side_stream],
        "events: after the gradients (compute), before NCCL (side), after NCCL (comm), after the bucket (side)"
    );
    assert_eq!(
        s.streams(b"standin_waited\0", 4),
        [side_stream, comm, side_stream, compute],
        "the side stream waits for compute, NCCL for the side stream, the side stream for NCCL, compute for all"
    );
}

#[test]
fn dropping_the_side_stream_frees_its_stream_events_and_context() {
    let s = StandIns::new();
    let side = s.side_stream(0).unwrap();
    // One retained context, one stream, two events.
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 112);
    drop(side);
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 0);
}

#[test]
fn a_side_stream_the_driver_refuses_is_an_error_naming_the_call_and_leaves_nothing_behind() {
    let s = StandIns::new();
    // CUDA_ERROR_OUT_OF_MEMORY.
    s.set(&s.cuda, b"standin_stream_create_result\0", 2);
    let error = s.side_stream(0).unwrap_err().to_string();
    assert_eq!(error, "cuStreamCreate failed: CUDA_ERROR_STAND_IN (stand-in)");
    // The retained context is released again.
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 0);
}

#[test]
fn entering_a_side_stream_on_a_gpu_libtorch_lacks_fails_with_libtorchs_reason() {
    let s = StandIns::new();
    // The stand-in libc10_cuda has GPUs 0 to 7.
    let side = s.side_stream(9).unwrap();
    let error = side.enter().unwrap_err().to_string();
    assert_eq!(error, "getCurrentCUDAStream for cuda:9 failed: stand-in: no GPU 9");
}

#[test]
fn allgather_concatenates_every_ranks_part_and_checks_the_output_size() {
    let s = StandIns::new();
    let mut c = s.collective(1, 3, Duration::from_secs(30));
    let mut input = vec![1.0f32, 2.0];
    let mut output = vec![0.0f32; 6];
    c.allgather(slice(&mut input, DType::F32), slice(&mut output, DType::F32)).unwrap();
    assert_eq!(output, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    let mut short = vec![0.0f32; 5];
    let error = c.allgather(slice(&mut input, DType::F32), slice(&mut short, DType::F32)).unwrap_err().to_string();
    assert_eq!(error, "NCCL allgather of 2 f32 elements: the output holds 5 elements, not 6 (2 for each of 3 ranks)");
    let error = c.broadcast(slice(&mut input, DType::F32), 3).unwrap_err().to_string();
    assert_eq!(error, "NCCL broadcast from rank 3, but the job has 3 ranks");
}

impl StandIns {
    /// The send and receive addresses of the last ncclAllGather or ncclReduceScatter.
    fn last_buffers(&self) -> (usize, usize) {
        let (mut send, mut recv) = (0usize, 0usize);
        self.call::<extern "C" fn(*mut usize, *mut usize)>(&self.nccl, b"standin_last_buffers\0")(&mut send, &mut recv);
        (send, recv)
    }
}

#[test]
fn reduce_scatter_and_allgather_blocks_use_nccls_in_place_forms_on_the_own_block() {
    let s = StandIns::new();
    let mut c = s.collective(2, 4, Duration::from_secs(30));
    let mut values = vec![0.0f32; 12];
    let base = values.as_ptr() as usize;
    c.reduce_scatter(slice(&mut values, DType::F32), DeviceReduceOp::Avg).unwrap();
    // ncclFloat32 = 7, ncclAvg = 4; 3 elements per rank, the result at rank 2's block.
    assert_eq!(s.last(), (7, 4, 3, -1));
    assert_eq!(s.last_buffers(), (base, base + 2 * 3 * 4));
    let mut halves = vec![0u16; 8];
    let base = halves.as_ptr() as usize;
    c.reduce_scatter(slice(&mut halves, DType::F16), DeviceReduceOp::Sum).unwrap();
    assert_eq!(s.last(), (6, 0, 2, -1));
    assert_eq!(s.last_buffers(), (base, base + 2 * 2 * 2));
    let mut blocks: Vec<f64> = (0..8).map(|i| if i / 2 == 2 { i as f64 } else { -1.0 }).collect();
    let base = blocks.as_ptr() as usize;
    c.allgather_blocks(slice(&mut blocks, DType::F64)).unwrap();
    // The input is rank 2's block inside the output, as NCCL's in-place allgather asks.
    assert_eq!(s.last(), (8, -1, 2, -1));
    assert_eq!(s.last_buffers(), (base + 2 * 2 * 8, base));
    assert_eq!(blocks, [4.0, 5.0, 4.0, 5.0, 4.0, 5.0, 4.0, 5.0]);
    assert!(
        s.trace().contains("record:compute wait:comm reduce_scatter:comm record:comm wait:compute"),
        "{}",
        s.trace()
    );
    assert!(!s.trace().contains("nccl-on-stream-0"), "{}", s.trace());
}

#[test]
fn reduce_scatter_and_allgather_blocks_refuse_a_buffer_that_is_not_whole_blocks_before_calling_nccl() {
    let s = StandIns::new();
    let mut c = s.collective(0, 3, Duration::from_secs(30));
    let before = s.trace();
    let mut values = vec![0.0f32; 10];
    let error = c.reduce_scatter(slice(&mut values, DType::F32), DeviceReduceOp::Sum).unwrap_err().to_string();
    assert_eq!(
        error,
        "NCCL reduce_scatter of 10 f32 elements: they do not split into 3 equal blocks (one per rank); the caller \
         pads the buffer to a multiple of world_size (12 elements)"
    );
    let error = c.allgather_blocks(slice(&mut values, DType::F32)).unwrap_err().to_string();
    assert!(error.starts_with("NCCL allgather_blocks of 10 f32 elements: they do not split into 3"), "{error}");
    assert_eq!(s.trace(), before, "nothing may reach NCCL");
    // The communicator was not aborted: a padded buffer goes through.
    let mut padded = vec![0.0f32; 12];
    c.reduce_scatter(slice(&mut padded, DType::F32), DeviceReduceOp::Sum).unwrap();
    assert_eq!(s.count(&s.nccl, b"standin_aborts\0"), 0);
}

#[test]
fn a_reduce_scatter_that_never_completes_aborts_the_communicator_and_later_calls_fail() {
    let s = StandIns::new();
    let mut c = s.collective(0, 2, Duration::from_millis(300));
    s.set(&s.cuda, b"standin_hang\0", 1);
    let mut values = vec![0.0f32; 4];
    let error = c.reduce_scatter(slice(&mut values, DType::F32), DeviceReduceOp::Sum).unwrap_err();
    assert!(
        matches!(&error, CudaError::CollectiveTimeout { rank: 0, op, .. } if op == "reduce_scatter (sum) of 4 f32 elements"),
        "{error}"
    );
    assert_eq!(s.count(&s.nccl, b"standin_aborts\0"), 1);
    s.set(&s.cuda, b"standin_hang\0", 0);
    let later = c.allgather_blocks(slice(&mut values, DType::F32)).unwrap_err();
    assert!(matches!(later, CudaError::CommunicatorAborted { .. }), "{later}");
}

#[test]
fn an_allreduce_that_never_completes_aborts_the_communicator_within_the_timeout() {
    let s = StandIns::new();
    let mut c = s.collective(2, 4, Duration::from_millis(300));
    s.set(&s.cuda, b"standin_hang\0", 1);
    let mut grads = vec![0.0f32; 1024];
    let started = Instant::now();
    let error = c.allreduce(slice(&mut grads, DType::F32), DeviceReduceOp::Avg).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "the watchdog must end the wait");
    assert!(matches!(error, CudaError::CollectiveTimeout { rank: 2, .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "NCCL allreduce (avg) of 1024 f32 elements on rank 2 did not finish within 0.3 s (--collective-timeout); \
         the communicator was aborted. A rank may have died, hung or called a different collective: check the \
         other ranks' logs (NCCL_DEBUG=INFO shows NCCL's view)"
    );
    assert_eq!(s.count(&s.nccl, b"standin_aborts\0"), 1);
    assert!(s.trace().ends_with("record:comm wait:compute abort"), "{}", s.trace());
    // Nothing more is sent into an aborted communicator.
    s.set(&s.cuda, b"standin_hang\0", 0);
    let error = c.broadcast(slice(&mut grads, DType::F32), 0).unwrap_err().to_string();
    assert_eq!(
        error,
        "NCCL broadcast of 1024 f32 elements on rank 2 refused: the communicator was aborted earlier (allreduce \
         (avg) of 1024 f32 elements did not finish within 0.3 s)"
    );
    assert!(s.trace().ends_with("abort"), "{}", s.trace());
    drop(c);
    // Aborting freed the communicator: it is not destroyed a second time.
    assert_eq!(s.count(&s.nccl, b"standin_destroys\0"), 0);
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 0);
}

#[test]
fn an_asynchronous_nccl_error_during_a_collective_aborts_and_names_the_op() {
    let s = StandIns::new();
    let mut c = s.collective(0, 2, Duration::from_secs(60));
    // The op stays pending while NCCL reports the peer gone, as a real hang on a dead peer would.
    s.set(&s.cuda, b"standin_hang\0", 1);
    s.set(&s.nccl, b"standin_async_error\0", 6);
    let mut grads = vec![0u16; 8];
    let started = Instant::now();
    let error = c.allreduce(slice(&mut grads, DType::Bf16), DeviceReduceOp::Avg).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(30), "the error must end the wait before the timeout");
    assert_eq!(
        error,
        "NCCL allreduce (avg) of 8 bf16 elements on rank 0 failed: remote process exited or there was a network \
         error (ncclResult 6, from ncclCommGetAsyncError); the communicator was aborted (NCCL_DEBUG=INFO shows why)"
    );
    assert_eq!(s.count(&s.nccl, b"standin_aborts\0"), 1);
}

#[test]
fn a_collective_nccl_refuses_aborts_and_reports_nccls_text() {
    let s = StandIns::new();
    let mut c = s.collective(1, 2, Duration::from_secs(60));
    s.set(&s.nccl, b"standin_call_result\0", 5);
    let mut values = vec![0.0f64; 4];
    let error = c.allreduce(slice(&mut values, DType::F64), DeviceReduceOp::Sum).unwrap_err().to_string();
    assert_eq!(
        error,
        "NCCL allreduce (sum) of 4 f64 elements on rank 1 failed: invalid usage (run with NCCL_DEBUG=WARN for \
         details) (ncclResult 5, from ncclAllReduce); the communicator was aborted (NCCL_DEBUG=INFO shows why)"
    );
    assert_eq!(s.count(&s.nccl, b"standin_aborts\0"), 1);
}

#[test]
fn a_failed_init_reports_nccls_text_and_releases_the_stream_events_and_context() {
    let s = StandIns::new();
    let (driver, nccl) = s.load();
    let id = nccl.unique_id().unwrap();
    s.set(&s.nccl, b"standin_init_result\0", 2);
    let error = NcclCollective::new(driver, nccl, 0, &id, 0, 2, Duration::from_secs(5)).unwrap_err().to_string();
    assert_eq!(
        error,
        "ncclCommInitRank failed: unhandled system error (run with NCCL_DEBUG=INFO for details) (ncclResult 2)"
    );
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 0);
    assert_eq!(s.count(&s.nccl, b"standin_destroys\0"), 0);
}

#[test]
fn dropping_the_collective_destroys_the_communicator_and_frees_what_it_made() {
    let s = StandIns::new();
    let c = s.collective(0, 1, Duration::from_secs(5));
    // One retained context, one stream, two events.
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 112);
    drop(c);
    assert_eq!(s.count(&s.cuda, b"standin_live\0"), 0);
    assert_eq!(s.count(&s.nccl, b"standin_destroys\0"), 1);
    assert_eq!(s.count(&s.nccl, b"standin_aborts\0"), 0);
}

#[test]
fn a_rank_not_below_the_world_size_is_refused() {
    let s = StandIns::new();
    let (driver, nccl) = s.load();
    let id = UniqueId::from_bytes(&[1; 128], "k").unwrap();
    let error = NcclCollective::new(driver, nccl, 0, &id, 2, 2, Duration::from_secs(5)).unwrap_err().to_string();
    assert_eq!(error, "NCCL rank 2 is not below world size 2");
}

fn member(rank: usize, world: usize, port: u16) -> hytrain_comm::Membership {
    hytrain_comm::Membership {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

fn options(rendezvous: Duration) -> hytrain_comm::CommOptions {
    hytrain_comm::CommOptions {
        rendezvous_timeout: rendezvous,
        job_id: "nccl-test".into(),
        ..hytrain_comm::CommOptions::default()
    }
}

#[test]
fn every_rank_gets_rank_0s_unique_id_through_the_rendezvous_store() {
    let s = StandIns::new();
    let nccl = Nccl::load_from(&s.search).unwrap();
    // Rank 0's id differs from any made before, so a rank that made its own would be caught.
    let earlier = nccl.unique_id().unwrap();
    let port = free_port();
    let ids: Vec<UniqueId> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let nccl = &nccl;
                scope.spawn(move || {
                    let store =
                        hytrain_comm::Store::rendezvous(&member(rank, 3, port), &options(Duration::from_secs(30)))
                            .unwrap();
                    let id = exchange_unique_id(nccl, &store, rank, 0, "nccl/0/id").unwrap();
                    // Rank 0 hosts the store: it stays until every rank has read the id.
                    store.barrier("id read").unwrap();
                    id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(ids[0], earlier);
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
}

#[test]
fn a_rank_whose_id_never_comes_fails_naming_its_rank_and_the_key() {
    let s = StandIns::new();
    let nccl = Nccl::load_from(&s.search).unwrap();
    let port = free_port();
    let errors: Vec<Option<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let nccl = &nccl;
                scope.spawn(move || {
                    let store =
                        hytrain_comm::Store::rendezvous(&member(rank, 2, port), &options(Duration::from_secs(2)))
                            .unwrap();
                    let result = if rank == 0 {
                        // Rank 0 never publishes; it keeps the store up until rank 1 gave up.
                        store.barrier_timeout("gave up", Duration::from_secs(60)).map(|_| None)
                    } else {
                        let e = exchange_unique_id(nccl, &store, rank, 0, "nccl/0/id").unwrap_err();
                        store.barrier_timeout("gave up", Duration::from_secs(60)).unwrap();
                        Ok(Some(e.to_string()))
                    };
                    result.unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let error = errors[1].as_deref().unwrap();
    assert!(
        error.starts_with("rank 1 could not fetch the NCCL unique id under key 'nccl/0/id' in the rendezvous store: "),
        "{error}"
    );
}
