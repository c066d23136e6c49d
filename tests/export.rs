//! GGUF export: codes and scales round-trip bit-exactly, verification catches tampering, and
//! corrupted files are clear errors (never a panic or a giant allocation).

mod common;
use common::*;

use candle_core::{DType, Device};
use half::f16;
use std::path::Path;
use tern::gguf::file::{GgufFile, Value};
use tern::gguf::{export_gguf, verify_gguf, Format};
use tern::model::params::gguf_name;
use tern::model::{load_checkpoint, params::is_norm, Checkpoint};
use tern::quant::codec::{dequantize_row, unpack_row, Packing};
use tern::quant::projection::{codes_and_scales, project};
use tern::quant::{QuantConfig, ScaleRule};
use tern::tokenizer::Tokenizer;

/// A minimal byte-level BPE tokenizer.json with Qwen2's pre-tokenizer (what export reads:
/// vocab, merges, added tokens, and the pre-tokenizer it names for llama.cpp).
fn bpe_tokenizer(dir: &Path) -> Tokenizer {
    let p = dir.join("tokenizer.json");
    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(3, "<|endoftext|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]},
        "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}
    });
    std::fs::write(&p, json.to_string()).unwrap();
    Tokenizer::from_file(&p).unwrap()
}

fn fixture() -> Checkpoint {
    load_checkpoint(&fixtures_dir().join("tied_gqa2"), DType::F32, &Device::Cpu).unwrap()
}

fn export(ck: &Checkpoint, q: &QuantConfig, f: Format, dir: &Path) -> std::path::PathBuf {
    let out = dir.join("m.gguf");
    let tok = bpe_tokenizer(dir);
    export_gguf(&ck.config, q, &ck.params, Some(&tok), f, "test", &out).unwrap();
    out
}

#[test]
fn packed_codes_and_scales_round_trip_bit_exactly() {
    let ck = fixture();
    for (format, packing) in [
        (Format::Q2_0, Packing::Q2_0),
        (Format::PQ2_0, Packing::PQ2_0),
    ] {
        let d = tempfile::tempdir().unwrap();
        let q = QuantConfig::default();
        let file = GgufFile::read(&export(&ck, &q, format, d.path())).unwrap();
        assert_eq!(
            file.get("general.architecture").unwrap().as_str(),
            Some("qwen3")
        );
        assert_eq!(
            file.get("qwen3.attention.head_count_kv").unwrap().as_u64(),
            Some(2)
        );
        assert_eq!(
            file.get("tokenizer.ggml.pre").unwrap().as_str(),
            Some("qwen2")
        );
        match file.get("tokenizer.ggml.tokens").unwrap() {
            Value::Array(8, v) => assert_eq!(v.len(), ck.config.vocab_size), // padded with [PADn]
            other => panic!("{other:?}"),
        }
        assert!(
            file.tensor("output.weight").is_none(),
            "tied head is not written"
        );
        for (hf, var) in ck.params.iter() {
            let t = file.tensor(&gguf_name(hf).unwrap()).unwrap();
            if is_norm(hf) {
                assert_eq!(t.ggml_type, 0);
                continue;
            }
            assert_eq!(t.ggml_type, packing.ggml_type());
            let (rows, cols) = t.rows_cols();
            assert_eq!(var.as_tensor().dims(), &[rows, cols]);
            let (codes, scales) = codes_and_scales(var.as_tensor(), 128, q.scale).unwrap();
            let (codes, scales) = (
                codes.to_vec2::<f32>().unwrap(),
                scales.to_vec2::<f32>().unwrap(),
            );
            // What training and evaluation multiply by (the f16-stored scales).
            let projected = project(var.as_tensor(), 128, q.scale)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let data = file.data(t);
            for r in 0..rows {
                let bytes = &data[r * packing.row_bytes(cols)..];
                assert_eq!(
                    dequantize_row(bytes, cols, packing),
                    projected[r],
                    "{hf} row {r}: the file holds the checkpoint's weights exactly"
                );
                let (c, s) = unpack_row(bytes, cols, packing);
                let want: Vec<i8> = codes[r].iter().map(|&x| x as i8).collect();
                assert_eq!(c, want, "{hf} row {r}");
                for (b, &d) in s.iter().enumerate() {
                    assert_eq!(
                        d.to_bits(),
                        f16::from_f32(scales[r][b * packing.block() / 128])
                            .to_f32()
                            .to_bits()
                    );
                }
            }
        }
        let checks = verify_gguf(&file, Some((&ck.params, &q))).unwrap();
        assert!(checks.iter().all(|c| c.problems.is_empty()), "{checks:?}");
    }
}

#[test]
fn f16_export_holds_the_projected_weights_and_sizes_add_up() {
    let ck = fixture();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("f16.gguf");
    let r16 = export_gguf(
        &ck.config,
        &QuantConfig::default(),
        &ck.params,
        None,
        Format::F16,
        "t",
        &out,
    )
    .unwrap();
    assert_eq!(r16.bytes, std::fs::metadata(&out).unwrap().len());
    assert_eq!(
        r16.bytes, r16.f16_bytes,
        "the f16 size formula matches a real f16 file"
    );
    let rq = export_gguf(
        &ck.config,
        &QuantConfig::default(),
        &ck.params,
        None,
        Format::Q2_0,
        "t",
        &d.path().join("q.gguf"),
    )
    .unwrap();
    assert!(rq.ratio_to_f16 < 0.25 && rq.bits_per_weight < 4.0, "{rq:?}");
    let err = export_gguf(
        &ck.config,
        &QuantConfig {
            group_size: 32,
            ..Default::default()
        },
        &ck.params,
        None,
        Format::Q2_0,
        "t",
        &d.path().join("x.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("group size 32"), "{err}");
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn verify_passes_clean_files_and_fails_tampered_ones() {
    let ck = fixture();
    let d = tempfile::tempdir().unwrap();
    let path = export(&ck, &QuantConfig::default(), Format::Q2_0, d.path());
    let src = fixtures_dir().join("tied_gqa2");
    let o = cli(&[
        "verify",
        "--model",
        path.to_str().unwrap(),
        "--source",
        src.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = cli(&["verify", "--model", src.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let file = GgufFile::read(&path).unwrap();
    let t = file.tensor("blk.0.attn_q.weight").unwrap();
    let at = file.data_offset + t.offset as usize;
    // (1) a code set to 3 (+2): fails even without the source.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at + 2] = 0xFF;
    let bad = d.path().join("bad_code.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let o = cli(&["verify", "--model", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("not ternary"));
    // (2) a scale changed: fails against the source.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at] ^= 0x01;
    let bad = d.path().join("bad_scale.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let o = cli(&[
        "verify",
        "--model",
        bad.to_str().unwrap(),
        "--source",
        src.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("scale"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

fn parse_err(bytes: Vec<u8>) -> String {
    match GgufFile::parse(Path::new("x.gguf"), bytes) {
        Ok(_) => panic!("corrupted file parsed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupted_gguf_files_are_clear_errors() {
    let ck = fixture();
    let d = tempfile::tempdir().unwrap();
    let good = std::fs::read(export(&ck, &QuantConfig::default(), Format::Q2_0, d.path())).unwrap();
    assert!(parse_err(b"GGU".to_vec()).contains("too short"));
    let mut b = good.clone();
    b[0] = b'X';
    assert!(parse_err(b).contains("bad magic"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(parse_err(b).contains("version 7"));
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes()); // tensor count
    assert!(parse_err(b).contains("tensor count"));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    assert!(parse_err(b).contains("metadata count"));
    let e = parse_err(good[..good.len() - 100].to_vec());
    assert!(
        e.contains("runs past the end") && e.contains("truncated"),
        "{e}"
    );
    // A tensor type id tern does not know: find the first tensor info's type field.
    let file = GgufFile::parse(Path::new("x"), good.clone()).unwrap();
    let first = &file.tensors[0];
    let name_at = good
        .windows(first.name.len())
        .position(|w| w == first.name.as_bytes())
        .unwrap();
    let type_at = name_at + first.name.len() + 4 + 8 * first.dims.len();
    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = parse_err(b);
    assert!(
        e.contains(&first.name) && e.contains("unknown (77)") && e.contains("tern reads"),
        "{e}"
    );
    // A string length that points past the end.
    let mut b = good;
    b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(parse_err(b).contains("cannot fit"));
}

#[test]
fn eval_of_the_q2_0_export_equals_eval_of_the_checkpoint_in_ternary_mode() {
    for name in ["tied_gqa2", "untied_gqa3_bf16"] {
        let ck = load_checkpoint(&fixtures_dir().join(name), DType::F32, &Device::Cpu).unwrap();
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m.gguf");
        export_gguf(
            &ck.config,
            &QuantConfig::default(),
            &ck.params,
            None,
            Format::Q2_0,
            name,
            &out,
        )
        .unwrap();
        let file = GgufFile::read(&out).unwrap();
        let packed = tern::gguf::load_model(&file).unwrap();
        assert!(packed.is_packed());
        assert_eq!(
            packed.cfg.tie_word_embeddings,
            ck.config.tie_word_embeddings
        );
        let dense = tern::model::Model::new(&ck.config, QuantConfig::default(), &ck.params)
            .unwrap()
            .freeze()
            .unwrap();
        let exp = expected(name);
        let ids: Vec<u32> = input_ids(&exp).flatten_all().unwrap().to_vec1().unwrap();
        let w = tern::eval::plan(ids.len(), 16, None, tern::eval::Scheme::Plain).unwrap();
        let pd = tern::eval::perplexity(&tern::eval::score(&dense, &ids, &w, 2).unwrap());
        let pp = tern::eval::perplexity(&tern::eval::score(&packed, &ids, &w, 2).unwrap());
        // The packed model quantizes its activations to int8 (per 64-block absmax): its PPL
        // follows the checkpoint's within that rounding (0.25% on these random fixtures), and its
        // distributions stay close (KL per token, as llama-perplexity --kl-divergence).
        let kl = tern::eval::kl_divergence(&packed, &dense, &ids, &w).unwrap();
        assert!(kl.mean_kl < 1e-3 && kl.same_top >= 0.9, "{name}: {kl:?}");
        assert!(
            (pd.ppl - pp.ppl).abs() <= 1e-2 * pd.ppl,
            "{name}: checkpoint PPL {} vs q2_0 PPL {}",
            pd.ppl,
            pp.ppl
        );
        // Logits agree up to the f16 rounding of the scales and the int8 activations (per 128
        // here): within 3% of the largest logit on these random two-layer fixtures (2.2% seen).
        let a = dense.full_logits(&input_ids(&exp)).unwrap();
        let b = packed.full_logits(&input_ids(&exp)).unwrap();
        let top = max_abs(&a);
        let d = max_abs_diff(&a, &b);
        assert!(
            d < 3e-2 * top,
            "{name}: logits differ by {d} (largest logit {top})"
        );
        // The packed model holds no dense copy of a ternary weight: 2.25-2.5 bits per weight when
        // rows are multiples of 128, at most 5 when a row is one 64-block padded to 128 (these
        // fixtures).
        let packed_weights: usize = packed
            .packed_matrices()
            .iter()
            .map(|m| m.rows * m.cols)
            .sum();
        let resident: usize = packed.packed_matrices().iter().map(|m| m.bytes()).sum();
        assert!(
            packed_weights > 0 && resident * 8 <= packed_weights * 5,
            "{resident} bytes for {packed_weights} weights"
        );
    }
}

/// A training source's `tern.scale` or `tern.group_size` that cannot be read is an error naming
/// the file and key, never the default rule in its place.
#[test]
fn an_unreadable_scale_rule_or_group_size_in_a_source_gguf_is_an_error() {
    let ck = fixture();
    let d = tempfile::tempdir().unwrap();
    let out = export(&ck, &QuantConfig::default(), Format::Q2_0, d.path());
    let clean = std::fs::read(&out).unwrap();
    let spec = out.display().to_string();
    let load = || tern::source::load_latents(&spec, DType::F32, &Device::Cpu);
    assert_eq!(load().unwrap().quant.unwrap().scale, ScaleRule::MeanAbs);
    // One value corrupted at a time, in the clean file.
    let rewrite = |key: &[u8], from: &[u8], to: &[u8]| {
        std::fs::write(&out, with_value_replaced(&clean, key, from, to)).unwrap();
    };
    rewrite(b"tern.scale", b"mean_abs", b"mean_abz");
    let e = load().err().expect("an unknown rule was taken").to_string();
    assert!(
        e.contains("tern.scale") && e.contains("mean_abz") && e.contains("twn"),
        "{e}"
    );
    // tern.group_size is a u32 (GGUF type 4) of 128; make it 0.
    rewrite(
        b"tern.group_size",
        &128u32.to_le_bytes(),
        &0u32.to_le_bytes(),
    );
    let e = load().err().expect("group size 0 was taken").to_string();
    assert!(
        e.contains("tern.group_size") && e.contains("positive"),
        "{e}"
    );
}
