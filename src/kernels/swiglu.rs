//! The MLP's activation, `silu(gate) * up`, in one pass over the two inputs, with its backward.
//!
//! Composed of candle ops it is two passes and a temporary (`silu`, then the product), and
//! candle's `silu` calls libm's `expf` per value on candle's own thread pool: in a 512-token
//! serving step that was ~4% of the time (`perf`, NOTES.md session 25). Here the exponential is
//! the vectorizable polynomial [`exp_f32`] (relative error < 2e-7) and large inputs are split
//! over rayon's workers. [`swiglu_reference`] is the composed version; the tests compare both,
//! forward and gradients.

use super::cross_entropy::exp_f32;
use super::{contiguous_slice, with_cpu_slices, Elem};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Values per parallel task: fewer run on the calling thread (decode's 3072 values would cost
/// more to fork than to compute).
const CHUNK: usize = 16 * 1024;

/// The plain reference: candle's `silu`, then the product (both differentiable).
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Whether the fused op takes these inputs (CPU, f32 or f64, the same shape and dtype).
pub fn supported(gate: &Tensor, up: &Tensor) -> bool {
    gate.device().is_cpu()
        && matches!(gate.dtype(), DType::F32 | DType::F64)
        && gate.dtype() == up.dtype()
        && gate.shape() == up.shape()
}

/// `silu(gate) * up` in one pass (callers check [`supported`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

/// One element type's forward: `g * sigmoid(g) * u`.
trait Act: Elem {
    fn swiglu(g: Self, u: Self) -> Self;
}

impl Act for f32 {
    #[inline(always)]
    fn swiglu(g: f32, u: f32) -> f32 {
        g / (1.0 + exp_f32(-g)) * u
    }
}

impl Act for f64 {
    #[inline(always)]
    fn swiglu(g: f64, u: f64) -> f64 {
        g / (1.0 + (-g).exp()) * u
    }
}

/// The loop over one chunk (inlined into each of the variants compiled per vector width).
#[inline(always)]
fn chunk<T: Act>(y: &mut [T], g: &[T], u: &[T]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = T::swiglu(g, u);
    }
}

/// [`chunk`] compiled for AVX-512 (16 lanes; the crate's x86-64 baseline has SSE2's 4, which
/// made this op 3.6% of a 512-token serving step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn chunk_avx512<T: Act>(y: &mut [T], g: &[T], u: &[T]) {
    chunk(y, g, u)
}

/// [`chunk`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: Act>(y: &mut [T], g: &[T], u: &[T]) {
    chunk(y, g, u)
}

/// [`chunk`] at the widest vectors the CPU has.
fn chunk_widest<T: Act>(y: &mut [T], g: &[T], u: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::avx512f() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { chunk_avx512(y, g, u) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { chunk_avx2(y, g, u) };
        }
    }
    chunk(y, g, u)
}

/// The fused op's forward on host values, for inference outside candle (`model::host`): the
/// same function, so the same bits.
pub fn swiglu_rows(gate: &[f32], up: &[f32]) -> Vec<f32> {
    forward(gate, up)
}

fn forward<T: Act>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::from(0.0); g.len()];
    let run = |(y, (g, u)): (&mut [T], (&[T], &[T]))| chunk_widest(y, g, u);
    if g.len() <= CHUNK {
        run((&mut y, (g, u)));
    } else {
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(run);
    }
    y
}

/// d gate = dy * u * s * (1 + g * (1 - s)) and d up = dy * g * s, with s = sigmoid(g), in f64.
fn backward<T: Elem>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::from(0.0); g.len()];
    let mut du = vec![T::from(0.0); g.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dy)| {
            for i in 0..g.len() {
                let (gv, uv, d) = (g[i].f(), u[i].f(), dy[i].f());
                let s = 1.0 / (1.0 + (-gv).exp());
                dg[i] = T::from(d * uv * s * (1.0 + gv * (1.0 - s)));
                du[i] = T::from(d * gv * s);
            }
        });
    (dg, du)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "tern-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "swiglu: gate {:?} and up {:?} differ",
                gl.shape(),
                ul.shape()
            );
        }
        let y = match (gs, us) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(forward(
                contiguous_slice(g, gl, "swiglu: gate")?,
                contiguous_slice(u, ul, "swiglu: up")?,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(forward(
                contiguous_slice(g, gl, "swiglu: gate")?,
                contiguous_slice(u, ul, "swiglu: up")?,
            )),
            _ => candle_core::bail!("swiglu: gate and up must both be f32 or both f64"),
        };
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn typed<T: Elem>(
            g: &Tensor,
            u: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let (dg, du) = with_cpu_slices(&[g, u, dy], "swiglu backward", |v: &[&[T]]| {
                backward(v[0], v[1], v[2])
            })?;
            let shaped = |v: Vec<T>| Tensor::from_vec(v, g.shape(), g.device());
            Ok((Some(shaped(dg)?), Some(shaped(du)?)))
        }
        match g.dtype() {
            DType::F32 => typed::<f32>(g, u, dy),
            DType::F64 => typed::<f64>(g, u, dy),
            other => candle_core::bail!("swiglu backward: f32 or f64 expected, found {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs_diff;
    use candle_core::{Device, Var};

    fn input(shape: (usize, usize), seed: u64, dt: DType) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Wide enough to reach both tails of the sigmoid (and exp_f32's clamp at -87.3).
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|i| match i % 97 {
                0 => -120.0,
                1 => 95.0,
                _ => rng.gen_range(-12.0f32..12.0),
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// The fused forward equals silu(gate) * up, below and above the parallel chunk, in f32
    /// (the polynomial exp) and f64.
    #[test]
    fn forward_matches_the_reference() {
        for (shape, dt, tol) in [
            ((3, 7), DType::F32, 1e-5),
            ((5, 3 * CHUNK / 4 + 3), DType::F32, 1e-5),
            ((5, 3 * CHUNK / 4 + 3), DType::F64, 1e-12),
        ] {
            let (g, u) = (input(shape, 1, dt), input(shape, 2, dt));
            let (y, r) = (swiglu(&g, &u).unwrap(), swiglu_reference(&g, &u).unwrap());
            // Relative to the output's scale (|y| reaches ~1e3 at these inputs).
            let amax = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = 1.0
                + amax
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
            let d = max_abs_diff(&y, &r);
            assert!(
                d <= tol * scale,
                "{shape:?} {dt:?}: max diff {d} (scale {scale})"
            );
        }
    }

    /// Both inputs get the reference's gradients (a fused op without `bwd` would silently
    /// give none: shared/REFERENCE.md).
    #[test]
    fn gradients_match_the_reference() {
        for shape in [(4, 9), (3, 2 * CHUNK / 3 + 5)] {
            let (g, u) = (
                Var::from_tensor(&input(shape, 3, DType::F64)).unwrap(),
                Var::from_tensor(&input(shape, 4, DType::F64)).unwrap(),
            );
            let w = input(shape, 5, DType::F64);
            let grads = |y: Tensor| {
                let gr = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    gr.get(g.as_tensor()).expect("gate gradient").clone(),
                    gr.get(u.as_tensor()).expect("up gradient").clone(),
                )
            };
            let (fg, fu) = grads(swiglu(g.as_tensor(), u.as_tensor()).unwrap());
            let (rg, ru) = grads(swiglu_reference(g.as_tensor(), u.as_tensor()).unwrap());
            assert!(max_abs_diff(&fg, &rg) < 1e-9, "d gate");
            assert!(max_abs_diff(&fu, &ru) < 1e-9, "d up");
        }
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        let g = input((2, 3), 1, DType::F32);
        assert!(!supported(&g, &input((3, 2), 1, DType::F32)));
        assert!(!supported(&g, &input((2, 3), 1, DType::F64)));
        assert!(swiglu(&g, &input((3, 2), 1, DType::F32)).is_err());
    }
}
