//! eval and generate on real checkpoints: batched generation equals one prompt at a time,
//! seeds repeat, perplexity scoring equals the plain computation, and `tern eval --split val`
//! reproduces exactly the validation loss `tern train` reported.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use tern::decode::generate::{generate_batch, GenerateConfig};
use tern::decode::sampler::SamplerConfig;
use tern::model::{load_checkpoint, KvCache, Model};
use tern::quant::QuantConfig;

fn fixture_model(name: &str) -> Model {
    let ck = load_checkpoint(&fixtures_dir().join(name), DType::F32, &Device::Cpu).unwrap();
    Model::new(&ck.config, QuantConfig::default(), &ck.params)
        .unwrap()
        .freeze()
        .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 42],
        vec![100, 3, 9, 250, 7, 81, 12],
        vec![64, 64, 1, 200, 33],
    ]
}

#[test]
fn padded_batch_logits_equal_each_row_alone() {
    for name in FIXTURES {
        let m = fixture_model(name);
        let ps = prompts();
        let longest = 7;
        let pad: Vec<usize> = ps.iter().map(|p| longest - p.len()).collect();
        let flat: Vec<u32> = ps
            .iter()
            .zip(&pad)
            .flat_map(|(p, &n)| std::iter::repeat_n(0, n).chain(p.clone()))
            .collect();
        let mut cache = KvCache::with_padding(m.cfg.num_hidden_layers, pad.clone());
        let h = m
            .forward(
                &Tensor::from_vec(flat, (3, longest), &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        let batch = m.logits(&h).unwrap();
        for (r, p) in ps.iter().enumerate() {
            let alone = m
                .full_logits(
                    &Tensor::new(p.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                )
                .unwrap();
            let rows = batch
                .narrow(0, r, 1)
                .unwrap()
                .narrow(1, pad[r], p.len())
                .unwrap();
            assert!(max_abs_diff(&rows, &alone) < 1e-4, "{name} row {r}");
        }
    }
}

#[test]
fn batch_generation_equals_each_prompt_alone_greedy_and_seeded() {
    let m = fixture_model("untied_gqa3_bf16");
    for sampler in [
        SamplerConfig {
            temp: 0.0,
            ..Default::default()
        },
        SamplerConfig {
            temp: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        },
    ] {
        let cfg = GenerateConfig {
            max_new: 12,
            sampler,
            eos: vec![],
        };
        let together = generate_batch(&m, &prompts(), &cfg, |_, _| false).unwrap();
        for (r, p) in prompts().iter().enumerate() {
            let alone_cfg = GenerateConfig {
                sampler: SamplerConfig {
                    seed: sampler.seed + r as u64,
                    ..sampler
                },
                ..cfg.clone()
            };
            let alone =
                generate_batch(&m, std::slice::from_ref(p), &alone_cfg, |_, _| false).unwrap();
            assert_eq!(together[r].0, alone[0].0, "row {r} with {sampler:?}");
            assert_eq!(together[r].0.len(), 12);
        }
        let again = generate_batch(&m, &prompts(), &cfg, |_, _| false).unwrap();
        assert_eq!(together, again, "same seed, same output");
    }
    let hot = |seed| {
        let cfg = GenerateConfig {
            max_new: 12,
            sampler: SamplerConfig {
                temp: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..Default::default()
            },
            eos: vec![],
        };
        generate_batch(&m, &prompts(), &cfg, |_, _| false).unwrap()
    };
    assert_ne!(hot(1), hot(2), "different seeds differ");
}

#[test]
fn eos_and_stop_callbacks_end_rows() {
    let m = fixture_model("tied_gqa2");
    let cfg = GenerateConfig {
        max_new: 10,
        sampler: SamplerConfig {
            temp: 0.0,
            ..Default::default()
        },
        eos: vec![],
    };
    let free = generate_batch(&m, &prompts()[..1], &cfg, |_, _| false).unwrap();
    let first = free[0].0[0];
    let cfg_eos = GenerateConfig {
        eos: vec![first],
        ..cfg.clone()
    };
    let out = generate_batch(&m, &prompts()[..1], &cfg_eos, |_, _| false).unwrap();
    assert_eq!(out[0].0, vec![first]);
    assert_eq!(out[0].1, tern::decode::generate::Finish::Eos);
    let cfg = GenerateConfig {
        max_new: 10,
        sampler: SamplerConfig {
            temp: 0.0,
            ..Default::default()
        },
        eos: vec![],
    };
    let mut n = 0;
    let out = generate_batch(&m, &prompts()[..1], &cfg, |_, _| {
        n += 1;
        n == 3
    })
    .unwrap();
    assert_eq!(out[0].0.len(), 3);
}

#[test]
fn perplexity_scoring_equals_the_plain_cross_entropy() {
    let m = fixture_model("tied_gqa2");
    let exp = expected("tied_gqa2");
    let ids: Vec<u32> = input_ids(&exp).flatten_all().unwrap().to_vec1().unwrap();
    // Plain windows of 16 = the two rows of the fixture batch.
    let w = tern::eval::plan(ids.len(), 16, None, tern::eval::Scheme::Plain).unwrap();
    assert_eq!(w.len(), 2);
    let nll = tern::eval::score(&m, &ids, &w, 4).unwrap();
    assert_eq!(nll.len(), 30);
    let logits = m
        .full_logits(&input_ids(&exp).narrow(1, 0, 15).unwrap())
        .unwrap();
    let tgt = input_ids(&exp)
        .narrow(1, 1, 15)
        .unwrap()
        .flatten_all()
        .unwrap();
    let reference = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &tgt)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let ours = tern::eval::perplexity(&nll).nll;
    assert!(
        (ours - reference as f64).abs() < 1e-5,
        "{ours} vs {reference}"
    );
}

#[test]
fn cli_eval_split_val_reproduces_the_training_validation_loss() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("cfg.toml");
    std::fs::write(&cfg, tiny_train_config(d.path())).unwrap();
    let sets: Vec<String> = ["train.steps=6", "eval.batches=0", "eval.every=0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tc = tern::train::config::TrainConfig::load(&cfg, &sets).unwrap();
    let out = tern::train::train(
        &tc,
        tern::train::TrainOptions {
            samples: false,
            ..Default::default()
        },
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tern");
    let o = std::process::Command::new(bin)
        .args([
            "eval",
            "--model",
            out.checkpoint.to_str().unwrap(),
            "--data",
        ])
        .arg(d.path().join("train.txt"))
        .args(["--split", "val", "--ctx", "17", "--json", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nll = v["nll"].as_f64().unwrap();
    assert!(
        (nll - out.val_loss).abs() < 1e-9,
        "eval {nll} vs train {}",
        out.val_loss
    );
    for k in ["ppl", "ppl_stderr", "tokens", "tokens_per_sec"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    // Text output and generate through the CLI.
    let o = std::process::Command::new(bin)
        .args([
            "eval",
            "--model",
            out.checkpoint.to_str().unwrap(),
            "--data",
        ])
        .arg(d.path().join("train.txt"))
        .args(["--scheme", "llama", "--ctx", "16"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PPL = "),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = std::process::Command::new(bin)
        .args([
            "generate",
            "--model",
            out.checkpoint.to_str().unwrap(),
            "-p",
            "the compiler",
            "-p",
            "a stack holds",
            "-n",
            "5",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("=== prompt 2"),
        "{text} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = std::process::Command::new(bin)
        .args([
            "generate",
            "--model",
            out.checkpoint.to_str().unwrap(),
            "-p",
            "x",
            "--top-p",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--top-p"));
}
