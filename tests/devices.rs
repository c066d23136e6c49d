//! The GPU path against the CPU path, and mixed precision (bf16) against f32.
//!
//! CUDA tests compare a CUDA run with the CPU run of the same weights and inputs: logits, every
//! parameter's gradient, one full training step (AdamW included), greedy generation and the
//! fused top-k. Without a CUDA device (or without `--features cuda`) each prints a SKIP line and
//! passes: the CPU suite never depends on a GPU. scripts/gpu_check.sh runs this test executable,
//! prebuilt by scripts/build_cuda.sh, on the GPU machine.
//!
//! Metal tests (`metal_*`, Apple Silicon, `--features metal`: scripts/mac_check.sh) run the same
//! checks on a Metal device, where every fused CPU kernel falls back to its candle reference
//! (decided in `tern::kernels::Kernels`, as on CUDA).
//!
//! bf16 tests run on the CPU too: `tern train` runs bf16 tensors only on GPUs (on a CPU it
//! means bf16 GEMMs on AMX or AVX512-BF16, tested here as well), but the mixed-precision graph is the same on
//! every device, so its gradients are proven here.

mod common;
use common::small_config;

use candle_core::{DType, Device, Tensor};
use tern::decode::generate::{generate_batch, GenerateConfig};
use tern::decode::sampler::SamplerConfig;
use tern::kernels::ComputeDtype;
use tern::model::{Model, ModelConfig, Params};
use tern::quant::QuantConfig;
use tern::train::optim::{AdamW, AdamWConfig};
use tern::train::step::{train_step, window_loss, StepConfig};

/// The GPU of `kind` ("cuda" or "metal"), or None after a SKIP line.
fn gpu(kind: &str, test: &str) -> Option<Device> {
    let opened = match kind {
        "cuda" => Device::new_cuda(0),
        _ => Device::new_metal(0),
    };
    match opened {
        Ok(d) => Some(d),
        Err(e) => {
            // Straight to the stderr handle: libtest captures only the print macros, so this
            // line shows in a plain `cargo test`.
            use std::io::Write;
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no {kind} device ({first})");
            None
        }
    }
}

/// One check run on each GPU backend: `cuda_NAME` and `metal_NAME` tests, each a SKIP line
/// without its device.
macro_rules! on_each_gpu {
    ($check:ident: $cuda:ident, $metal:ident) => {
        #[test]
        fn $cuda() {
            if let Some(dev) = gpu("cuda", stringify!($cuda)) {
                $check(&dev);
            }
        }
        #[test]
        fn $metal() {
            if let Some(dev) = gpu("metal", stringify!($metal)) {
                $check(&dev);
            }
        }
    };
}

fn arch() -> ModelConfig {
    small_config(64, 160, 16, 301)
}

fn quant() -> QuantConfig {
    QuantConfig {
        group_size: 32,
        ..QuantConfig::default()
    }
}

/// The same scratch weights on `device` (made on the host, so identical everywhere).
fn params_on(device: &Device) -> Params {
    let host = Params::scratch(&arch(), 7, DType::F32, &Device::Cpu).unwrap();
    Params::from_tensors(
        host.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().to_device(device).unwrap())),
    )
    .unwrap()
}

fn windows(device: &Device) -> Tensor {
    let ids: Vec<u32> = (0..3 * 17).map(|i| (i * 37 + 11) % 301).collect();
    Tensor::from_vec(ids, (3, 17), device).unwrap()
}

fn host_vec(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// (loss, gradient of every parameter by name) of one window batch.
fn loss_and_grads(device: &Device, compute: DType) -> (f32, Vec<(String, Vec<f32>)>) {
    loss_and_grads_with(device, compute, false)
}

/// `gemm_bf16`: the ternary layers' GEMMs in bf16 on the CPU (AMX or AVX512-BF16), tensors f32.
fn loss_and_grads_with(
    device: &Device,
    compute: DType,
    gemm_bf16: bool,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let params = params_on(device);
    let q = QuantConfig {
        gemm_bf16,
        ..quant()
    };
    let model = Model::new(&arch(), q, &params)
        .unwrap()
        .with_compute_dtype(compute);
    let loss = window_loss(&model, &windows(device)).unwrap();
    let grads = loss.backward().unwrap();
    let per = params
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient on {device:?} in {compute:?}"));
            assert_eq!(g.dtype(), DType::F32, "{name}: gradient of an f32 latent");
            (name.clone(), host_vec(g))
        })
        .collect();
    (host_vec(&loss)[0], per)
}

on_each_gpu!(logits_match_the_cpu: cuda_logits_match_the_cpu, metal_logits_match_the_cpu);

fn logits_match_the_cpu(dev: &Device) {
    let dev = dev.clone();
    let logits = |d: &Device| {
        let p = params_on(d);
        let m = Model::new(&arch(), quant(), &p).unwrap();
        host_vec(&m.full_logits(&windows(d)).unwrap())
    };
    let r = rel_diff(&logits(&dev), &logits(&Device::Cpu));
    assert!(r < 1e-4, "logits differ by {r} (relative)");
}

on_each_gpu!(gradients_match_the_cpu: cuda_gradients_of_every_parameter_match_the_cpu, metal_gradients_of_every_parameter_match_the_cpu);

fn gradients_match_the_cpu(dev: &Device) {
    let dev = dev.clone();
    let (lc, gc) = loss_and_grads(&Device::Cpu, DType::F32);
    let (lg, gg) = loss_and_grads(&dev, DType::F32);
    assert!((lc - lg).abs() < 1e-4 * lc.abs(), "loss {lg} vs {lc}");
    for ((name, g), (_, c)) in gg.iter().zip(&gc) {
        let r = rel_diff(g, c);
        assert!(r < 1e-3, "{name}: gradient differs by {r} (relative)");
    }
}

on_each_gpu!(training_step_matches_the_cpu: cuda_training_step_matches_the_cpu, metal_training_step_matches_the_cpu);

fn training_step_matches_the_cpu(dev: &Device) {
    let dev = dev.clone();
    let step = |d: &Device| {
        let params = params_on(d);
        let model = Model::new(&arch(), quant(), &params).unwrap();
        // eps 1e-3, not training's 1e-8: a first AdamW step moves each weight by
        // lr * g / (|g| + eps), with eps 1e-8 that is lr * sign(g), and a weight whose gradient is
        // ~0 moves by +-lr on rounding noise alone (seen on an H200: 0.0015 at lr 1e-2). With a
        // large eps the update is a smooth function of g, so agreement measures the step.
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-3,
            weight_decay: 0.1,
        });
        let cfg = StepConfig {
            lr: 1e-2,
            max_grad_norm: 1.0,
            inject_nan: false,
        };
        let w = windows(d);
        let r = train_step(
            &model,
            &params,
            &mut opt,
            1,
            || Ok(w.clone()),
            cfg,
            tern::train::step::Objective::CrossEntropy,
        )
        .unwrap();
        assert!(r.applied);
        let weights: Vec<Vec<f32>> = params.iter().map(|(_, v)| host_vec(v)).collect();
        (r.grad_norm, weights)
    };
    let (nc, wc) = step(&Device::Cpu);
    let (ng, wg) = step(&dev);
    assert!((nc - ng).abs() < 1e-4 * nc, "grad norm {ng} vs {nc}");
    for (g, c) in wg.iter().zip(&wc) {
        let worst = g.iter().zip(c).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // One AdamW step moves each weight by about lr; agreement far below it.
        assert!(worst < 1e-4, "weights after one step differ by {worst}");
    }
}

on_each_gpu!(greedy_generation_matches_the_cpu: cuda_greedy_generation_matches_the_cpu, metal_greedy_generation_matches_the_cpu);

fn greedy_generation_matches_the_cpu(dev: &Device) {
    let dev = dev.clone();
    let run = |d: &Device| {
        let p = params_on(d);
        let m = Model::new(&arch(), quant(), &p).unwrap().freeze().unwrap();
        let cfg = GenerateConfig {
            max_new: 16,
            sampler: SamplerConfig {
                temp: 0.0,
                ..Default::default()
            },
            eos: vec![],
        };
        generate_batch(&m, &[vec![5, 9, 200], vec![17]], &cfg, |_, _| false)
            .unwrap()
            .into_iter()
            .map(|(ids, _)| ids)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(&dev), run(&Device::Cpu));
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_topk_matches_the_cpu() {
    let Some(dev) = gpu("cuda", "cuda_fused_topk_matches_the_cpu") else {
        return;
    };
    let v = 151_936;
    let host: Vec<f32> = (0..4 * v)
        .map(|i| ((i as u64 * 2_654_435_761) % 20_000) as f32 / 1000.0 - 10.0)
        .collect();
    let t = Tensor::from_vec(host.clone(), (4, v), &dev).unwrap();
    for k in [1, 40, 500] {
        let got = tern::decode::topk_cuda::softmax_topk_cuda(&t, k).unwrap();
        for (r, g) in got.iter().enumerate() {
            let want = tern::decode::topk::softmax_topk(&host[r * v..(r + 1) * v], k);
            assert_eq!(g.ids, want.ids, "k {k} row {r}");
            assert!((g.lse - want.lse).abs() < 1e-3, "k {k} row {r}");
        }
    }
}

/// bf16 mixed precision tracks f32 on `device`: close loss, and every parameter's (f32)
/// gradient points the same way.
fn bf16_tracks_f32(device: &Device) {
    let (l32, g32) = loss_and_grads(device, DType::F32);
    let (l16, g16) = loss_and_grads(device, DType::BF16);
    bf16_close_to_f32((l16, g16), (l32, g32));
}

fn bf16_close_to_f32(
    (l16, g16): (f32, Vec<(String, Vec<f32>)>),
    (l32, g32): (f32, Vec<(String, Vec<f32>)>),
) {
    assert!(
        (l16 - l32).abs() < 0.02 * l32.abs(),
        "bf16 loss {l16} vs f32 {l32}"
    );
    for ((name, a), (_, b)) in g16.iter().zip(&g32) {
        assert!(a.iter().all(|x| x.is_finite()), "{name}: non-finite");
        assert!(
            a.iter().any(|x| *x != 0.0),
            "{name}: all-zero gradient in bf16"
        );
        let c = cosine(a, b);
        assert!(c > 0.95, "{name}: bf16 gradient's cosine to f32's is {c}");
    }
}

#[test]
fn bf16_mixed_precision_tracks_f32_on_the_cpu() {
    bf16_tracks_f32(&Device::Cpu);
}

on_each_gpu!(bf16_tracks_f32: cuda_bf16_mixed_precision_tracks_f32, metal_bf16_mixed_precision_tracks_f32);

/// `train.dtype = "bf16"` on a CPU with AVX512-BF16 or AMX-BF16 (whichever `TERN_ISA` and
/// detection pick): the ternary GEMMs in bf16 (forward and both
/// backward GEMMs), every parameter still gets a gradient, close to f32's.
#[test]
fn bf16_gemms_on_the_cpu_track_f32() {
    let c = match ComputeDtype::Bf16.for_device(&Device::Cpu) {
        Ok(c) => c,
        Err(e) => return eprintln!("SKIP: {e}"),
    };
    assert_eq!((c.dtype, c.gemm_bf16), (DType::F32, true));
    let (l32, g32) = loss_and_grads(&Device::Cpu, DType::F32);
    let bf16 = loss_and_grads_with(&Device::Cpu, DType::F32, true);
    assert_ne!(
        bf16.0, l32,
        "the bf16 GEMMs did not run (loss equal to f32's)"
    );
    bf16_close_to_f32(bf16, (l32, g32));
}

/// Without AVX512-BF16 or AMX-BF16 the CPU refuses bf16, naming the missing features; f32 is
/// always f32.
#[test]
fn training_in_bf16_on_the_cpu_needs_a_bf16_gemm_or_is_refused_with_the_reason() {
    match ComputeDtype::Bf16.for_device(&Device::Cpu) {
        Ok(c) => assert!(c.gemm_bf16 && tern::kernels::gemm_bf16::available()),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("AVX512-BF16") && e.contains("AMX-BF16") && e.contains("f32"),
                "{e}"
            );
        }
    }
    let f = ComputeDtype::F32.for_device(&Device::Cpu).unwrap();
    assert_eq!((f.dtype, f.gemm_bf16), (DType::F32, false));
}
