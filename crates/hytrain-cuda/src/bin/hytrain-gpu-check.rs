//! `hytrain-gpu-check`: on a machine with an NVIDIA GPU, runs every kernel of `kernels/` and checks it against its
//! CPU reference (bit for bit: the kernels are compiled without FMA contraction), sums a buffer through NCCL at
//! world size 1, times the kernels, and writes what it found as JSON. `cargo xtask gpu-check` packs it with a
//! script that also runs the PyTorch peer (`gpu-check/torch_peer.py`).
//!
//! ```text
//! hytrain-gpu-check [--json FILE] [--dump DIR] [--bench-elements N] [--cpu-only]
//! ```
//! `--dump DIR` writes the optimizer inputs and the GPU's results as raw little-endian f32 for the PyTorch peer.
//! `--cpu-only --dump DIR` needs no GPU: it writes the same files with the CPU references' results, which is how
//! the tests check the peer script, and the references against torch.optim, on a machine without a GPU.
//! Exit code 0: every check passed; 1: a result differed; 2: the GPU, NCCL or NVRTC could not be used.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use hytrain_cuda::device::{Gpu, KernelArg, LoadedModule};
use hytrain_cuda::reference::{self, AdamWConfig, BucketLayout, SgdConfig};
use hytrain_cuda::{kernels, CudaDriver, CudaError, Nccl, Nvrtc};

type Failure = Box<dyn std::error::Error>;

struct Options {
    json: Option<PathBuf>,
    dump: Option<PathBuf>,
    bench_elements: usize,
    cpu_only: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options { json: None, dump: None, bench_elements: 64 << 20, cpu_only: false };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--json" => options.json = Some(value()?.into()),
            "--dump" => options.dump = Some(value()?.into()),
            "--cpu-only" => options.cpu_only = true,
            "--bench-elements" => {
                let text = value()?;
                options.bench_elements =
                    text.parse().map_err(|_| format!("--bench-elements takes a whole number, got '{text}'"))?;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: hytrain-gpu-check [--json FILE] [--dump DIR] [--bench-elements N] [--cpu-only]".into()
                )
            }
            other => return Err(format!("unknown argument '{other}'; see --help")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("hytrain-gpu-check: {message}");
            return ExitCode::from(2);
        }
    };
    let mut report = Report::default();
    let result = run(&options, &mut report);
    let code = match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(error) => {
            eprintln!("hytrain-gpu-check: {error}");
            report.text("error", &error.to_string());
            2
        }
    };
    report.raw("passed", if code == 0 { "true" } else { "false" });
    if let Some(path) = &options.json {
        if let Err(e) = std::fs::write(path, report.json()) {
            eprintln!("hytrain-gpu-check: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    ExitCode::from(code)
}

/// The findings, written as one flat JSON object.
#[derive(Default)]
struct Report {
    fields: Vec<(String, String)>,
}

impl Report {
    fn raw(&mut self, key: &str, json: &str) {
        self.fields.push((key.into(), json.into()));
    }

    fn text(&mut self, key: &str, value: &str) {
        let escaped: String = value
            .chars()
            .map(|c| match c {
                '"' => "\\\"".to_string(),
                '\\' => "\\\\".to_string(),
                c if c.is_control() => format!("\\u{:04x}", c as u32),
                c => c.to_string(),
            })
            .collect();
        self.raw(key, &format!("\"{escaped}\""));
    }

    fn number(&mut self, key: &str, value: f64) {
        self.raw(key, &format!("{value}"));
    }

    fn json(&self) -> String {
        let mut out = String::from("{\n");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            let comma = if i + 1 < self.fields.len() { "," } else { "" };
            let _ = writeln!(out, "  \"{k}\": {v}{comma}");
        }
        out.push_str("}\n");
        out
    }
}

/// Deterministic values in [-1, 1) (xorshift), so a rerun checks the same numbers.
struct Numbers(u64);

impl Numbers {
    fn take(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

fn grid(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 8192) as u32
}

const BLOCK: u32 = 256;

/// Elements that differ bit for bit, and the largest difference.
fn compare(name: &str, gpu: &[f32], cpu: &[f32], report: &mut Report) -> bool {
    let mut differ = 0usize;
    let mut max = 0f32;
    for (a, b) in gpu.iter().zip(cpu) {
        if a.to_bits() != b.to_bits() {
            differ += 1;
            max = max.max((a - b).abs());
        }
    }
    let same_len = gpu.len() == cpu.len();
    let ok = differ == 0 && same_len;
    println!(
        "check: {name}: {} elements, {differ} differ from the CPU reference (largest difference {max:e}){}",
        cpu.len(),
        if same_len { "" } else { " -- LENGTHS DIFFER" }
    );
    report.number(&format!("{name}_elements"), cpu.len() as f64);
    report.number(&format!("{name}_differing"), differ as f64);
    report.number(&format!("{name}_max_difference"), max as f64);
    ok
}

fn run(options: &Options, report: &mut Report) -> Result<bool, Failure> {
    if options.cpu_only {
        dump_cpu_references(options)?;
        return Ok(true);
    }
    let driver = CudaDriver::load()?;
    let device = driver.device(0)?;
    println!(
        "gpu: {} (compute capability {}), driver {} for CUDA {}.{}, {} visible",
        device.name,
        device.capability,
        driver.path().display(),
        driver.version() / 1000,
        driver.version() % 1000 / 10,
        driver.device_count()
    );
    report.text("gpu", &device.name);
    report.text("compute_capability", &device.capability.to_string());
    report.number("cuda_driver_version", driver.version() as f64);

    let nccl = Nccl::load()?;
    println!("nccl: {} from {} ({})", nccl.version(), nccl.path().display(), nccl.origin());
    report.text("nccl_version", &nccl.version().to_string());
    report.text("nccl_path", &nccl.path().display().to_string());

    let nvrtc = Nvrtc::load()?;
    let arch =
        nvrtc.supported_archs()?.into_iter().filter(|a| *a <= device.capability).max().ok_or_else(|| {
            format!("NVRTC {:?} supports no architecture up to {}", nvrtc.version(), device.capability)
        })?;
    println!(
        "nvrtc: {}.{} from {}; compiling for {}",
        nvrtc.version().0,
        nvrtc.version().1,
        nvrtc.path().display(),
        arch.virtual_arch()
    );
    report.text("nvrtc_path", &nvrtc.path().display().to_string());
    report.text("kernel_arch", &arch.virtual_arch());
    let compiled = kernels::compile_all(&nvrtc, arch)?;

    let gpu = driver.gpu(0)?;
    let bucket = gpu.load(&compiled[0])?;
    let optim = gpu.load(&compiled[1])?;
    let mut numbers = Numbers(0x9e37_79b9_7f4a_7c15);
    dump_meta(options)?;
    let mut ok = true;
    ok &= check_pack_unpack(&gpu, &bucket, &mut numbers, report)?;
    ok &= check_sgd(&gpu, &optim, &mut numbers, options, report)?;
    ok &= check_adamw(&gpu, &optim, &mut numbers, options, report)?;
    ok &= check_nccl(&gpu, &nccl, &mut numbers, report)?;
    bench(&gpu, &bucket, &optim, options.bench_elements, report)?;
    println!("check: {}", if ok { "all passed" } else { "FAILED" });
    Ok(ok)
}

fn check_pack_unpack(
    gpu: &Gpu<'_>,
    module: &LoadedModule<'_, '_>,
    numbers: &mut Numbers,
    report: &mut Report,
) -> Result<bool, Failure> {
    let lengths = [0usize, 1, 7, 1000, 65_537, 3, 262_144, 5];
    let layout = BucketLayout::new(lengths);
    let grads: Vec<Vec<f32>> = lengths.iter().map(|&n| numbers.take(n)).collect();
    let device_grads = grads.iter().map(|g| gpu.upload(g)).collect::<Result<Vec<_>, _>>()?;
    let addresses: Vec<u64> = device_grads.iter().map(|b| b.address()).collect();
    let device_addresses = gpu.upload(&addresses)?;
    let offsets: Vec<i64> = layout.offsets().iter().map(|&o| o as i64).collect();
    let device_offsets = gpu.upload(&offsets)?;
    let scale = 0.125f32.recip() / 3.0;

    let device_bucket = gpu.upload(&vec![f32::NAN; layout.len()])?;
    module.launch(
        "hytrain_pack_scaled",
        grid(layout.len()),
        BLOCK,
        &[
            KernelArg::Pointer(device_addresses.address()),
            KernelArg::Pointer(device_offsets.address()),
            KernelArg::I32(lengths.len() as i32),
            KernelArg::F32(scale),
            KernelArg::Pointer(device_bucket.address()),
        ],
    )?;
    gpu.synchronize()?;
    let mut expected = vec![0f32; layout.len()];
    let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    reference::pack(&layout, &views, scale, &mut expected)?;
    let mut ok = compare("pack", &device_bucket.download()?, &expected, report);

    let reduced = numbers.take(layout.len());
    let device_reduced = gpu.upload(&reduced)?;
    let outs = lengths.iter().map(|&n| gpu.upload(&vec![f32::NAN; n])).collect::<Result<Vec<_>, _>>()?;
    let out_addresses: Vec<u64> = outs.iter().map(|b| b.address()).collect();
    let device_out_addresses = gpu.upload(&out_addresses)?;
    let unscale = 1.0 / 7.0;
    module.launch(
        "hytrain_unpack_scaled",
        grid(layout.len()),
        BLOCK,
        &[
            KernelArg::Pointer(device_reduced.address()),
            KernelArg::Pointer(device_offsets.address()),
            KernelArg::I32(lengths.len() as i32),
            KernelArg::F32(unscale),
            KernelArg::Pointer(device_out_addresses.address()),
        ],
    )?;
    gpu.synchronize()?;
    let mut got = Vec::new();
    for out in &outs {
        got.extend(out.download()?);
    }
    let mut expected: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0f32; n]).collect();
    let mut views: Vec<&mut [f32]> = expected.iter_mut().map(Vec::as_mut_slice).collect();
    reference::unpack(&layout, &reduced, unscale, &mut views)?;
    let expected: Vec<f32> = expected.into_iter().flatten().collect();
    ok &= compare("unpack", &got, &expected, report);
    Ok(ok)
}

const STEPS: usize = 3;
const OPTIMIZER_ELEMENTS: usize = 1_000_003;
/// Fewer for `--cpu-only`, which the tests run on every build.
const CPU_ONLY_ELEMENTS: usize = 65_537;

fn optimizer_elements(options: &Options) -> usize {
    if options.cpu_only {
        CPU_ONLY_ELEMENTS
    } else {
        OPTIMIZER_ELEMENTS
    }
}

/// Two SGD variants between them cover Nesterov, weight decay and dampening.
const SGD_VARIANTS: [(&str, SgdConfig); 2] = [
    ("sgd_nesterov", SgdConfig { lr: 0.05, momentum: 0.9, dampening: 0.0, weight_decay: 1e-4, nesterov: true }),
    ("sgd_dampened", SgdConfig { lr: 0.1, momentum: 0.8, dampening: 0.1, weight_decay: 0.0, nesterov: false }),
];

const ADAMW: AdamWConfig = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };

/// What the PyTorch peer needs to replay the optimizer checks: sizes and hyperparameters.
fn dump_meta(options: &Options) -> Result<(), Failure> {
    let Some(dir) = &options.dump else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let elements = optimizer_elements(options);
    let mut meta = format!("{{\"elements\": {elements}, \"steps\": {STEPS}");
    for (name, c) in SGD_VARIANTS {
        let _ = write!(
            meta,
            ", \"{name}\": {{\"lr\": {}, \"momentum\": {}, \"dampening\": {}, \"weight_decay\": {}, \"nesterov\": {}}}",
            c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov
        );
    }
    let a = ADAMW;
    let _ = writeln!(
        meta,
        ", \"adamw\": {{\"lr\": {}, \"beta1\": {}, \"beta2\": {}, \"eps\": {}, \"weight_decay\": {}}}}}",
        a.lr, a.beta1, a.beta2, a.eps, a.weight_decay
    );
    std::fs::write(dir.join("meta.json"), meta)?;
    Ok(())
}

fn dump(options: &Options, name: &str, values: &[f32]) -> Result<(), Failure> {
    if let Some(dir) = &options.dump {
        std::fs::create_dir_all(dir)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{name}.f32")), bytes)?;
    }
    Ok(())
}

/// The optimizer steps of the checks below with the CPU references only, dumped as if a GPU had run them.
fn dump_cpu_references(options: &Options) -> Result<(), Failure> {
    if options.dump.is_none() {
        return Err("--cpu-only only writes the optimizer dumps; give --dump DIR".into());
    }
    dump_meta(options)?;
    let n = optimizer_elements(options);
    let mut numbers = Numbers(0x9e37_79b9_7f4a_7c15);
    for (name, cfg) in SGD_VARIANTS {
        let mut params = numbers.take(n);
        dump(options, &format!("{name}_params0"), &params)?;
        let mut momentum = vec![0f32; n];
        let mut all_grads = Vec::new();
        for step in 0..STEPS {
            let grads = numbers.take(n);
            reference::sgd_momentum_step(&cfg.args(step == 0)?, &mut params, &grads, &mut momentum)?;
            all_grads.extend(grads);
        }
        dump(options, &format!("{name}_grads"), &all_grads)?;
        dump(options, &format!("{name}_hytrain_params"), &params)?;
    }
    let mut params = numbers.take(n);
    dump(options, "adamw_params0", &params)?;
    let (mut exp_avg, mut exp_avg_sq) = (vec![0f32; n], vec![0f32; n]);
    let mut all_grads = Vec::new();
    for step in 1..=STEPS as u64 {
        let grads = numbers.take(n);
        reference::adamw_step(&ADAMW.args(step)?, &mut params, &grads, &mut exp_avg, &mut exp_avg_sq)?;
        all_grads.extend(grads);
    }
    dump(options, "adamw_grads", &all_grads)?;
    dump(options, "adamw_hytrain_params", &params)?;
    println!("check: CPU reference results written for the PyTorch peer");
    Ok(())
}

fn check_sgd(
    gpu: &Gpu<'_>,
    module: &LoadedModule<'_, '_>,
    numbers: &mut Numbers,
    options: &Options,
    report: &mut Report,
) -> Result<bool, Failure> {
    let n = optimizer_elements(options);
    let mut ok = true;
    for (name, cfg) in SGD_VARIANTS {
        let start = numbers.take(n);
        dump(options, &format!("{name}_params0"), &start)?;
        let mut params = start.clone();
        let mut momentum = vec![0f32; n];
        let device_params = gpu.upload(&params)?;
        let device_momentum = gpu.upload(&momentum)?;
        let mut all_grads = Vec::new();
        for step in 0..STEPS {
            let grads = numbers.take(n);
            let args = cfg.args(step == 0)?;
            let device_grads = gpu.upload(&grads)?;
            module.launch(
                "hytrain_sgd_momentum",
                grid(n),
                BLOCK,
                &[
                    KernelArg::Pointer(device_params.address()),
                    KernelArg::Pointer(device_grads.address()),
                    KernelArg::Pointer(device_momentum.address()),
                    KernelArg::I64(n as i64),
                    KernelArg::F32(args.lr),
                    KernelArg::F32(args.momentum),
                    KernelArg::F32(args.dampening),
                    KernelArg::F32(args.weight_decay),
                    KernelArg::I32(args.nesterov as i32),
                    KernelArg::I32(args.first_step as i32),
                ],
            )?;
            gpu.synchronize()?;
            reference::sgd_momentum_step(&args, &mut params, &grads, &mut momentum)?;
            all_grads.extend(grads);
        }
        let got = device_params.download()?;
        dump(options, &format!("{name}_grads"), &all_grads)?;
        dump(options, &format!("{name}_hytrain_params"), &got)?;
        ok &= compare(&format!("{name}_params"), &got, &params, report);
        ok &= compare(&format!("{name}_momentum"), &device_momentum.download()?, &momentum, report);
    }
    Ok(ok)
}

fn check_adamw(
    gpu: &Gpu<'_>,
    module: &LoadedModule<'_, '_>,
    numbers: &mut Numbers,
    options: &Options,
    report: &mut Report,
) -> Result<bool, Failure> {
    let n = optimizer_elements(options);
    let cfg = ADAMW;
    let start = numbers.take(n);
    dump(options, "adamw_params0", &start)?;
    let mut params = start.clone();
    let mut exp_avg = vec![0f32; n];
    let mut exp_avg_sq = vec![0f32; n];
    let device_params = gpu.upload(&params)?;
    let device_avg = gpu.upload(&exp_avg)?;
    let device_avg_sq = gpu.upload(&exp_avg_sq)?;
    let mut all_grads = Vec::new();
    for step in 1..=STEPS as u64 {
        let grads = numbers.take(n);
        let args = cfg.args(step)?;
        let device_grads = gpu.upload(&grads)?;
        module.launch(
            "hytrain_adamw",
            grid(n),
            BLOCK,
            &adamw_args(&device_params, &device_grads, &device_avg, &device_avg_sq, n, &args),
        )?;
        gpu.synchronize()?;
        reference::adamw_step(&args, &mut params, &grads, &mut exp_avg, &mut exp_avg_sq)?;
        all_grads.extend(grads);
    }
    let got = device_params.download()?;
    dump(options, "adamw_grads", &all_grads)?;
    dump(options, "adamw_hytrain_params", &got)?;
    let mut ok = compare("adamw_params", &got, &params, report);
    ok &= compare("adamw_exp_avg", &device_avg.download()?, &exp_avg, report);
    ok &= compare("adamw_exp_avg_sq", &device_avg_sq.download()?, &exp_avg_sq, report);
    Ok(ok)
}

fn adamw_args<T: Copy + Default>(
    params: &hytrain_cuda::device::DeviceBuffer<'_, '_, T>,
    grads: &hytrain_cuda::device::DeviceBuffer<'_, '_, T>,
    exp_avg: &hytrain_cuda::device::DeviceBuffer<'_, '_, T>,
    exp_avg_sq: &hytrain_cuda::device::DeviceBuffer<'_, '_, T>,
    n: usize,
    args: &reference::AdamWArgs,
) -> [KernelArg; 12] {
    [
        KernelArg::Pointer(params.address()),
        KernelArg::Pointer(grads.address()),
        KernelArg::Pointer(exp_avg.address()),
        KernelArg::Pointer(exp_avg_sq.address()),
        KernelArg::I64(n as i64),
        KernelArg::F32(args.decay),
        KernelArg::F32(args.one_minus_beta1),
        KernelArg::F32(args.beta2),
        KernelArg::F32(args.one_minus_beta2),
        KernelArg::F32(args.eps),
        KernelArg::F32(args.step_size),
        KernelArg::F32(args.bias_correction2_sqrt),
    ]
}

fn check_nccl(gpu: &Gpu<'_>, nccl: &Nccl, numbers: &mut Numbers, report: &mut Report) -> Result<bool, Failure> {
    let id = nccl.unique_id()?;
    let comm = nccl.communicator(&id, 1, 0)?;
    let values = numbers.take(1 << 20);
    let send = gpu.upload(&values)?;
    let recv = gpu.upload(&vec![f32::NAN; values.len()])?;
    comm.allreduce_sum_f32(send.address(), recv.address(), values.len())?;
    comm.allreduce_sum_f32(send.address(), send.address(), values.len())?;
    gpu.synchronize()?;
    // One rank: the sum is the rank's own values, out of place and in place.
    let mut ok = compare("nccl_allreduce_out_of_place", &recv.download()?, &values, report);
    ok &= compare("nccl_allreduce_in_place", &send.download()?, &values, report);
    Ok(ok)
}

/// Median seconds of `runs` calls of `work`, each followed by a synchronize, after `warmup` untimed calls.
fn time(
    gpu: &Gpu<'_>,
    warmup: usize,
    runs: usize,
    mut work: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, Failure> {
    for _ in 0..warmup {
        work()?;
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        work()?;
        gpu.synchronize()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn bench(
    gpu: &Gpu<'_>,
    bucket: &LoadedModule<'_, '_>,
    optim: &LoadedModule<'_, '_>,
    n: usize,
    report: &mut Report,
) -> Result<(), Failure> {
    if n == 0 {
        return Ok(());
    }
    let zeros = vec![0.01f32; n];
    let p = gpu.upload(&zeros)?;
    let g = gpu.upload(&zeros)?;
    let m = gpu.upload(&zeros)?;
    let v = gpu.upload(&zeros)?;
    let args = AdamWConfig::default().args(10)?;
    let launch_args = adamw_args(&p, &g, &m, &v, n, &args);
    let seconds = time(gpu, 3, 21, || optim.launch("hytrain_adamw", grid(n), BLOCK, &launch_args))?;
    // Reads params, grads and both moments; writes params and both moments.
    let gbps = (7 * 4 * n) as f64 / seconds / 1e9;
    println!("bench: hytrain_adamw over {n} elements: {:.3} ms, {gbps:.0} GB/s", seconds * 1e3);
    report.number("bench_elements", n as f64);
    report.number("bench_adamw_ms", seconds * 1e3);
    report.number("bench_adamw_gbps", gbps);

    // A 25 MB bucket (DDP's default size) of 160 equal tensors.
    let tensors = 160;
    let each = (25 << 20) / 4 / tensors;
    let layout = BucketLayout::new(vec![each; tensors]);
    let sources = (0..tensors).map(|_| gpu.upload(&vec![0.5f32; each])).collect::<Result<Vec<_>, _>>()?;
    let addresses: Vec<u64> = sources.iter().map(|b| b.address()).collect();
    let device_addresses = gpu.upload(&addresses)?;
    let offsets: Vec<i64> = layout.offsets().iter().map(|&o| o as i64).collect();
    let device_offsets = gpu.upload(&offsets)?;
    let out = gpu.upload(&vec![0f32; layout.len()])?;
    let pack_args = [
        KernelArg::Pointer(device_addresses.address()),
        KernelArg::Pointer(device_offsets.address()),
        KernelArg::I32(tensors as i32),
        KernelArg::F32(0.5),
        KernelArg::Pointer(out.address()),
    ];
    let seconds = time(gpu, 3, 21, || bucket.launch("hytrain_pack_scaled", grid(layout.len()), BLOCK, &pack_args))?;
    let gbps = (2 * 4 * layout.len()) as f64 / seconds / 1e9;
    println!(
        "bench: hytrain_pack_scaled of {tensors} tensors into a 25 MB bucket: {:.1} us, {gbps:.0} GB/s",
        seconds * 1e6
    );
    report.number("bench_pack_us", seconds * 1e6);
    report.number("bench_pack_gbps", gbps);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python_reads(path: &std::path::Path) -> String {
        let output = std::process::Command::new("python3")
            .args(["-c", "import json, sys; print(json.dumps(json.load(open(sys.argv[1])), sort_keys=True))"])
            .arg(path)
            .output()
            .expect("python3 reads the JSON the PyTorch peer reads");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn the_peers_meta_json_parses_and_carries_every_hyperparameter() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { json: None, dump: Some(dir.path().to_path_buf()), bench_elements: 0, cpu_only: true };
        dump_meta(&options).unwrap();
        let parsed = python_reads(&dir.path().join("meta.json"));
        assert!(parsed.contains("\"elements\": 65537"), "{parsed}");
        assert!(parsed.contains("\"sgd_nesterov\": {\"dampening\": 0, \"lr\": 0.05, \"momentum\": 0.9, \"nesterov\": true, \"weight_decay\": 0.0001}"), "{parsed}");
        assert!(
            parsed.contains(
                "\"adamw\": {\"beta1\": 0.9, \"beta2\": 0.999, \"eps\": 1e-08, \"lr\": 0.001, \"weight_decay\": 0.01}"
            ),
            "{parsed}"
        );
    }

    #[test]
    fn the_report_is_json_with_escaped_text() {
        let mut report = Report::default();
        report.text("error", "a \"quoted\" path\\x\nnext");
        report.number("gbps", 1234.5);
        report.raw("passed", "false");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, report.json()).unwrap();
        assert_eq!(
            python_reads(&path).trim(),
            r#"{"error": "a \"quoted\" path\\x\nnext", "gbps": 1234.5, "passed": false}"#
        );
    }

    #[test]
    fn numbers_repeat_and_stay_in_range() {
        let a = Numbers(7).take(1000);
        assert_eq!(a, Numbers(7).take(1000));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
