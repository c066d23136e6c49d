//! The training job end to end on a tiny model: loss goes down, resume is bit-exact, the NaN guard
//! skips and stops, partial checkpoints are ignored.

mod common;
use common::*;

use std::collections::BTreeSet;
use tern::train::config::TrainConfig;
use tern::train::{checkpoint, train, Control, TrainOptions};

fn config(dir: &std::path::Path, sets: &[&str]) -> TrainConfig {
    let path = dir.join("cfg.toml");
    std::fs::write(&path, tiny_train_config(dir)).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(&path, &sets).unwrap()
}

fn quiet() -> TrainOptions {
    TrainOptions {
        samples: false,
        ..Default::default()
    }
}

#[test]
fn smoke_run_learns_and_writes_its_outputs() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &[]);
    let out = train(
        &cfg,
        TrainOptions {
            samples: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(out.last_step, 30);
    let first = out.losses[0].1;
    let last5: f64 = out.losses[25..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last5 < 0.6 * first, "train loss {first} -> {last5}");
    let s = &out.summary;
    assert!(
        s["val_loss"].as_f64().unwrap() < 0.7 * s["val_loss_first"].as_f64().unwrap(),
        "{s}"
    );
    assert_eq!(s["ternary_check"]["ok"], true);
    assert_eq!(s["samples"].as_array().unwrap().len(), 3);
    // Bits per byte = val loss / (ln 2 x bytes per scored token); the word tokenizer's tokens
    // are words of a few bytes (the space is a token of its own).
    let bpt = s["val_bytes_per_token"].as_f64().unwrap();
    assert!(bpt > 1.0 && bpt < 12.0, "{s}");
    let bpb = s["val_loss"].as_f64().unwrap() / (std::f64::consts::LN_2 * bpt);
    assert!((s["val_bpb"].as_f64().unwrap() - bpb).abs() < 1e-9, "{s}");
    assert!((out.val_bpb - bpb).abs() < 1e-9);
    let run = d.path().join("run");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.iter().filter(|r| r.get("loss").is_some()).count(), 30);
    assert_eq!(
        recs.iter().filter(|r| r.get("val_ppl").is_some()).count(),
        4
    ); // 0, 10, 20, 30
    for k in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_sec",
        "elapsed_s",
    ] {
        assert!(recs[1].get(k).is_some(), "metrics record lacks '{k}'");
    }
    assert!(run.join("summary.json").is_file());
    // keep = 2: steps 20 and 30 remain; the final checkpoint loads as an HF-layout model.
    let kept: Vec<usize> = checkpoint::list(&run)
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(kept, vec![20, 30]);
    let ck = tern::model::load_checkpoint(
        &out.checkpoint,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(ck.quant.unwrap().group_size, 16);
    assert!(ck.tokenizer.is_some());
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses_bit_exactly() {
    let a = tempfile::tempdir().unwrap();
    let full = train(
        &config(
            a.path(),
            &[
                "train.steps=12",
                "checkpoint.every=4",
                "train.grad_accum_steps=2",
            ],
        ),
        quiet(),
    )
    .unwrap();

    let b = tempfile::tempdir().unwrap();
    let cfg_b = config(
        b.path(),
        &[
            "train.steps=12",
            "checkpoint.every=4",
            "train.grad_accum_steps=2",
        ],
    );
    let stop_at_7 = TrainOptions {
        on_step: Some(Box::new(|m| {
            if m.step == 7 {
                Control::Stop
            } else {
                Control::Continue
            }
        })),
        ..quiet()
    };
    let first = train(&cfg_b, stop_at_7).unwrap();
    assert!(first.interrupted && first.last_step == 7);
    let second = train(
        &cfg_b,
        TrainOptions {
            resume: Some(cfg_b.train.out_dir.clone()),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(second.losses.first().unwrap().0, 8);
    let resumed: Vec<(usize, u64)> = first
        .losses
        .iter()
        .chain(&second.losses)
        .map(|(s, l)| (*s, l.to_bits()))
        .collect();
    let straight: Vec<(usize, u64)> = full.losses.iter().map(|(s, l)| (*s, l.to_bits())).collect();
    assert_eq!(
        resumed, straight,
        "stop at 7 + resume must equal the uninterrupted run bit for bit"
    );
    assert_eq!(second.val_loss.to_bits(), full.val_loss.to_bits());
}

#[test]
fn nan_guard_skips_bad_steps_and_stops_after_five_in_a_row() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &["train.steps=8"]);
    let out = train(
        &cfg,
        TrainOptions {
            fault_nan_steps: BTreeSet::from([3]),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(out.last_step, 8);
    assert_eq!(out.summary["skipped_steps"], 1);
    assert!(out.losses[2].1.is_nan() && out.losses[3].1.is_finite());

    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &["train.steps=20", "checkpoint.every=0"]);
    let err = train(
        &cfg,
        TrainOptions {
            fault_nan_steps: (4..=8).collect(),
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("5 steps in a row")
            && err.contains("step 8")
            && err.contains("checkpoint saved"),
        "{err}"
    );
    let saved: Vec<usize> = checkpoint::list(&cfg.train.out_dir)
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(saved, vec![8]);
}

#[test]
fn resume_ignores_partial_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &["train.steps=10", "checkpoint.every=5"]);
    train(&cfg, quiet()).unwrap();
    let root = checkpoint::checkpoints_dir(&cfg.train.out_dir);
    // A save killed mid-write leaves a temp dir; a dir without state.json is not a checkpoint.
    std::fs::create_dir_all(root.join(".tmp-step-00000015")).unwrap();
    std::fs::write(
        root.join(".tmp-step-00000015/model.safetensors"),
        b"partial",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("step-00000014")).unwrap();
    std::fs::write(root.join("step-00000014/model.safetensors"), b"partial").unwrap();
    let latest = checkpoint::latest(&cfg.train.out_dir).unwrap().unwrap();
    assert!(latest.ends_with("step-00000010"), "{}", latest.display());
    assert!(
        !root.join(".tmp-step-00000015").exists(),
        "temp dir is cleaned up"
    );
    let cfg12 = config(d.path(), &["train.steps=12", "checkpoint.every=5"]);
    let out = train(
        &cfg12,
        TrainOptions {
            resume: Some(cfg12.train.out_dir.clone()),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(out.losses.first().unwrap().0, 11);
    assert_eq!(out.last_step, 12);
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    // Windows are drawn in order, so 2 micro-batches of 2 are the same 4 windows as one batch of 4.
    let a = tempfile::tempdir().unwrap();
    let big = train(
        &config(
            a.path(),
            &[
                "train.steps=5",
                "train.batch_size=4",
                "train.grad_accum_steps=1",
            ],
        ),
        quiet(),
    )
    .unwrap();
    let b = tempfile::tempdir().unwrap();
    let acc = train(
        &config(
            b.path(),
            &[
                "train.steps=5",
                "train.batch_size=2",
                "train.grad_accum_steps=2",
            ],
        ),
        quiet(),
    )
    .unwrap();
    for ((s, x), (_, y)) in big.losses.iter().zip(&acc.losses) {
        assert!(
            (x - y).abs() < 1e-4 * x.abs(),
            "step {s}: batch 4 loss {x} vs 2x2 accumulated {y}"
        );
    }
}
