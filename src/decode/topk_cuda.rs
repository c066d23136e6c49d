//! The CUDA version of [`super::topk::softmax_topk`]: `softmax_topk.cu` (one thread block per
//! row; see that file), compiled at run time with NVRTC and launched on candle's CUDA stream.
//! Built only with `--features cuda`.
//!
//! Status (2026-11-23): written without a GPU or a CUDA toolkit on the development machine, so
//! neither this module nor the kernel has been compiled or run yet; the test below compares it
//! with the CPU version and is the first thing to run when a GPU is lent (see NOTES.md).

use super::topk::TopK;
use crate::error::{Error, Result};
use candle_core::cuda_backend::cudarc;
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::PushKernelArg;

const SOURCE: &str = include_str!("softmax_topk.cu");
const MAX_K: usize = 1024;
const THREADS: u32 = 256;

/// Fused softmax + top-k of every row of `logits: [rows, V]` (f32, on a CUDA device).
pub fn softmax_topk_cuda(logits: &Tensor, k: usize) -> Result<Vec<TopK>> {
    let Device::Cuda(dev) = logits.device() else {
        return Err(Error::Msg(
            "softmax_topk_cuda: logits must be on a CUDA device".into(),
        ));
    };
    let (rows, v) = logits.dims2()?;
    let k = k.min(v);
    if k == 0 || k > MAX_K || logits.dtype() != DType::F32 {
        return Err(Error::Msg(format!(
            "softmax_topk_cuda: need f32 logits and 1 <= k <= {MAX_K}, got k = {k}"
        )));
    }
    let logits = logits.contiguous()?;
    let ptx =
        cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| Error::Msg(format!("NVRTC: {e:?}")))?;
    let func =
        dev.get_or_load_custom_func("softmax_topk_f32", "tern_softmax_topk", &ptx.to_src())?;
    let mut ids = dev.alloc_zeros::<u32>(rows * k)?;
    let mut vals = dev.alloc_zeros::<f32>(rows * k)?;
    let mut lse = dev.alloc_zeros::<f32>(rows)?;
    {
        let (storage, layout) = logits.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(Error::Msg(
                "softmax_topk_cuda: expected CUDA storage".into(),
            ));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Msg("not contiguous".into()))?;
        let src = cs.as_cuda_slice::<f32>()?.slice(start..end);
        let (v_i, k_i) = (v as i32, k as i32);
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&v_i);
        b.arg(&k_i);
        b.arg(&mut ids);
        b.arg(&mut vals);
        b.arg(&mut lse);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(|e| Error::Msg(format!("softmax_topk launch: {e:?}")))?;
    }
    let (ids, vals, lse) = (
        dev.clone_dtoh(&ids)?,
        dev.clone_dtoh(&vals)?,
        dev.clone_dtoh(&lse)?,
    );
    Ok((0..rows)
        .map(|r| {
            let l = lse[r];
            let (ids, vals) = (&ids[r * k..(r + 1) * k], &vals[r * k..(r + 1) * k]);
            let probs = vals
                .iter()
                .map(|&x| {
                    if l.is_finite() && x > f32::NEG_INFINITY {
                        (x - l).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            TopK {
                ids: ids.to_vec(),
                probs,
                lse: l,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_matches_the_cpu_version_at_qwen_vocab() {
        let Ok(dev) = Device::new_cuda(0) else { return };
        let v = 151_936;
        let host: Vec<f32> = (0..8 * v)
            .map(|i| ((i as u64 * 2_654_435_761) % 20_000) as f32 / 1000.0 - 10.0)
            .collect();
        let t = Tensor::from_vec(host.clone(), (8, v), &dev).unwrap();
        for k in [1, 10, 50, 500] {
            let got = softmax_topk_cuda(&t, k).unwrap();
            for (r, g) in got.iter().enumerate() {
                let want = super::super::topk::softmax_topk(&host[r * v..(r + 1) * v], k);
                assert_eq!(g.ids, want.ids, "k {k} row {r}");
                assert!(
                    (g.lse - want.lse).abs() < 1e-3,
                    "k {k} row {r}: lse {} vs {}",
                    g.lse,
                    want.lse
                );
            }
        }
    }
}
