//! Rotary position embedding with a backward, fused with the head transpose, beside the plain
//! reference.
//!
//! Reference (differentiable candle ops): `x.transpose(1, 2).contiguous()`, then
//! `y = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]` (the half-split
//! form Qwen uses). That costs a transposed copy, then five full-size temporaries (two halves,
//! their concatenation, two products), all kept for autograd.
//!
//! Fused: one pass reads `x: [B, T, H, d]` (as the projections produce it) and writes
//! `y: [B, H, T, d]` (as attention wants it). The rotation is linear, so the backward needs no
//! saved activations, only the tables: `dx1 = dy1 * cos + dy2 * sin`, `dx2 = dy2 * cos - dy1 * sin`
//! (per half, with the duplicated cos/sin halves), written back in `[B, T, H, d]` order.
//! Time O(B*T*H*d) each way; memory: the output only. On a GPU it is one elementwise kernel
//! (a thread per pair (j, j + d/2)), the tables in constant/shared memory.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

/// Rotary position tables (the half-split "rotate_half" form Qwen uses).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        Self { inv_freq }
    }

    /// Tables from given frequencies (`head_dim / 2` of them), e.g. Llama-3-scaled ones.
    pub fn from_inv_freq(inv_freq: Vec<f32>) -> Self {
        Self { inv_freq }
    }

    /// cos and sin tables `[T, head_dim]` for the given absolute positions.
    pub fn cos_sin(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.tables(positions);
        let shape = (positions.len(), self.inv_freq.len() * 2);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// [`Rope::cos_sin`]'s values as host rows `[T, head_dim]` (f32).
    pub fn tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half * 2);
        let mut sin = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            // Angle in f32 like the HF reference, then cos/sin in f64 and rounded once.
            let ang: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(ang.iter().map(|a| (*a as f64).cos() as f32));
                sin.extend(ang.iter().map(|a| (*a as f64).sin() as f32));
            }
        }
        (cos, sin)
    }
}

/// One head's rotation in place: `x` (`d` values) by one position's table rows `cs`, `sn`.
#[inline]
fn rotate<T: Float>(x: &mut [T], cs: &[f64], sn: &[f64]) {
    let half = x.len() / 2;
    let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        x[j] = a * c(cs[j]) - b * c(sn[j]);
        x[j + half] = b * c(cs[j + half]) + a * c(sn[j + half]);
    }
}

/// The fused op's rotation on host rows, in place, for inference outside candle
/// (`model::host`): `x: [T, heads, d]` token-major (no transpose), token `t` rotated by row `t`
/// of the tables `[T, d]` ([`Rope::tables`] widened to f64, as the op holds them). The same
/// arithmetic as the op, so the same bits.
pub fn rope_rows(x: &mut [f32], d: usize, cos: &[f64], sin: &[f64]) {
    let tokens = cos.len().checked_div(d).unwrap_or(0);
    let Some(per_token) = x.len().checked_div(tokens).filter(|&p| p > 0) else {
        return;
    };
    for ((tok, cs), sn) in x
        .chunks_exact_mut(per_token)
        .zip(cos.chunks_exact(d))
        .zip(sin.chunks_exact(d))
    {
        for head in tok.chunks_exact_mut(d) {
            rotate(head, cs, sn);
        }
    }
}

/// The plain reference on `x: [B, H, T, d]` (already transposed), tables broadcastable to it.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// The reference of [`rope_transposed`]: transpose `[B, T, H, d] -> [B, H, T, d]`, then rotate.
pub fn rope_transposed_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_reference(&x.transpose(1, 2)?.contiguous()?, cos, sin)
}

struct RopeOp {
    /// cos/sin rows of d values: T rows (shared by the batch) or B*T rows (per-row positions).
    cos: Vec<f64>,
    sin: Vec<f64>,
    per_batch: bool,
}

impl RopeOp {
    fn table_row(&self, b: usize, t: usize, tlen: usize) -> usize {
        if self.per_batch {
            b * tlen + t
        } else {
            t
        }
    }

    /// `src` in `[B, T, H, d]` order -> `[B, H, T, d]` (forward), or the transposed backward.
    fn run<T: Float + Send + Sync>(&self, src: &[T], dims: [usize; 4], backward: bool) -> Vec<T> {
        let [_, t, h, d] = dims;
        let half = d / 2;
        let mut out = vec![T::zero(); src.len()];
        let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
        if !backward {
            // Output chunk per (b, h): T rows of d.
            out.par_chunks_mut(t * d)
                .enumerate()
                .for_each(|(bh, chunk)| {
                    let (bi, hi) = (bh / h, bh % h);
                    for (ti, y) in chunk.chunks_mut(d).enumerate() {
                        y.copy_from_slice(&src[((bi * t + ti) * h + hi) * d..][..d]);
                        let row = self.table_row(bi, ti, t) * d;
                        rotate(y, &self.cos[row..row + d], &self.sin[row..row + d]);
                    }
                });
        } else {
            // src is dy in [B, H, T, d]; output chunk per (b, t): H rows of d, in [B, T, H, d].
            out.par_chunks_mut(h * d)
                .enumerate()
                .for_each(|(bt, chunk)| {
                    let (bi, ti) = (bt / t, bt % t);
                    let row = self.table_row(bi, ti, t) * d;
                    let (cs, sn) = (&self.cos[row..row + d], &self.sin[row..row + d]);
                    for (hi, dx) in chunk.chunks_mut(d).enumerate() {
                        let g = &src[((bi * h + hi) * t + ti) * d..][..d];
                        for j in 0..half {
                            dx[j] = g[j] * c(cs[j]) + g[j + half] * c(sn[j + half]);
                            dx[j + half] = g[j + half] * c(cs[j + half]) - g[j] * c(sn[j]);
                        }
                    }
                });
        }
        out
    }
}

fn dims4(l: &Layout) -> candle_core::Result<[usize; 4]> {
    match l.dims() {
        &[b, t, h, d] if d % 2 == 0 => Ok([b, t, h, d]),
        other => candle_core::bail!("rope: expected [B, T, H, d] with even d, got {other:?}"),
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "tern-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b, t, h, d] = dims4(l)?;
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("rope: input must be contiguous")
        };
        let out_shape = Shape::from((b, h, t, d));
        match s {
            CpuStorage::F32(x) => Ok((
                CpuStorage::F32(self.run(&x[lo..hi], [b, t, h, d], false)),
                out_shape,
            )),
            CpuStorage::F64(x) => Ok((
                CpuStorage::F64(self.run(&x[lo..hi], [b, t, h, d], false)),
                out_shape,
            )),
            _ => candle_core::bail!("rope: f32 or f64 only"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = dims4(arg.layout())?;
        let dy = dy.contiguous()?;
        let dx = match arg.dtype() {
            DType::F32 => Tensor::from_vec(
                self.run(&dy.flatten_all()?.to_vec1::<f32>()?, dims, true),
                arg.shape(),
                arg.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                self.run(&dy.flatten_all()?.to_vec1::<f64>()?, dims, true),
                arg.shape(),
                arg.device(),
            )?,
            dt => candle_core::bail!("rope backward: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}

/// RoPE fused with the head transpose: `x: [B, T, H, d]` -> `[B, H, T, d]`, with tables `cos`,
/// `sin` of shape `[T, d]` (shared positions) or `[B, 1, T, d]` (per-row positions).
/// Falls back to the reference off the CPU or for other dtypes.
pub fn rope_transposed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !fused {
        return rope_transposed_reference(x, cos, sin);
    }
    let (b, t, _, d) = x.dims4()?;
    let per_batch = cos.rank() == 4;
    let rows = if per_batch { b * t } else { t };
    let table = |m: &Tensor| -> Result<Vec<f64>> {
        let v: Vec<f64> = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        if v.len() != rows * d {
            return Err(crate::Error::Msg(format!(
                "rope: table has {} values, expected {rows} x {d}",
                v.len()
            )));
        }
        Ok(v)
    };
    let op = RopeOp {
        cos: table(cos)?,
        sin: table(sin)?,
        per_batch,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff as max_abs;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, dt: DType) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// The host rows function is the op's forward bit for bit (token-major, not transposed).
    #[test]
    fn host_rows_equal_the_op() {
        let (t, h, d) = (5, 3, 8);
        let rope = Rope::new(d, 10000.0);
        let positions = [0, 7, 8, 9, 300];
        let (cos, sin) = rope.cos_sin(&positions, DType::F32, &Device::Cpu).unwrap();
        let x = randn(&[1, t, h, d], 3, DType::F32);
        let op: Vec<f32> = rope_transposed(&x, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (c, s) = rope.tables(&positions);
        let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let mut host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        rope_rows(&mut host, d, &widen(c), &widen(s));
        assert_eq!(host, op);
    }

    #[test]
    fn forward_and_backward_match_the_reference() {
        let (b, t, h, d) = (2, 9, 3, 16);
        let rope = Rope::new(d, 10000.0);
        let positions: Vec<u32> = (5..5 + t as u32).collect();
        let (cos, sin) = rope.cos_sin(&positions, DType::F32, &Device::Cpu).unwrap();
        let per_row: Vec<u32> = (0..b as u32)
            .flat_map(|r| r * 3..r * 3 + t as u32)
            .collect();
        let (pc, ps) = rope.cos_sin(&per_row, DType::F32, &Device::Cpu).unwrap();
        let (pc, ps) = (
            pc.reshape((b, 1, t, d)).unwrap(),
            ps.reshape((b, 1, t, d)).unwrap(),
        );
        let x = randn(&[b, t, h, d], 1, DType::F32);
        let w = randn(&[b, h, t, d], 2, DType::F32);
        for (c, s) in [(&cos, &sin), (&pc, &ps)] {
            let xv = Var::from_tensor(&x).unwrap();
            let fused = rope_transposed(xv.as_tensor(), c, s).unwrap();
            let plain = rope_transposed_reference(xv.as_tensor(), c, s).unwrap();
            assert!(max_abs(&fused, &plain) < 1e-6);
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, r) = (
                gf.get(xv.as_tensor()).unwrap(),
                gp.get(xv.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), &[b, t, h, d]);
            assert!(max_abs(a, r) < 1e-6);
        }
    }
}
