//! A ternary linear layer as one op for training: `y = x @ P(w)^T` where `P` is the ternary
//! projection with its STE (`kernels::project`), beside the composed reference
//! `linear(x, project_ste(w))`.
//!
//! Why: in the composed form autograd keeps the projected weight `P(w)` of every layer alive
//! from the forward to the backward (it is the matmul's saved input): one extra f32 copy of the
//! whole model, 2.2 GiB for Qwen3-0.6B. Here the forward projects into a scratch buffer, does
//! the GEMM and frees it; the backward projects again (one cheap pass over the weight, far
//! cheaper than the GEMMs) and computes
//!   dx = dy @ P(w),   dw = dy^T @ x   (straight-through: dL/dw = dL/dP(w)).
//! Memory: one projected weight at a time instead of all of them. Time: one extra projection
//! pass per layer per step. On a GPU the projection fuses into the GEMM's weight-tile loader.

use super::contiguous_slice;
use super::project::ProjectSte;
use crate::error::Result;
use crate::quant::QuantConfig;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

struct TernaryLinearOp {
    quant: QuantConfig,
}

fn rows_in(l: &Layout) -> (usize, usize) {
    let dims = l.dims();
    let in_dim = *dims.last().unwrap_or(&1);
    (
        dims[..dims.len().saturating_sub(1)].iter().product(),
        in_dim,
    )
}

/// `x [rows, in] @ wq [out, in]^T` with candle's GEMM in `T`.
fn dense_gemm<T: candle_core::WithDType>(
    x: &[T],
    wq: Vec<T>,
    (rows, out_dim, in_dim): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    let wq = Tensor::from_vec(wq, (out_dim, in_dim), &Device::Cpu)?;
    let xt = Tensor::from_slice(x, (rows, in_dim), &Device::Cpu)?;
    xt.matmul(&wq.t()?)?.flatten_all()?.to_vec1::<T>()
}

impl TernaryLinearOp {
    /// Projects `w` and multiplies with `gemm` (candle's, or the bf16 one for f32 under
    /// `quant.gemm_bf16`).
    fn fwd<T: super::project::num_like::Num + candle_core::WithDType>(
        &self,
        x: &[T],
        xl: &Layout,
        w: &[T],
        wl: &Layout,
        gemm: impl FnOnce(&[T], Vec<T>, (usize, usize, usize)) -> candle_core::Result<Vec<T>>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = rows_in(xl);
        let (out_dim, w_in) = wl.shape().dims2()?;
        if w_in != in_dim {
            candle_core::bail!(
                "ternary linear: x has {in_dim} features, weight {:?}",
                wl.dims()
            );
        }
        let wq = ProjectSte::new(&self.quant).run(w, in_dim);
        let y = gemm(x, wq, (rows, out_dim, in_dim))?;
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        Ok((T::to_cpu_storage_owned(y), Shape::from(dims)))
    }
}

impl CustomOp2 for TernaryLinearOp {
    fn name(&self) -> &'static str {
        "tern-ternary-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (x, w) = (
                    contiguous_slice(x, xl, "ternary linear: x")?,
                    contiguous_slice(w, wl, "ternary linear: w")?,
                );
                if self.quant.gemm_bf16 {
                    // CPU mixed precision: the GEMM in bf16 (f32 in, f32 out).
                    self.fwd(x, xl, w, wl, |x, wq, (r, o, i)| {
                        Ok(super::gemm_bf16::matmul_nt(x, &wq, r, o, i))
                    })
                } else {
                    self.fwd(x, xl, w, wl, dense_gemm)
                }
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => self.fwd(
                contiguous_slice(x, xl, "ternary linear: x")?,
                xl,
                contiguous_slice(w, wl, "ternary linear: w")?,
                wl,
                dense_gemm,
            ),
            _ => candle_core::bail!("ternary linear: x and w must both be f32 or both f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, in_dim) = rows_in(x.layout());
        let out_dim = w.dim(0)?;
        let wq = super::project::project_ste(&w.detach(), &self.quant)
            .map_err(candle_core::Error::wrap)?;
        let dy2 = dy.reshape((rows, out_dim))?;
        if self.quant.gemm_bf16 && x.dtype() == DType::F32 {
            return bwd_bf16(x, &wq, &dy2, rows, in_dim, out_dim);
        }
        let dx = dy2.matmul(&wq)?.reshape(x.shape())?;
        // x is a graph node: detach it, or dw would record a matmul op holding x and dy, and
        // candle's gradient sum (zeros + dw) would keep all three alive until the step ends.
        let dw = dy2.t()?.matmul(&x.detach().reshape((rows, in_dim))?)?;
        Ok((Some(dx.detach()), Some(dw.detach())))
    }
}

/// The backward's two GEMMs in bf16, `dx = dy @ P(w)` and `dw = dy^T @ x`, read in place: the
/// GEMM packs `P(w)`, `dy` and `x` from the orders they are stored in (no f32 transposes).
fn bwd_bf16(
    x: &Tensor,
    wq: &Tensor,
    dy: &Tensor,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    use super::gemm_bf16::{matmul, Order};
    let x2 = x.detach().reshape((rows, in_dim))?;
    let (dx, dw) = super::with_cpu_slices::<f32, _>(&[dy, wq, &x2], "bf16 backward", |s| {
        let (dy, wq, x) = (s[0], s[1], s[2]);
        // dx[rows, in] = dy[rows, out] @ P(w)[out, in]: B = P(w) is k-major (k = out).
        let dx = matmul(
            (dy, Order::Rows),
            (wq, Order::KMajor),
            rows,
            in_dim,
            out_dim,
        );
        // dw[out, in] = dy^T @ x: both k-major over k = rows.
        let dw = matmul(
            (dy, Order::KMajor),
            (x, Order::KMajor),
            out_dim,
            in_dim,
            rows,
        );
        (dx, dw)
    })?;
    Ok((
        Some(Tensor::from_vec(dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(dw, (out_dim, in_dim), x.device())?),
    ))
}

/// Whether [`ternary_linear`] can run: a ternary layer (ramp above 0) on the CPU, x and w both
/// f32 or both f64, w 2-D.
pub fn supported(x: &Tensor, w: &Tensor, quant: &QuantConfig) -> bool {
    quant.ternary
        && quant.ramp != 0.0
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
        && w.rank() == 2
}

/// `x @ P(w)^T` for `x: [..., in]`, `w: [out, in]` as one op (see [`supported`]).
pub fn ternary_linear(x: &Tensor, w: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, TernaryLinearOp { quant: *quant })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernels;
    use candle_core::Var;

    #[test]
    fn fused_linear_matches_the_composed_layer_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 40), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (24, 40), &dev).unwrap()).unwrap();
        let dyw = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap();
        for ramp in [1.0, 0.4] {
            let xv = Var::from_tensor(&x).unwrap();
            let run = |kernels: Kernels| {
                let q = QuantConfig {
                    group_size: 16,
                    ramp,
                    ..QuantConfig::default()
                };
                let y = kernels
                    .ternary_linear(xv.as_tensor(), w.as_tensor(), &q)
                    .unwrap();
                let g = (&y * &dyw).unwrap().sum_all().unwrap().backward().unwrap();
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (
                    v(&y),
                    v(g.get(xv.as_tensor()).unwrap()),
                    v(g.get(w.as_tensor()).unwrap()),
                )
            };
            let (a, b) = (run(Kernels::Fused), run(Kernels::Reference));
            for (name, p, r) in [("y", &a.0, &b.0), ("dx", &a.1, &b.1), ("dw", &a.2, &b.2)] {
                let err = p
                    .iter()
                    .zip(r)
                    .map(|(u, v)| (u - v).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{name} (ramp {ramp}): max abs err {err}");
            }
        }
    }
}
