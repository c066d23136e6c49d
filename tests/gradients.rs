//! Gradients are proven, not assumed: every parameter receives a finite, non-zero gradient, and
//! the STE gradient of each latent equals the finite-difference gradient of the loss with respect
//! to the projected weight (f64, central differences).

mod common;
use common::{max_abs, small_config};

use candle_core::{DType, Device, Tensor, Var};
use tern::model::params::{is_norm, Params};
use tern::model::{Model, ModelConfig};
use tern::quant::{project, ActQuant, QuantConfig, ScaleRule};

fn tiny(tied: bool) -> ModelConfig {
    let mut c = small_config(48, 80, 12, 61);
    c.tie_word_embeddings = tied;
    c
}

/// Small groups so rows hold several groups and a partial one (48 = 2*20 + 8; 80 = 4*20).
fn quant() -> QuantConfig {
    QuantConfig {
        group_size: 20,
        ..QuantConfig::default()
    }
}

fn batch(device: &Device, vocab: u32) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % vocab).collect();
    let ids = Tensor::from_vec(ids, (2, 9), device).unwrap();
    (ids.narrow(1, 0, 8).unwrap(), ids.narrow(1, 1, 8).unwrap())
}

fn loss(model: &Model, inp: &Tensor, tgt: &Tensor) -> Tensor {
    let logits = model.full_logits(inp).unwrap();
    candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &tgt.flatten_all().unwrap())
        .unwrap()
}

/// Llama (no q/k norms) as well: every parameter of that family gets its gradient too.
#[test]
fn every_llama_parameter_gets_a_finite_nonzero_gradient() {
    for tied in [true, false] {
        let mut cfg = tiny(tied);
        cfg.arch = tern::model::Arch::Llama;
        let params = Params::scratch(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            params.len(),
            1 + cfg.num_hidden_layers * 9 + 1 + usize::from(!tied)
        );
        let model = Model::new(&cfg, quant(), &params).unwrap();
        let (inp, tgt) = batch(&Device::Cpu, cfg.vocab_size as u32);
        let grads = loss(&model, &inp, &tgt).backward().unwrap();
        for (name, var) in params.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}"));
            let max = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let max = max.to_scalar::<f32>().unwrap();
            assert!(max > 0.0 && max.is_finite(), "{name}: {max}");
        }
    }
}

/// A distillation teacher: full precision, frozen, its own random weights (seed 2).
fn frozen_teacher(cfg: &ModelConfig) -> (Params, Model) {
    let params = Params::scratch(cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let model = Model::new(cfg, QuantConfig::full_precision(), &params)
        .unwrap()
        .freeze()
        .unwrap();
    (params, model)
}

/// Distillation: the fused chunked loss gives every student parameter the gradient the plain
/// full-logits reference gives it, and the frozen teacher none.
#[test]
fn distillation_reaches_every_student_parameter_as_the_reference_does() {
    use tern::kernels::Kernels;
    use tern::train::step::{distill_batch_loss, Distill};
    for tied in [true, false] {
        let cfg = tiny(tied);
        let params = Params::scratch(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let (teacher_params, teacher) = frozen_teacher(&cfg);
        let (inp, tgt) = batch(&Device::Cpu, cfg.vocab_size as u32);
        let d = Distill {
            teacher: &teacher,
            alpha: 0.6,
            temperature: 2.0,
            hidden: 0.0,
        };
        let grads = |k: Kernels| {
            let m = Model::new(&cfg, quant(), &params).unwrap().with_kernels(k);
            let (loss, _) = distill_batch_loss(&m, &d, &inp, &tgt).unwrap();
            (loss.to_scalar::<f32>().unwrap(), loss.backward().unwrap())
        };
        let (lf, gf) = grads(Kernels::Fused);
        let (lr, gr) = grads(Kernels::Reference);
        assert!((lf - lr).abs() < 1e-4 * lr.abs().max(1.0), "{lf} vs {lr}");
        for (name, var) in params.iter() {
            let a = gf
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: none"));
            let b = gr.get(var.as_tensor()).unwrap();
            let (scale, diff) = (max_abs(b), max_abs(&(a - b).unwrap()));
            assert!(
                scale > 0.0 && diff <= 1e-3 * scale,
                "{name}: {diff} of {scale}"
            );
        }
        for (name, var) in teacher_params.iter() {
            assert!(
                gf.get(var.as_tensor()).is_none(),
                "teacher {name} got a gradient"
            );
        }
    }
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for tied in [true, false] {
        for q in [
            quant(),
            QuantConfig::full_precision(),
            QuantConfig {
                scale: ScaleRule::MaxAbs,
                ..quant()
            },
            QuantConfig {
                embeddings: false,
                ..quant()
            },
            // Inputs rounded to int8 per token (straight through) in every layer and the head.
            QuantConfig {
                act_quant: ActQuant::PerToken,
                ..quant()
            },
        ] {
            let cfg = tiny(tied);
            let params = Params::scratch(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
            let model = Model::new(&cfg, q, &params).unwrap();
            let (inp, tgt) = batch(&Device::Cpu, cfg.vocab_size as u32);
            let grads = loss(&model, &inp, &tgt).backward().unwrap();
            let expected = 1 + cfg.num_hidden_layers * 11 + 1 + usize::from(!tied);
            assert_eq!(params.len(), expected);
            for (name, var) in params.iter() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient (tied={tied}, {q:?})"));
                let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{name}: non-finite gradient"
                );
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(max > 0.0, "{name}: all-zero gradient (tied={tied}, {q:?})");
            }
        }
    }
}

/// The same latents, projected up front: a full-precision model over the projected weights.
fn projected_params(params: &Params, q: &QuantConfig) -> Params {
    Params::from_tensors(params.iter().map(|(n, v)| {
        let t = v.as_tensor().detach();
        let t = if is_norm(n) {
            t
        } else {
            project(&t, q.group_size, q.scale).unwrap()
        };
        (n.clone(), t)
    }))
    .unwrap()
}

fn loss_value(model: &Model, inp: &Tensor, tgt: &Tensor) -> f64 {
    loss(model, inp, tgt).to_scalar::<f64>().unwrap()
}

#[test]
fn ste_gradient_of_each_latent_equals_finite_differences_wrt_the_projected_weight() {
    for tied in [true, false] {
        let cfg = tiny(tied);
        let q = quant();
        let latent = Params::scratch(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let ternary = Model::new(&cfg, q, &latent).unwrap();
        let (inp, tgt) = batch(&Device::Cpu, cfg.vocab_size as u32);
        let g_ste = loss(&ternary, &inp, &tgt).backward().unwrap();

        let proj = projected_params(&latent, &q);
        let full = Model::new(&cfg, QuantConfig::full_precision(), &proj).unwrap();
        // Both models compute the same function value.
        let (l_t, l_f) = (
            loss_value(&ternary, &inp, &tgt),
            loss_value(&full, &inp, &tgt),
        );
        assert!((l_t - l_f).abs() < 1e-12, "{l_t} vs {l_f}");

        let eps = 1e-6;
        let mut checked = 0;
        for (name, var) in proj.iter() {
            let g = g_ste.get(latent.var(name).unwrap().as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            // A few entries per tensor, spread over it (and rows with partial groups).
            let n = base.len();
            for &k in &[0, n / 3, n / 2 + 1, n - 1] {
                let fd = central_difference(var, &base, k, eps, &full, &inp, &tgt);
                let tol = 1e-5 + 1e-3 * fd.abs();
                assert!(
                    (g[k] - fd).abs() <= tol,
                    "{name}[{k}] (tied={tied}): STE grad {} vs finite difference {fd}",
                    g[k]
                );
                checked += 1;
            }
        }
        assert!(checked >= 4 * proj.len());
    }
}

fn central_difference(
    var: &Var,
    base: &[f64],
    k: usize,
    eps: f64,
    m: &Model,
    inp: &Tensor,
    tgt: &Tensor,
) -> f64 {
    let shape = var.as_tensor().dims().to_vec();
    let set = |delta: f64| {
        let mut v = base.to_vec();
        v[k] += delta;
        var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        loss_value(m, inp, tgt)
    };
    let (plus, minus) = (set(eps), set(-eps));
    set(0.0);
    (plus - minus) / (2.0 * eps)
}

/// The training loss with fused kernels (norms, RoPE, flash attention, ternary linear, embedding
/// row projection, chunked LM-head loss) and with the plain references gives the same value and
/// the same gradient for every parameter of the whole model.
#[test]
fn fused_kernels_and_plain_references_give_the_same_gradients() {
    use tern::kernels::Kernels;
    let per_token = QuantConfig {
        act_quant: ActQuant::PerToken,
        ..quant()
    };
    for (tied, q) in [(true, quant()), (false, quant()), (true, per_token)] {
        let cfg = tiny(tied);
        let params = Params::scratch(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let (inp, tgt) = batch(&Device::Cpu, cfg.vocab_size as u32);
        let run = |kernels: Kernels| {
            let model = Model::new(&cfg, q, &params).unwrap().with_kernels(kernels);
            let l = tern::train::step::batch_loss(&model, &inp, &tgt).unwrap();
            let grads = l.backward().unwrap();
            let per_param: Vec<Vec<f32>> = params
                .iter()
                .map(|(_, v)| {
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (l.to_scalar::<f32>().unwrap(), per_param)
        };
        let (lf, gf) = run(Kernels::Fused);
        let (lr, gr) = run(Kernels::Reference);
        assert!((lf - lr).abs() < 1e-5, "loss {lf} vs {lr}");
        for ((name, _), (a, b)) in params.iter().zip(gf.iter().zip(&gr)) {
            let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let err = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
                / scale;
            assert!(
                err < 1e-4,
                "{name}: fused vs reference gradient rel err {err}"
            );
        }
    }
}

/// Hidden-state distillation: zero when the student is the teacher; on, it adds exactly its
/// term to the loss and changes the gradient of every layer's parameters; the fused loss and the
/// reference agree on every parameter's gradient; the frozen teacher gets none.
#[test]
fn hidden_distillation_is_zero_on_the_teacher_and_reaches_every_layer() {
    use tern::kernels::Kernels;
    use tern::model::NoCache;
    use tern::train::step::{distill_batch_loss, hidden_distill_loss, Distill};
    let cfg = tiny(true);
    let (teacher_params, teacher) = frozen_teacher(&cfg);
    let (inp, tgt) = batch(&Device::Cpu, cfg.vocab_size as u32);
    let taps = |m: &Model| {
        let mut v = Vec::new();
        m.forward_tapped(&inp, &mut NoCache::new(), Some(&mut v))
            .unwrap();
        v
    };
    let t = taps(&teacher);
    assert_eq!(t.len(), cfg.num_hidden_layers);
    let same = hidden_distill_loss(&taps(&teacher), &t).unwrap();
    assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);

    let params = Params::scratch(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let d = Distill {
        teacher: &teacher,
        alpha: 1.0,
        temperature: 1.0,
        hidden: 1.0,
    };
    let off = Distill { hidden: 0.0, ..d };
    let run = |k: Kernels, d: &Distill| {
        let m = Model::new(&cfg, quant(), &params).unwrap().with_kernels(k);
        let (loss, parts) = distill_batch_loss(&m, d, &inp, &tgt).unwrap();
        (
            loss.to_scalar::<f32>().unwrap(),
            parts,
            loss.backward().unwrap(),
        )
    };
    let (l_on, parts, g_on) = run(Kernels::Fused, &d);
    let (l_off, _, g_off) = run(Kernels::Fused, &off);
    let hidden = parts.unwrap().hidden;
    assert!(hidden > 0.0, "{hidden}");
    assert!(
        ((l_on - l_off) as f64 - hidden).abs() < 1e-4 * hidden.max(1.0),
        "loss {l_on} = {l_off} + {hidden}"
    );
    let (l_ref, _, g_ref) = run(Kernels::Reference, &d);
    assert!(
        (l_on - l_ref).abs() < 1e-4 * l_ref.abs().max(1.0),
        "{l_on} vs {l_ref}"
    );
    for (name, var) in params.iter() {
        let (on, off) = (g_on.get(var.as_tensor()), g_off.get(var.as_tensor()));
        let (on, r) = (
            on.unwrap_or_else(|| panic!("{name}: none")),
            g_ref.get(var.as_tensor()).unwrap(),
        );
        let (scale, diff) = (max_abs(r), max_abs(&(on - r).unwrap()));
        assert!(
            scale > 0.0 && diff <= 1e-3 * scale,
            "{name}: {diff} of {scale}"
        );
        // The hidden term changes every layer's gradient (not the final norm's: it sits after
        // the taps).
        if name.starts_with("model.layers.") {
            let delta = max_abs(&(on - off.unwrap()).unwrap());
            assert!(
                delta > 1e-6 * scale,
                "{name}: the hidden term did not reach it"
            );
        }
    }
    for (name, var) in teacher_params.iter() {
        assert!(
            g_on.get(var.as_tensor()).is_none(),
            "teacher {name} got a gradient"
        );
    }
}
