//! RMSNorm and LayerNorm as fused CPU ops with a real backward, beside their plain references.
//!
//! Forward, one pass per row of D values (rows = B*T), accumulating in f64:
//!   RMSNorm:   r = 1/sqrt(mean(x^2) + eps),            y = x * r * w
//!   LayerNorm: mu, var by Welford's update, r = 1/sqrt(var + eps), y = (x - mu) * r * g + b
//! Only the per-row statistics (r, and mu for LayerNorm) are kept for the backward: they are
//! stored in the op (candle keeps the op alive in the graph), so the backward never recomputes
//! the forward's reductions. Backward, with a = dy * w (RMSNorm) or dy * g (LayerNorm):
//!   RMSNorm:   dx = r * (a - x * r^2 * mean(a * x)),             dw = sum_rows(dy * x * r)
//!   LayerNorm: xh = (x - mu) * r,
//!              dx = r * (a - mean(a) - xh * mean(a * xh)),        dg = sum_rows(dy * xh), db = sum_rows(dy)
//!
//! Where instability comes from: rows with a large mean and a tiny variance. The textbook
//! var = E[x^2] - E[x]^2 cancels catastrophically there (in f32 it can even go negative);
//! Welford's update and f64 accumulators avoid that, and the backward's mean(a * xh) uses the
//! normalized xh, not x. Complexity: O(rows * D) time, O(rows) extra memory (the statistics)
//! instead of the O(rows * D) intermediates the composed version keeps for autograd.
//! On a GPU this is one kernel per pass: a block (or warp) per row doing the reductions in
//! shared memory/registers, the statistics written to a small [rows] buffer for the backward.

use super::{contiguous_slice, with_cpu_slices, Elem};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows per parallel task in the backward passes: each task keeps one partial weight gradient
/// (summed in task order afterwards, so the result does not depend on scheduling).
const BWD_ROWS: usize = 32;

/// Adds per-task partial sums in task order.
fn sum_partials(parts: impl IntoIterator<Item = Vec<f64>>, d: usize) -> Vec<f64> {
    let mut acc = vec![0f64; d];
    for p in parts {
        for (a, b) in acc.iter_mut().zip(p) {
            *a += b;
        }
    }
    acc
}

fn to_tensor<T: Elem>(v: Vec<T>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

fn to_elems<T: Elem>(v: Vec<f64>) -> Vec<T> {
    v.into_iter().map(T::from).collect()
}

/// Plain RMSNorm composed of differentiable candle ops (the reference).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&r)?.broadcast_mul(w)?)
}

/// Plain LayerNorm composed of differentiable candle ops (the reference).
pub fn layer_norm_reference(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok(xc.broadcast_mul(&r)?.broadcast_mul(g)?.broadcast_add(b)?)
}

/// One row's RMSNorm `y = x * r * w`, in f64; returns `r = 1/sqrt(mean(x^2) + eps)`.
#[inline]
fn rms_row<T: Elem>(xr: &[T], w: &[T], eps: f64, yr: &mut [T]) -> f64 {
    let ms = sum_of_squares(xr) / xr.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
        *o = T::from(v.f() * r * wv.f());
    }
    r
}

/// `sum x^2` in f64 over 8 interleaved partial sums (lane i takes values i, i + 8, ...), added
/// in a fixed order at the end: the same value on every thread and ISA, and vectorized, where
/// one running sum waited on each add (4 cycles a value: ~1% of a 2-thread decode step, whose
/// ~115 norms per token run between the matmuls on one thread).
fn sum_of_squares<T: Elem>(xr: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xr.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v.f() * v.f();
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += v.f() * v.f();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Rows below which [`rms_norm_rows`] stays on the calling thread (one decoding token's rows
/// cost less than a fork).
const PAR_ROWS: usize = 16;

/// The fused op's forward on host rows (`x`: rows of `w.len()` values), for inference that
/// runs outside candle (`model::host`): the same arithmetic, so the same bits.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len().max(1);
    let mut y = vec![0f32; x.len()];
    if x.len() / d < PAR_ROWS {
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            rms_row(xr, w, eps, yr);
        }
    } else {
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                rms_row(xr, w, eps, yr);
            });
    }
    y
}

struct RmsNormOp {
    eps: f64,
    /// Per-row r from the forward, for the backward.
    rstd: Mutex<Vec<f64>>,
}

impl RmsNormOp {
    fn fwd<T: Elem>(
        &self,
        x: &[T],
        w: &[T],
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        if w.len() != d {
            candle_core::bail!("rms_norm: weight has {} values for rows of {d}", w.len());
        }
        let mut y = vec![T::from(0.0); x.len()];
        let rstd: Vec<f64> = y
            .par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .map(|(yr, xr)| rms_row(xr, w, self.eps, yr))
            .collect();
        *self.rstd.lock().expect("rstd lock") = rstd;
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "tern-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => self.fwd(
                contiguous_slice(x, xl, "norm: x")?,
                contiguous_slice(w, wl, "norm: w")?,
                xl,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => self.fwd(
                contiguous_slice(x, xl, "norm: x")?,
                contiguous_slice(w, wl, "norm: w")?,
                xl,
            ),
            _ => candle_core::bail!("rms_norm: x and w must both be f32 or both f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let rstd = self.rstd.lock().expect("rstd lock");
        match x.dtype() {
            DType::F32 => rms_backward::<f32>(x, w, dy, &rstd),
            DType::F64 => rms_backward::<f64>(x, w, dy, &rstd),
            other => candle_core::bail!("rms_norm backward: f32 or f64 expected, found {other:?}"),
        }
    }
}

/// dx and dw of RMSNorm from x, w, dy and the forward's r per row (see the module doc).
fn rms_backward<T: Elem>(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    rstd: &[f64],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let d = w.elem_count();
    let (dx, dw) = with_cpu_slices(&[x, w, dy], "rms_norm backward", |v: &[&[T]]| {
        let (x, w, dy) = (v[0], v[1], v[2]);
        let mut dx = vec![T::from(0.0); x.len()];
        let parts: Vec<Vec<f64>> = dx
            .par_chunks_mut(BWD_ROWS * d)
            .zip(x.par_chunks(BWD_ROWS * d).zip(dy.par_chunks(BWD_ROWS * d)))
            .zip(rstd.par_chunks(BWD_ROWS))
            .map(|((dxc, (xc, gc)), rc)| {
                let mut dw = vec![0f64; d];
                for (((dxr, xr), gr), &r) in dxc
                    .chunks_mut(d)
                    .zip(xc.chunks(d))
                    .zip(gc.chunks(d))
                    .zip(rc)
                {
                    let mean_ax = (0..d)
                        .map(|j| gr[j].f() * w[j].f() * xr[j].f())
                        .sum::<f64>()
                        / d as f64;
                    let k = r * r * mean_ax;
                    for j in 0..d {
                        let (xj, gj) = (xr[j].f(), gr[j].f());
                        dxr[j] = T::from(r * (gj * w[j].f() - xj * k));
                        dw[j] += gj * xj * r;
                    }
                }
                dw
            })
            .collect();
        (dx, sum_partials(parts, d))
    })?;
    Ok((
        Some(to_tensor(dx, x)?),
        Some(to_tensor(to_elems::<T>(dw), w)?),
    ))
}

/// Fused RMSNorm over the last dim (f32/f64 on CPU; other devices and dtypes use the reference).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let fused = matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
        && x.dim(D::Minus1)? > 0;
    if !x.device().is_cpu() || !fused {
        return rms_norm_reference(x, w, eps);
    }
    Ok(x.contiguous()?.apply_op2(
        w,
        RmsNormOp {
            eps,
            rstd: Mutex::new(Vec::new()),
        },
    )?)
}

struct LayerNormOp {
    eps: f64,
    /// Per-row (mu, r) from the forward.
    stats: Mutex<Vec<(f64, f64)>>,
}

impl LayerNormOp {
    fn fwd<T: Elem>(
        &self,
        x: &[T],
        g: &[T],
        b: &[T],
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        if g.len() != d || b.len() != d {
            candle_core::bail!(
                "layer_norm: gamma/beta have {}/{} values for rows of {d}",
                g.len(),
                b.len()
            );
        }
        let mut y = vec![T::from(0.0); x.len()];
        let stats: Vec<(f64, f64)> = y
            .par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .map(|(yr, xr)| {
                // Welford: stable for a large mean with a tiny variance.
                let (mut mean, mut m2) = (0f64, 0f64);
                for (k, &v) in xr.iter().enumerate() {
                    let v = v.f();
                    let delta = v - mean;
                    mean += delta / (k + 1) as f64;
                    m2 += delta * (v - mean);
                }
                let r = 1.0 / (m2 / d as f64 + self.eps).sqrt();
                for j in 0..d {
                    yr[j] = T::from((xr[j].f() - mean) * r * g[j].f() + b[j].f());
                }
                (mean, r)
            })
            .collect();
        *self.stats.lock().expect("stats lock") = stats;
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tern-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (xs, gs, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => self.fwd(
                contiguous_slice(x, xl, "norm: x")?,
                contiguous_slice(g, gl, "norm: gamma")?,
                contiguous_slice(b, bl, "norm: beta")?,
                xl,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => self.fwd(
                contiguous_slice(x, xl, "norm: x")?,
                contiguous_slice(g, gl, "norm: gamma")?,
                contiguous_slice(b, bl, "norm: beta")?,
                xl,
            ),
            _ => {
                candle_core::bail!("layer_norm: x, gamma and beta must share one dtype, f32 or f64")
            }
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("stats lock");
        match x.dtype() {
            DType::F32 => layer_backward::<f32>(x, g, b, dy, &stats),
            DType::F64 => layer_backward::<f64>(x, g, b, dy, &stats),
            other => {
                candle_core::bail!("layer_norm backward: f32 or f64 expected, found {other:?}")
            }
        }
    }
}

/// dx, dgamma and dbeta of LayerNorm from x, gamma, dy and the forward's (mu, r) per row.
fn layer_backward<T: Elem>(
    x: &Tensor,
    g: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    stats: &[(f64, f64)],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let d = g.elem_count();
    let (dx, dg, db) = with_cpu_slices(&[x, g, dy], "layer_norm backward", |v: &[&[T]]| {
        let (x, gamma, dy) = (v[0], v[1], v[2]);
        let mut dx = vec![T::from(0.0); x.len()];
        let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(BWD_ROWS * d)
            .zip(x.par_chunks(BWD_ROWS * d).zip(dy.par_chunks(BWD_ROWS * d)))
            .zip(stats.par_chunks(BWD_ROWS))
            .map(|((dxc, (xc, gc)), sc)| {
                let (mut dg, mut db) = (vec![0f64; d], vec![0f64; d]);
                for (((dxr, xr), gr), &(mu, r)) in dxc
                    .chunks_mut(d)
                    .zip(xc.chunks(d))
                    .zip(gc.chunks(d))
                    .zip(sc)
                {
                    let xh = |j: usize| (xr[j].f() - mu) * r;
                    let a = |j: usize| gr[j].f() * gamma[j].f();
                    let (mut sum_a, mut sum_axh) = (0f64, 0f64);
                    for j in 0..d {
                        sum_a += a(j);
                        sum_axh += a(j) * xh(j);
                    }
                    let (mean_a, mean_axh) = (sum_a / d as f64, sum_axh / d as f64);
                    for j in 0..d {
                        dxr[j] = T::from(r * (a(j) - mean_a - xh(j) * mean_axh));
                        dg[j] += gr[j].f() * xh(j);
                        db[j] += gr[j].f();
                    }
                }
                (dg, db)
            })
            .collect();
        let (pg, pb): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        (dx, sum_partials(pg, d), sum_partials(pb, d))
    })?;
    Ok((
        Some(to_tensor(dx, x)?),
        Some(to_tensor(to_elems::<T>(dg), g)?),
        Some(to_tensor(to_elems::<T>(db), b)?),
    ))
}

/// Fused LayerNorm over the last dim (f32/f64 on CPU; otherwise the reference).
pub fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let fused = matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == g.dtype()
        && x.dtype() == b.dtype()
        && x.dim(D::Minus1)? > 0;
    if !x.device().is_cpu() || !fused {
        return layer_norm_reference(x, g, b, eps);
    }
    Ok(x.contiguous()?.apply_op3(
        g,
        b,
        LayerNormOp {
            eps,
            stats: Mutex::new(Vec::new()),
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], mean: f64, std: f64, dtype: DType, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                // Box-Muller
                let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The host rows function is the op's forward bit for bit, on one thread (few rows) and
    /// split over workers (many).
    #[test]
    fn host_rows_equal_the_op() {
        for rows in [3, 40] {
            let x = randn(&[rows, 24], 0.5, 2.0, DType::F32, 7);
            let w = randn(&[24], 1.0, 0.3, DType::F32, 8);
            let op: Vec<f32> = rms_norm(&x, &w, 1e-6)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let host = rms_norm_rows(&xs, &w.to_vec1::<f32>().unwrap(), 1e-6);
            assert_eq!(host, op, "{rows} rows");
        }
    }

    /// Fused and reference: outputs and every gradient agree (loss = sum(y * c)).
    fn compare(layer: bool, x: &Tensor, tol: f64) {
        let d = x.dim(D::Minus1).unwrap();
        let dt = x.dtype();
        let (xv, g, b) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(&randn(&[d], 1.0, 0.3, dt, 2)).unwrap(),
            Var::from_tensor(&randn(&[d], 0.0, 0.3, dt, 3)).unwrap(),
        );
        let c = randn(x.dims(), 0.0, 1.0, dt, 4);
        let run = |fused: bool| {
            let y = match (layer, fused) {
                (false, true) => rms_norm(xv.as_tensor(), g.as_tensor(), 1e-6).unwrap(),
                (false, false) => rms_norm_reference(xv.as_tensor(), g.as_tensor(), 1e-6).unwrap(),
                (true, true) => {
                    layer_norm(xv.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5).unwrap()
                }
                (true, false) => {
                    layer_norm_reference(xv.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)
                        .unwrap()
                }
            };
            let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Option<Tensor>> = [&xv, &g, &b]
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect();
            (y, gs)
        };
        let (yf, gf) = run(true);
        let (yr, gr) = run(false);
        assert!(max_diff(&yf, &yr) < tol, "forward {}", max_diff(&yf, &yr));
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => assert!(max_diff(a, b) < tol, "grad {i}: {}", max_diff(a, b)),
                (None, None) => {}
                _ => panic!("gradient {i} present in one version only"),
            }
        }
        assert!(
            gf[0].is_some() && gf[1].is_some(),
            "x and weight get gradients"
        );
    }

    #[test]
    fn fused_norms_equal_the_references_on_shifted_inputs() {
        let x = randn(&[2, 7, 96], -2.3, 0.5, DType::F32, 1);
        compare(false, &x, 1e-4);
        compare(true, &x, 1e-4);
        // 150 rows: several backward tasks (BWD_ROWS each) and a short last one.
        let x = randn(&[3, 50, 40], 0.7, 1.5, DType::F32, 12);
        compare(false, &x, 1e-4);
        compare(true, &x, 1e-4);
    }

    #[test]
    fn near_constant_rows_stay_accurate() {
        // Mean 1000, spread 1e-3: E[x^2] - E[x]^2 in f32 loses every digit.
        let x64 = randn(&[4, 256], 1000.0, 1e-3, DType::F64, 5);
        let (g, b) = (
            Tensor::ones(256, DType::F64, &Device::Cpu).unwrap(),
            Tensor::zeros(256, DType::F64, &Device::Cpu).unwrap(),
        );
        let truth = layer_norm_reference(&x64, &g, &b, 1e-12).unwrap();
        let fused = layer_norm(
            &x64.to_dtype(DType::F32).unwrap(),
            &g.to_dtype(DType::F32).unwrap(),
            &b.to_dtype(DType::F32).unwrap(),
            1e-12,
        )
        .unwrap();
        // f32 inputs round x itself by ~3e-5 (relative to the 1e-3 spread), so compare loosely
        // against the truth of the rounded inputs.
        let truth32 = layer_norm_reference(
            &x64.to_dtype(DType::F32)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
            &g,
            &b,
            1e-12,
        )
        .unwrap();
        assert!(
            max_diff(&fused, &truth32) < 1e-3,
            "{}",
            max_diff(&fused, &truth32)
        );
        assert!(max_diff(&truth, &truth32) < 0.2);
        let y = fused.to_dtype(DType::F64).unwrap();
        let var = y
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (var - 1.0).abs() < 1e-3,
            "normalized rows have unit variance: {var}"
        );
        compare(true, &randn(&[3, 64], 50.0, 1e-4, DType::F64, 6), 1e-8);
        compare(false, &randn(&[3, 64], 50.0, 1e-4, DType::F64, 7), 1e-8);
    }

    #[test]
    fn finite_differences_in_f64() {
        for layer in [false, true] {
            let d = 12;
            let x = Var::from_tensor(&randn(&[3, d], -2.3, 0.5, DType::F64, 8)).unwrap();
            let g = Var::from_tensor(&randn(&[d], 1.0, 0.3, DType::F64, 9)).unwrap();
            let b = Var::from_tensor(&randn(&[d], 0.0, 0.3, DType::F64, 10)).unwrap();
            let c = randn(&[3, d], 0.0, 1.0, DType::F64, 11);
            let loss = || -> Tensor {
                let y = if layer {
                    layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5).unwrap()
                } else {
                    rms_norm(x.as_tensor(), g.as_tensor(), 1e-6).unwrap()
                };
                (y * &c).unwrap().sqr().unwrap().sum_all().unwrap()
            };
            let grads = loss().backward().unwrap();
            for v in [&x, &g, &b] {
                let Some(an) = grads.get(v.as_tensor()) else {
                    assert!(
                        !layer && std::ptr::eq(v, &b),
                        "only RMSNorm's unused beta lacks a gradient"
                    );
                    continue;
                };
                let an = an.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let base = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let shape = v.as_tensor().dims().to_vec();
                for k in 0..base.len() {
                    let at = |delta: f64| {
                        let mut p = base.clone();
                        p[k] += delta;
                        v.set(&Tensor::from_vec(p, shape.as_slice(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss().to_scalar::<f64>().unwrap()
                    };
                    let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
                    at(0.0);
                    assert!(
                        (an[k] - fd).abs() <= 1e-5 + 1e-3 * fd.abs(),
                        "layer={layer} [{k}]: {} vs {fd}",
                        an[k]
                    );
                }
            }
        }
    }
}
