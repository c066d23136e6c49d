//! Per-token activation quantization (`act_quant = "per_token"`): a model trained with it
//! records it in its GGUF, the packed kernels then quantize each token's input with one step
//! as the dense forward does, and batched decoding keeps its guarantee.

mod common;
use common::*;

use candle_core::{DType, Device};
use std::sync::Arc;
use tern::gguf::{export_gguf, file::GgufFile, Format};
use tern::model::{load_checkpoint, Model};
use tern::quant::{ActQuant, QuantConfig};

/// The `tied_gqa2` fixture exported as a per-token model to Q2_0 in `dir`.
fn export_per_token(dir: &std::path::Path) -> std::path::PathBuf {
    let ck = load_checkpoint(&fixtures_dir().join("tied_gqa2"), DType::F32, &Device::Cpu).unwrap();
    let out = dir.join("m.gguf");
    let q = QuantConfig {
        act_quant: ActQuant::PerToken,
        ..QuantConfig::default()
    };
    export_gguf(&ck.config, &q, &ck.params, None, Format::Q2_0, "t", &out).unwrap();
    out
}

/// The `tied_gqa2` fixture exported as a per-token model to Q2_0, loaded packed, and the same
/// file's weights dequantized into a dense model whose layers see their inputs as `act` says.
/// Both then hold the same ternary weights (the file's f16 scales), so what differs is only
/// how the inputs are quantized.
fn packed_and_dense(act: ActQuant) -> (Model, Model) {
    let dir = tempfile::tempdir().unwrap();
    let out = export_per_token(dir.path());
    let file = GgufFile::read(&out).unwrap();
    let packed = tern::gguf::load_model(&file).unwrap();
    let (cfg, weights) = tern::gguf::latents_from_gguf(&file).unwrap();
    // Already ternary: run the weights as they are (a second projection would change them).
    let dense_q = QuantConfig {
        act_quant: act,
        ..QuantConfig::full_precision()
    };
    let dense = Model::new(&cfg, dense_q, &weights)
        .unwrap()
        .freeze()
        .unwrap();
    (packed, dense)
}

fn mean_kl(a: &Model, b: &Model) -> f64 {
    let tokens: Vec<u32> = (0..320u32).map(|i| (i * 7919 + 13) % 384).collect();
    let windows = tern::eval::plan(tokens.len(), 64, None, tern::eval::Scheme::Llama).unwrap();
    tern::eval::kl_divergence(a, b, &tokens, &windows)
        .unwrap()
        .mean_kl
}

#[test]
fn the_packed_kernels_quantize_per_token_as_the_dense_forward_does() {
    let (packed, dense) = packed_and_dense(ActQuant::PerToken);
    let acts: Vec<ActQuant> = packed
        .packed_matrices()
        .iter()
        .map(|m| m.act_quant)
        .collect();
    assert!(
        !acts.is_empty() && acts.iter().all(|&a| a == ActQuant::PerToken),
        "the GGUF's tern.act_quant reaches every packed matrix: {acts:?}"
    );
    let same = mean_kl(&packed, &dense);
    let (_, f32_inputs) = packed_and_dense(ActQuant::None);
    let other = mean_kl(&packed, &f32_inputs);
    // Same weights, same steps, same rounding: what is left is float summation order and the
    // values it puts on the other side of a rounding edge (one whole step each; measured 2.8e-6
    // against 1.2e-4 for the other scheme).
    assert!(
        same <= 1e-5 && same * 20.0 <= other,
        "mean KL {same} against the per-token dense forward, {other} against f32 inputs"
    );
}

#[test]
fn batched_greedy_generation_equals_each_prompt_alone_per_token() {
    let (packed, _) = packed_and_dense(ActQuant::PerToken);
    assert_batched_greedy_equals_alone(Arc::new(packed));
}

/// A GGUF whose `tern.act_quant` names no scheme is refused, naming the key, by the packed
/// loader and by the latent loader a fine-tune starts from: neither guesses a scheme.
#[test]
fn an_unknown_scheme_in_the_gguf_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_per_token(dir.path());
    let bytes = std::fs::read(&out).unwrap();
    let bad = with_value_replaced(&bytes, b"tern.act_quant", b"per_token", b"per_tokex");
    std::fs::write(&out, bad).unwrap();
    let file = GgufFile::read(&out).unwrap();
    let Err(e) = tern::gguf::load_model(&file) else {
        panic!("the packed loader took an unknown scheme");
    };
    let e = e.to_string();
    assert!(
        e.contains("tern.act_quant") && e.contains("per_tokex"),
        "{e}"
    );
    let spec = out.display().to_string();
    let Err(e) = tern::source::load_latents(&spec, DType::F32, &Device::Cpu) else {
        panic!("the latent loader took an unknown scheme");
    };
    let e = e.to_string();
    assert!(
        e.contains("tern.act_quant") && e.contains("per_tokex"),
        "{e}"
    );
}
