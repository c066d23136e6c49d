//! `tern bench gemm`: the packed ternary matmul alone ([`PackedMatrix::matmul_with`]) at one
//! shape, with every kernel this CPU offers: median time and multiply-adds per second. Prefill
//! and batched decode are bounded by this kernel; `tern bench decode` measures it inside the
//! model.

use crate::error::Result;
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
pub fn measure(rows: usize, cols: usize, tokens: usize, reps: usize) -> Result<Vec<GemmSpeed>> {
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
    let m = PackedMatrix::new(&bytes, rows, cols, Packing::PQ2_0)?;
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut out = Vec::new();
    for isa in Isa::available() {
        std::hint::black_box(m.matmul_with(isa, &x, tokens));
        let mut t: Vec<f64> = (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                std::hint::black_box(m.matmul_with(isa, &x, tokens));
                t0.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        let median = t[t.len() / 2];
        out.push(GemmSpeed {
            isa: isa.name(),
            median_ms: median * 1e3,
            gmac_s: (rows * cols * tokens) as f64 / median / 1e9,
        });
    }
    Ok(out)
}
