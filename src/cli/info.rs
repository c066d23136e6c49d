//! `tern info [--json]`: what this binary was built with and what it can run on: the compiled
//! backends, the devices that open, the CPU's packed-kernel ISA and the thread count.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The backends compiled into this binary (cargo features).
fn backends() -> Vec<&'static str> {
    let mut b = vec!["cpu"];
    if cfg!(feature = "cuda") {
        b.push("cuda");
    }
    if cfg!(feature = "metal") {
        b.push("metal");
    }
    if cfg!(feature = "mkl") {
        b.push("mkl");
    }
    if cfg!(feature = "accelerate") {
        b.push("accelerate");
    }
    b
}

/// Every device that opens: the CPU, then CUDA / Metal ordinals from 0 until one fails (that
/// first failure is reported, so a missing driver is visible).
fn devices() -> (Vec<String>, Vec<String>) {
    let mut ok = vec!["cpu".to_string()];
    let mut failed = Vec::new();
    let compiled = [
        ("cuda", candle_core::utils::cuda_is_available()),
        ("metal", candle_core::utils::metal_is_available()),
    ];
    for (kind, _) in compiled.into_iter().filter(|k| k.1) {
        for n in 0..16 {
            let spec = format!("{kind}:{n}");
            match tern::device::parse_device(&spec) {
                Ok(d) if kind == "metal" => {
                    ok.push(format!("{spec} {}", tern::device::describe(&d)))
                }
                Ok(_) => ok.push(spec),
                Err(e) => {
                    if n == 0 {
                        let first = e.to_string().lines().next().unwrap_or_default().to_string();
                        failed.push(format!("{spec}: {first}"));
                    }
                    break;
                }
            }
        }
    }
    (ok, failed)
}

pub fn run(a: Args) -> Result<i32> {
    let (ok, failed) = devices();
    let isa = tern::kernels::ternary_matmul::Isa::detect().name();
    let threads = rayon::current_num_threads();
    let cpu = tern::device::cpu_model();
    if a.json {
        let v = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "backends": backends(),
            "devices": ok,
            "device_errors": failed,
            "cpu": cpu,
            "packed_isa": isa,
            "threads": threads,
        });
        println!("{v}");
        return Ok(0);
    }
    println!("tern {}", env!("CARGO_PKG_VERSION"));
    println!("backends compiled: {}", backends().join(", "));
    println!("devices that open: {}", ok.join(", "));
    for f in &failed {
        println!("device not opened: {f}");
    }
    println!("cpu: {cpu} | packed kernels: {isa} | threads: {threads}");
    Ok(0)
}
