//! Fused softmax + top-k (`decode::topk`) against full softmax + sort of all ids.

use super::kernels::measure;
use crate::decode::topk::{softmax_topk_batch, softmax_topk_reference};
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Median seconds of both at one k.
#[derive(Debug, Clone)]
pub struct TopkRow {
    pub k: usize,
    pub fused_s: f64,
    pub reference_s: f64,
}

/// Both at k = 1, 10, 50, 500 over `batch` rows of random logits of width `vocab`.
pub fn run(vocab: usize, batch: usize, reps: usize) -> Result<Vec<TopkRow>> {
    if vocab == 0 || batch == 0 || reps == 0 {
        return Err(Error::Msg(
            "--vocab, --batch and --reps must be positive".into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let logits: Vec<f32> = (0..vocab * batch)
        .map(|_| rng.gen_range(-10.0f32..10.0))
        .collect();
    let mut rows = Vec::new();
    for k in [1usize, 10, 50, 500] {
        let (fused_s, _) = measure(reps, || {
            std::hint::black_box(softmax_topk_batch(&logits, vocab, k));
            Ok(())
        })?;
        let (reference_s, _) = measure(reps, || {
            let r: Vec<_> = logits
                .par_chunks(vocab)
                .map(|row| softmax_topk_reference(row, k))
                .collect();
            std::hint::black_box(r);
            Ok(())
        })?;
        rows.push(TopkRow {
            k,
            fused_s,
            reference_s,
        });
    }
    Ok(rows)
}

/// The rows as a markdown table.
pub fn markdown(rows: &[TopkRow]) -> String {
    let mut s = String::from(
        "| k | fused ms | full softmax + sort ms | speed-up |\n|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.1}x |\n",
            r.k,
            r.fused_s * 1e3,
            r.reference_s * 1e3,
            r.reference_s / r.fused_s
        );
    }
    s
}
