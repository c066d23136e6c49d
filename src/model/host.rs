//! The forward of a packed (GGUF) model on host slices: inference on the CPU without candle
//! between the matmuls.
//!
//! [`Model::forward`] is the one forward, and it stays the reference: this is the same decoder
//! written for the one case where candle's per-op cost shows. Decoding one token of the 0.6B
//! shape runs ~15 small candle ops per layer (norms, reshapes, transposes, RoPE, adds, host
//! copies for the paged cache), ~420 per token, and `perf` put them at a fifth of a 1-thread
//! decode step whose packed matmuls are the only real work (NOTES.md, issue 22). Here each op
//! is the fused kernel's own host function (`rms_norm_rows`, `rope_rows`, `swiglu_rows`,
//! `matmul_many`) on `Vec<f32>` rows, so the result is bit for bit [`Model::forward`]'s over the
//! same cache (the tests compare them), and attention is the cache's ([`HostAttention`]).
//!
//! It runs when [`Model::runs_on_host`] says so: every weight packed, f32, the fused kernels.

use super::transformer::Model;
use crate::error::{Error, Result};
use crate::kernels::norm::rms_norm_rows;
use crate::kernels::rope::rope_rows;
use crate::kernels::swiglu::swiglu_rows;
use crate::kernels::ternary_matmul::{matmul_many, PackedMatrix};
use candle_core::DType;

/// What the host forward attends with: the paged cache's step (`decode::paged::PagedStep`).
pub trait HostAttention {
    /// Absolute positions of the step's tokens, one per id.
    fn positions(&self) -> Vec<u32>;
    /// One layer: stores the new keys and values `k`, `v` (`[n, kv_heads, head_dim]`,
    /// token-major, RoPE applied), then attends the queries `q` (`[n, heads, head_dim]`) of each
    /// token causally over its own sequence. Returns `[n, heads, head_dim]`.
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: usize,
    ) -> Result<Vec<f32>>;
}

/// `x += y`, elementwise.
fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// The packed matrix of a layer that the host forward multiplies.
fn packed(lin: &super::layers::TernaryLinear) -> Result<&PackedMatrix> {
    lin.packed
        .as_ref()
        .ok_or_else(|| Error::Msg("host forward: a layer is not packed".into()))
}

/// `x @ W^T` for each of `mats` (one input quantization, one parallel region).
fn matmul<const N: usize>(
    mats: [&super::layers::TernaryLinear; N],
    x: &[f32],
    n: usize,
) -> Result<[Vec<f32>; N]> {
    let mats = mats.iter().map(|l| packed(l)).collect::<Result<Vec<_>>>()?;
    matmul_many(&mats, x, n)
        .try_into()
        .map_err(|_| Error::Msg("host forward: one output per matrix".into()))
}

impl Model {
    /// Whether [`Model::host_logits`] runs this model: every projection, the embedding and the
    /// LM head packed, f32 activations, the fused kernels (the reference kernels keep candle's
    /// composed ops, the plain path the fused ones are checked against).
    pub fn runs_on_host(&self) -> bool {
        let all_packed = self.layers.iter().all(|l| {
            let (a, m) = (&l.attn, &l.mlp);
            [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
                .iter()
                .all(|lin| lin.packed.is_some())
        });
        self.is_packed()
            && all_packed
            && self.lm_head.as_ref().is_none_or(|h| h.packed.is_some())
            && self.compute == DType::F32
            && self.kernels.fused()
    }

    /// [`Model::forward`] then [`Model::logits`] of the rows `rows` (indices into `ids`), for a
    /// model that [`Model::runs_on_host`]: `ids` are the step's new tokens, attending through
    /// `att`. Returns one `[vocab]` row of f32 logits per entry of `rows`.
    pub fn host_logits(
        &self,
        ids: &[u32],
        att: &mut dyn HostAttention,
        rows: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        if !self.runs_on_host() {
            return Err(Error::Msg(
                "host forward: the model is not packed f32 with the fused kernels".into(),
            ));
        }
        let n = ids.len();
        let positions = att.positions();
        if positions.len() != n {
            return Err(Error::Msg(format!(
                "host forward: {} positions for {n} tokens",
                positions.len()
            )));
        }
        let embed = packed(&self.embed)?;
        let mut x = Vec::with_capacity(n * embed.cols);
        for &id in ids {
            if id as usize >= embed.rows {
                return Err(Error::Msg(format!(
                    "token id {id} is outside the vocabulary ({})",
                    embed.rows
                )));
            }
            x.extend(embed.row(id as usize));
        }
        let (cos, sin) = self.rope.tables(&positions);
        let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        let (cos, sin) = (widen(cos), widen(sin));
        for (i, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.attn, &layer.mlp);
            let norm = &layer.input_norm;
            let h = rms_norm_rows(&x, norm.host_weight()?, norm.eps());
            let [mut q, mut k, v] = matmul([&a.q, &a.k, &a.v], &h, n)?;
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                q = rms_norm_rows(&q, qn.host_weight()?, qn.eps());
                k = rms_norm_rows(&k, kn.host_weight()?, kn.eps());
            }
            rope_rows(&mut q, a.head_dim, &cos, &sin);
            rope_rows(&mut k, a.head_dim, &cos, &sin);
            let o = att.attend(i, &q, &k, &v, a.heads)?;
            let [y] = matmul([&a.o], &o, n)?;
            add(&mut x, &y);
            let norm = &layer.post_norm;
            let h = rms_norm_rows(&x, norm.host_weight()?, norm.eps());
            let [gate, up] = matmul([&m.gate, &m.up], &h, n)?;
            let [y] = matmul([&m.down], &swiglu_rows(&gate, &up), n)?;
            add(&mut x, &y);
        }
        // The final norm is per row: only the wanted rows are normed and multiplied.
        let hidden = embed.cols;
        let mut last = Vec::with_capacity(rows.len() * hidden);
        for &r in rows {
            let row = x.get(r * hidden..(r + 1) * hidden).ok_or_else(|| {
                Error::Msg(format!("host forward: row {r} of {n} tokens requested"))
            })?;
            last.extend_from_slice(row);
        }
        let h = rms_norm_rows(&last, self.norm.host_weight()?, self.norm.eps());
        let head = self.head();
        let [logits] = matmul([head], &h, rows.len())?;
        let vocab = packed(head)?.rows;
        Ok(logits.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
    }
}
