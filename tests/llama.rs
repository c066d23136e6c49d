//! The Llama family against outside truth: transformers' logits for an HF-layout Llama (untied,
//! GQA, explicit head_dim, Llama-3 rope scaling) and for GGUF files laid out by llama.cpp's
//! converter in every legacy quant type and in K-quants (scripts/make_llama_fixtures.py); export
//! of the family (llama.cpp's interleaved q/k rows, llama.* metadata) and reading it back; clear
//! refusals of what tern does not run.

mod common;
use common::*;

use candle_core::{DType, Device};
use tern::gguf::file::{GgufWriter, Value, GGML_F32};
use tern::gguf::{export_gguf, latents_from_gguf, load_model, verify_gguf, Format, GgufFile};
use tern::model::{load_checkpoint, Arch, Model};
use tern::quant::QuantConfig;

const TOL: f32 = 1e-4;

fn hf_llama() -> tern::model::Checkpoint {
    load_checkpoint(
        &llama_fixtures_dir().join("untied_rope3"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// A checkpoint written as a full-precision F32 GGUF (what these tests read back as a source).
fn export_f32(ck: &tern::model::Checkpoint, path: &std::path::Path) {
    let fp = QuantConfig::full_precision();
    export_gguf(&ck.config, &fp, &ck.params, None, Format::F32, "t", path).unwrap();
}

#[test]
fn hf_llama_logits_match_transformers_full_and_ternary() {
    let ck = hf_llama();
    assert_eq!(ck.config.arch, Arch::Llama);
    assert!(
        ck.config.rope_scaling.is_some(),
        "llama3 rope_parameters read"
    );
    assert_eq!(ck.config.head_dim(), 32);
    let exp = llama_expected("untied_rope3");
    let ids = input_ids(&exp);
    for (quant, key) in [
        (QuantConfig::full_precision(), "logits_full"),
        (QuantConfig::default(), "logits_ternary_mean_abs"),
    ] {
        let m = Model::new(&ck.config, quant, &ck.params).unwrap();
        let d = max_abs_diff(&m.full_logits(&ids).unwrap(), &exp[key]);
        assert!(d < TOL, "{key}: max |diff| = {d}");
    }
    // The rope scaling is part of the function: without it the logits move.
    let mut plain = ck.config.clone();
    plain.rope_scaling = None;
    let m = Model::new(&plain, QuantConfig::full_precision(), &ck.params).unwrap();
    let d = max_abs_diff(&m.full_logits(&ids).unwrap(), &exp["logits_full"]);
    assert!(d > 1e-3, "rope scaling changed nothing ({d})");
}

#[test]
fn quantized_gguf_files_dequantize_to_what_transformers_computes() {
    for name in ["tied_quant", "tied_q4k"] {
        let path = llama_fixtures_dir().join(format!("{name}.gguf"));
        let src = tern::source::load_latents(&path.display().to_string(), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(src.config.arch, Arch::Llama);
        assert!(src.config.tie_word_embeddings);
        assert!(src.quant.is_none(), "not a tern file");
        let exp = llama_expected(name);
        let ids = input_ids(&exp);
        for (quant, key) in [
            (QuantConfig::full_precision(), "logits_full"),
            (QuantConfig::default(), "logits_ternary_mean_abs"),
        ] {
            let m = Model::new(&src.config, quant, &src.params).unwrap();
            let d = max_abs_diff(&m.full_logits(&ids).unwrap(), &exp[key]);
            assert!(d < TOL, "{name} {key}: max |diff| = {d}");
        }
        // Inference through the one loader: --precision full runs the weights as they are.
        let loaded = tern::runtime::load_for_inference(
            &path.display().to_string(),
            tern::runtime::Precision::Full,
            &Device::Cpu,
        )
        .unwrap();
        let d = max_abs_diff(
            &loaded.model.full_logits(&ids).unwrap(),
            &exp["logits_full"],
        );
        assert!(d < TOL, "{name} via runtime: {d}");
        let tok = loaded.tokenizer.expect("the GGUF's own tokenizer");
        assert_eq!(tok.token_id("<|im_end|>"), Some(2));
        assert_eq!(tok.meta.pre.as_deref(), Some("smollm"));
        let text = "Install tern: cargo build --release 123\n\n  done";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}

/// The Llama fixture exported to GGUF: llama.* metadata, q/k rows in llama.cpp's interleaved
/// order, Llama-3 scaling as rope_freqs; read back (dense and packed) it is the same model.
#[test]
fn llama_export_round_trips_through_llama_cpp_layout() {
    let ck = hf_llama();
    let d = tempfile::tempdir().unwrap();
    let f32_path = d.path().join("m-f32.gguf");
    export_f32(&ck, &f32_path);
    let file = GgufFile::read(&f32_path).unwrap();
    assert_eq!(
        file.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    assert_eq!(
        file.get("llama.rope.dimension_count").unwrap().as_u64(),
        Some(32)
    );
    assert!(file.tensor("rope_freqs.weight").is_some());
    assert!(file.tensor("blk.0.attn_q_norm.weight").is_none());
    // Row 1 of the file's attn_q is HF row hd/2 (the first pair of the second half).
    let q_file =
        tern::gguf::load::tensor_f32(&file, file.tensor("blk.0.attn_q.weight").unwrap()).unwrap();
    let q_hf = ck
        .params
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(&q_file[128..256], q_hf[16].as_slice());
    // Back: the same tensors, the same config.
    let (cfg, params) = latents_from_gguf(&file).unwrap();
    assert_eq!(cfg.rope_scaling, ck.config.rope_scaling);
    assert_eq!(cfg.head_dim(), ck.config.head_dim());
    for (name, v) in ck.params.iter() {
        let back = params.tensor(name).unwrap();
        assert_eq!(max_abs_diff(v.as_tensor(), &back), 0.0, "{name}");
    }

    // Q2_0: packed inference equals the dense ternary model within int8-activation rounding,
    // and verify compares the file's rows with the source projection in the file's order.
    let q_path = d.path().join("m-q2.gguf");
    let q = QuantConfig::default();
    export_gguf(&ck.config, &q, &ck.params, None, Format::Q2_0, "t", &q_path).unwrap();
    let qfile = GgufFile::read(&q_path).unwrap();
    let checks = verify_gguf(&qfile, Some((&ck.params, &q))).unwrap();
    assert!(checks.iter().all(|c| c.problems.is_empty()), "{checks:?}");
    let packed = load_model(&qfile).unwrap();
    assert!(packed.is_packed());
    let dense = Model::new(&ck.config, q, &ck.params)
        .unwrap()
        .freeze()
        .unwrap();
    let exp = llama_expected("untied_rope3");
    let ids = input_ids(&exp);
    let (a, b) = (
        packed.full_logits(&ids).unwrap(),
        dense.full_logits(&ids).unwrap(),
    );
    let rel = max_abs_diff(&a, &b) / max_abs(&b);
    assert!(rel < 0.03, "packed vs dense: {rel}");
}

/// A GGUF with one metadata key or tensor type changed.
fn gguf_with(meta: &[(&str, Value)], tensor_type: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::default();
    if !meta.iter().any(|(k, _)| *k == "general.architecture") {
        w.meta("general.architecture", Value::Str("llama".into()));
    }
    for (k, v) in meta {
        w.meta(k, v.clone());
    }
    w.tensor(
        "token_embd.weight",
        vec![32, 4],
        tensor_type,
        vec![0u8; 4 * 32 * 4],
    );
    let p = d.path().join("bad.gguf");
    w.write(&p).unwrap();
    (d, p)
}

#[test]
fn other_architectures_tensor_types_and_pre_tokenizers_are_refused_by_name() {
    let (_d, p) = gguf_with(
        &[("general.architecture", Value::Str("gemma3".into()))],
        GGML_F32,
    );
    let e = GgufFile::read(&p)
        .and_then(|f| latents_from_gguf(&f).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemma3") && e.contains("llama"), "{e}");

    // ggml type 16 (IQ2_XXS): a real llama.cpp type tern does not read.
    let (_d, p) = gguf_with(&[], 16);
    let e = GgufFile::read(&p).err().unwrap().to_string();
    assert!(
        e.contains("IQ2_XXS") && e.contains("token_embd.weight"),
        "{e}"
    );

    let tok = |pre: &str| {
        let (d, p) = gguf_with(
            &[
                ("tokenizer.ggml.model", Value::Str("gpt2".into())),
                ("tokenizer.ggml.pre", Value::Str(pre.into())),
                (
                    "tokenizer.ggml.tokens",
                    Value::strings(["a".into(), "b".into(), "ab".into()]),
                ),
                ("tokenizer.ggml.merges", Value::strings(["a b".into()])),
            ],
            GGML_F32,
        );
        let r = tern::gguf::tokenizer_from_gguf(&GgufFile::read(&p).unwrap());
        drop(d);
        r.map(|_| ())
    };
    assert!(tok("smollm").is_ok());
    let e = tok("tekken").unwrap_err().to_string();
    assert!(e.contains("tekken") && e.contains("qwen2"), "{e}");
}

/// Qwen3 through a GGUF: tern's F32 export of a Qwen3 fixture read back as latents is the same
/// model (no row reordering: llama.cpp's qwen3 uses the half-split RoPE).
#[test]
fn qwen3_gguf_as_a_source_equals_its_checkpoint() {
    let ck = load_checkpoint(&fixtures_dir().join("tied_gqa2"), DType::F32, &Device::Cpu).unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("q.gguf");
    export_f32(&ck, &p);
    let (cfg, params) = latents_from_gguf(&GgufFile::read(&p).unwrap()).unwrap();
    assert_eq!(cfg.arch, Arch::Qwen3);
    let exp = expected("tied_gqa2");
    let m = Model::new(&cfg, QuantConfig::full_precision(), &params).unwrap();
    let d = max_abs_diff(
        &m.full_logits(&input_ids(&exp)).unwrap(),
        &exp["logits_full"],
    );
    assert!(d < TOL, "{d}");
}
