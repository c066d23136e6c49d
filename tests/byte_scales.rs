//! Packed weights with byte scales (`tern --scales byte`, `TERN_SCALES=byte`): every matrix of
//! an exported model takes them, the model stays within the accuracy bound of its checkpoint,
//! and batched decoding keeps its guarantee. This file's tests all set the same variable before
//! anything loads, since the loader reads it once per process.

mod common;
use common::*;

use candle_core::{DType, Device};
use std::sync::Arc;
use tern::gguf::{export_gguf, file::GgufFile, Format};
use tern::model::{load_checkpoint, Model};
use tern::quant::QuantConfig;

/// The `tied_gqa2` fixture, dense (frozen) and exported to Q2_0 then loaded packed.
fn dense_and_packed() -> (Model, Model) {
    std::env::set_var("TERN_SCALES", "byte");
    let ck = load_checkpoint(&fixtures_dir().join("tied_gqa2"), DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let q = QuantConfig::default();
    export_gguf(&ck.config, &q, &ck.params, None, Format::Q2_0, "t", &out).unwrap();
    let packed = tern::gguf::load_model(&GgufFile::read(&out).unwrap()).unwrap();
    let dense = Model::new(&ck.config, q, &ck.params)
        .unwrap()
        .freeze()
        .unwrap();
    (dense, packed)
}

#[test]
fn byte_scales_stay_within_the_accuracy_bound_of_the_checkpoint() {
    let (dense, packed) = dense_and_packed();
    let formats: Vec<String> = packed
        .packed_matrices()
        .iter()
        .map(|m| m.scale_format())
        .collect();
    assert!(
        !formats.is_empty() && formats.iter().all(|f| f.starts_with("byte/")),
        "{formats:?}"
    );
    let tokens: Vec<u32> = (0..320u32).map(|i| (i * 7919 + 13) % 384).collect();
    let windows = tern::eval::plan(tokens.len(), 64, None, tern::eval::Scheme::Llama).unwrap();
    let kl = tern::eval::kl_divergence(&packed, &dense, &tokens, &windows).unwrap();
    // The issue-22 bound (mean KL <= 1e-3 nats against the checkpoint) holds with byte scales.
    assert!(
        kl.mean_kl <= 1e-3,
        "mean KL {} (max {})",
        kl.mean_kl,
        kl.max_kl
    );
}

#[test]
fn batched_greedy_generation_equals_each_prompt_alone_with_byte_scales() {
    let (_, packed) = dense_and_packed();
    assert_batched_greedy_equals_alone(Arc::new(packed));
}
