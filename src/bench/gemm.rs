//! `tern bench gemm`: the packed ternary matmul alone ([`PackedMatrix::matmul_with`]) at one
//! shape, with every kernel this CPU offers, then the dense GEMMs of training at the same shape
//! (candle's f32, and the bf16 one on each kernel the CPU has: `dense-bf16-amx`,
//! `dense-bf16-avx512bf16`): median time and multiply-adds
//! per second. Prefill and batched decode are bounded by the packed kernel; `tern bench
//! decode` measures it inside the model.

use crate::error::Result;
use crate::kernels::gemm_bf16::Bf16Kernel;
use crate::kernels::ternary_matmul::{Isa, PackedMatrix};
use crate::quant::codec::{pack_row, Packing};
use std::time::Instant;

/// One kernel's figures at the benchmarked shape.
#[derive(Debug, Clone)]
pub struct GemmSpeed {
    pub isa: &'static str,
    pub median_ms: f64,
    /// Ternary multiply-adds (rows x cols x tokens) per second, in billions.
    pub gmac_s: f64,
}

/// Times `reps` runs (after one warm-up) of `[tokens, cols] @ W^T` for a `[rows, cols]` PQ2_0
/// matrix of pseudo-random codes (group 128, as tern exports) on every available kernel.
/// `only`: the kernels to time by name (`amx`, `avx512vnni`, ..., `dense-f32`, `dense-bf16-amx`,
/// `dense-bf16-avx512bf16`);
/// empty times all.
pub fn measure(
    rows: usize,
    cols: usize,
    tokens: usize,
    reps: usize,
    only: &[String],
) -> Result<Vec<GemmSpeed>> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(128) {
        return Err(crate::error::Error::Msg(format!(
            "bench gemm: --rows must be positive and --cols a positive multiple of 128 (PQ2_0 \
             blocks), got --rows {rows} --cols {cols}"
        )));
    }
    let mut known: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
    known.push("dense-f32");
    let bf16_names: Vec<(Bf16Kernel, &'static str)> = Bf16Kernel::available()
        .into_iter()
        .map(|k| (k, dense_bf16_name(k)))
        .collect();
    known.extend(bf16_names.iter().map(|(_, name)| *name));
    if let Some(bad) = only.iter().find(|o| !known.contains(&o.as_str())) {
        return Err(crate::error::Error::Msg(format!(
            "bench gemm: --kernels {bad}: not a kernel this CPU offers (it has: {})",
            known.join(", ")
        )));
    }
    let want = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut bytes = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..rows {
        let codes: Vec<i8> = (0..cols).map(|_| (next() % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..cols.div_ceil(128))
            .map(|_| 0.01 + (next() % 100) as f32 * 1e-4)
            .collect();
        pack_row(&codes, &scales, 128, Packing::PQ2_0, &mut bytes);
    }
    // `tern --act-quant per_token bench gemm` times the per-token kernels.
    let act = crate::quant::ActQuant::override_from_env().unwrap_or_default();
    let m = PackedMatrix::new(&bytes, rows, cols, Packing::PQ2_0)?.with_act_quant(act);
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut out = Vec::new();
    for isa in Isa::available().into_iter().filter(|i| want(i.name())) {
        let run = || -> Result<()> {
            std::hint::black_box(m.matmul_with(isa, &x, tokens));
            Ok(())
        };
        out.push(time(isa.name(), reps, rows * cols * tokens, run)?);
    }
    // The dense GEMMs of training at the same shape: candle's f32 matmul and, where the CPU
    // has AMX-BF16 or AVX512-BF16, the bf16 one on each (`kernels::gemm_bf16`).
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let dev = candle_core::Device::Cpu;
    let (xt, wt) = (
        candle_core::Tensor::from_slice(&x, (tokens, cols), &dev)?,
        candle_core::Tensor::from_slice(&w, (rows, cols), &dev)?.t()?,
    );
    let f32_run = || -> Result<()> {
        std::hint::black_box(xt.matmul(&wt)?);
        Ok(())
    };
    if want("dense-f32") {
        out.push(time("dense-f32", reps, rows * cols * tokens, f32_run)?);
    }
    for &(kernel, name) in &bf16_names {
        if !want(name) {
            continue;
        }
        let bf16_run = || -> Result<()> {
            std::hint::black_box(crate::kernels::gemm_bf16::matmul_nt_with(
                kernel, &x, &w, tokens, rows, cols,
            ));
            Ok(())
        };
        out.push(time(name, reps, rows * cols * tokens, bf16_run)?);
    }
    Ok(out)
}

/// Median of `reps` timed runs of `f` (after one warm-up).
fn time(
    name: &'static str,
    reps: usize,
    macs: usize,
    f: impl Fn() -> Result<()>,
) -> Result<GemmSpeed> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    let median = t[t.len() / 2];
    Ok(GemmSpeed {
        isa: name,
        median_ms: median * 1e3,
        gmac_s: macs as f64 / median / 1e9,
    })
}

/// The bf16 GEMM's name in `--kernels` and in the results.
fn dense_bf16_name(kernel: Bf16Kernel) -> &'static str {
    match kernel {
        Bf16Kernel::Amx => "dense-bf16-amx",
        Bf16Kernel::Avx512Bf16 => "dense-bf16-avx512bf16",
    }
}
