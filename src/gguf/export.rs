//! Checkpoint -> GGUF: llama.cpp's tensor names and `{arch}.*` metadata (qwen3 or llama), the
//! tokenizer as tokenizer.ggml.* (with its pre-tokenizer, special tokens and chat template),
//! ternary weights as Q2_0 / PQ2_0 blocks (or dense F16/F32). A Llama model's q and k rows are
//! interleaved the way llama.cpp's converter does it (its "normal" RoPE); Qwen3 is written as is.

use super::file::{GgufFile, GgufWriter, Value, GGML_F16, GGML_F32};
use super::load::{gather_rows, inverse, llama_rope_rows, rope_interleaved, TERN_ROPE_SCALING};
use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::model::params::{gguf_name, is_norm};
use crate::model::{ModelConfig, Params};
use crate::quant::codec::{self as q2, Packing};
use crate::quant::projection::codes_and_scales;
use crate::quant::QuantConfig;
use crate::tokenizer::Tokenizer;
use candle_core::DType;
use half::f16;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ggml type 42: stock llama.cpp.
    #[value(name = "q2_0")]
    Q2_0,
    /// ggml type 142: PrismML's llama.cpp fork.
    #[value(name = "pq2_0")]
    PQ2_0,
    F16,
    F32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub bytes: u64,
    pub weights: u64,
    /// Whole file (metadata and tokenizer included) in bits per weight.
    pub bits_per_weight: f64,
    /// Tensor data only (what grows with the model) in bits per weight.
    pub data_bits_per_weight: f64,
    /// Size the same model takes as an F16 GGUF (same metadata), computed exactly.
    pub f16_bytes: u64,
    pub ratio_to_f16: f64,
}

/// Tokenizer metadata (tokenizer.ggml.*) from a tokenizer's tokenizer.json and its metadata,
/// padded to the model's vocabulary.
fn tokenizer_metadata(w: &mut GgufWriter, tok: &Tokenizer, cfg: &ModelConfig) -> Result<()> {
    let origin = tok.path.display().to_string();
    let v: serde_json::Value = serde_json::from_str(&tok.json_text()?)
        .map_err(|e| Error::Msg(format!("{origin}: invalid JSON: {e}")))?;
    let bad = |m: &str| Error::Msg(format!("{origin}: {m}"));
    let model = v.get("model").ok_or_else(|| bad("no 'model'"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad("GGUF export supports byte-level BPE tokenizers only"));
    }
    let vocab = model
        .get("vocab")
        .and_then(|x| x.as_object())
        .ok_or_else(|| bad("no model.vocab"))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; cfg.vocab_size];
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("non-integer id in model.vocab"))? as usize;
        if id < tokens.len() {
            tokens[id] = Some((tok.clone(), 1)); // NORMAL
        }
    }
    for a in v
        .get("added_tokens")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(|x| x.as_u64()),
            a.get("content").and_then(|x| x.as_str()),
        ) else {
            continue;
        };
        let special = a.get("special").and_then(|x| x.as_bool()).unwrap_or(false);
        if (id as usize) < tokens.len() {
            tokens[id as usize] = Some((content.to_string(), if special { 3 } else { 4 }));
            // CONTROL / USER_DEFINED
        }
    }
    let mut names = Vec::with_capacity(tokens.len());
    let mut types = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.into_iter().enumerate() {
        let (s, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), 5)); // UNUSED, as llama.cpp's converter pads
        names.push(s);
        types.push(Value::I32(ty));
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(|m| m.as_array())
        .ok_or_else(|| bad("no model.merges"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or(""),
                p[1].as_str().unwrap_or("")
            )),
            _ => Err(bad("a merge is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<_>>()?;
    let pre = tok.ggml_pre().ok_or_else(|| {
        bad("cannot tell which llama.cpp pre-tokenizer this tokenizer.json uses (its pre_tokenizer \
             is none tern knows); add \"tern_ggml_pre\" to tokenizer_config.json beside it")
    })?;
    let find = |s: &str| names.iter().position(|n| n == s).map(|i| i as u32);
    let meta_id = |t: &Option<String>| t.as_deref().and_then(find);
    let eos = meta_id(&tok.meta.eos_token)
        .or_else(|| cfg.eos_ids().first().copied())
        .or_else(|| find("<|endoftext|>"))
        .unwrap_or(0);
    let pad = meta_id(&tok.meta.pad_token)
        .or_else(|| find("<|endoftext|>"))
        .unwrap_or(eos);
    let bos = meta_id(&tok.meta.bos_token).unwrap_or(pad);
    w.meta("tokenizer.ggml.model", Value::Str("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::Str(pre));
    w.meta("tokenizer.ggml.tokens", Value::strings(names));
    w.meta("tokenizer.ggml.token_type", Value::Array(5, types));
    w.meta("tokenizer.ggml.merges", Value::strings(merges));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(eos));
    w.meta("tokenizer.ggml.padding_token_id", Value::U32(pad));
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(bos));
    w.meta(
        "tokenizer.ggml.add_bos_token",
        Value::Bool(tok.meta.add_bos_token.unwrap_or(false)),
    );
    if let Some(t) = &tok.meta.chat_template {
        w.meta("tokenizer.chat_template", Value::Str(t.clone()));
    }
    Ok(())
}

/// Writes `params` as a GGUF file llama.cpp loads. Ternary tensors are the model's projection
/// exactly (codes and group scales; only the scale is rounded to f16).
pub fn export_gguf(
    cfg: &ModelConfig,
    quant: &QuantConfig,
    params: &Params,
    tokenizer: Option<&Tokenizer>,
    format: Format,
    name: &str,
    out: &Path,
) -> Result<ExportReport> {
    let packing = match format {
        Format::Q2_0 => Some(Packing::Q2_0),
        Format::PQ2_0 => Some(Packing::PQ2_0),
        _ => None,
    };
    if packing.is_some() && !quant.ternary {
        return Err(Error::Msg(
            "--format q2_0/pq2_0 needs --precision ternary (a full-precision model is not ternary)"
                .into(),
        ));
    }
    if packing.is_some() && !quant.embeddings {
        return Err(Error::Msg(
            "this model was trained with full-precision embeddings (ternary_embeddings = false): export it with --format f16 or f32".into(),
        ));
    }
    let mut w = GgufWriter::default();
    let arch = cfg.arch.name();
    let u32_of = |x: usize| Value::U32(x as u32);
    w.meta("general.architecture", Value::Str(arch.into()));
    w.meta("general.name", Value::Str(name.into()));
    let hd = cfg.head_dim();
    let mut hparams = vec![
        ("block_count", u32_of(cfg.num_hidden_layers)),
        ("context_length", u32_of(cfg.max_position_embeddings)),
        ("embedding_length", u32_of(cfg.hidden_size)),
        ("feed_forward_length", u32_of(cfg.intermediate_size)),
        ("attention.head_count", u32_of(cfg.num_attention_heads)),
        ("attention.head_count_kv", u32_of(cfg.kv_heads())),
        ("attention.key_length", u32_of(hd)),
        ("attention.value_length", u32_of(hd)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("rope.freq_base", Value::F32(cfg.rope_theta as f32)),
    ];
    if cfg.arch == crate::model::Arch::Llama {
        hparams.push(("rope.dimension_count", u32_of(hd)));
        hparams.push(("vocab_size", u32_of(cfg.vocab_size)));
    }
    for (k, v) in hparams {
        w.meta(&format!("{arch}.{k}"), v);
    }
    w.meta("tern.ternary", Value::Bool(quant.ternary));
    w.meta("tern.group_size", Value::U32(quant.group_size as u32));
    w.meta("tern.scale", Value::Str(quant.scale.to_string()));
    w.meta("tern.act_quant", Value::Str(quant.act_quant.name().into()));
    if let Some(rs) = &cfg.rope_scaling {
        // llama.cpp reads Llama-3 scaling as per-frequency factors; tern reads its own key.
        let json = serde_json::to_string(rs).expect("rope scaling serializes");
        w.meta(TERN_ROPE_SCALING, Value::Str(json));
        let factors: Vec<u8> = rs
            .frequency_factors(cfg.rope_theta, hd)
            .iter()
            .flat_map(|f| (*f as f32).to_le_bytes())
            .collect();
        w.tensor("rope_freqs.weight", vec![hd as u64 / 2], GGML_F32, factors);
    }
    match tokenizer {
        Some(t) => tokenizer_metadata(&mut w, t, cfg)?,
        None => {
            tracing::warn!("no tokenizer: the GGUF has no tokenizer and llama.cpp will not load it")
        }
    }
    let q = QuantConfig {
        ramp: 1.0,
        ..*quant
    };
    let mut weights = 0u64;
    let mut f16_data = 0u64;
    let mut data_bytes = 0u64;
    for (hf, var) in params.iter() {
        let gname = gguf_name(hf)?;
        let mut t = var.as_tensor().detach().to_dtype(DType::F32)?;
        if rope_interleaved(cfg, hf) {
            // llama.cpp's row order for its "normal" RoPE (rows are independent, so projecting
            // after the reordering writes the same groups).
            let (rows, cols) = t.dims2()?;
            let order = inverse(&llama_rope_rows(rows, cfg.head_dim()));
            let v = gather_rows(&t.flatten_all()?.to_vec1::<f32>()?, cols, &order);
            t = candle_core::Tensor::from_vec(v, (rows, cols), t.device())?;
        }
        let dims: Vec<u64> = t.dims().iter().rev().map(|&d| d as u64).collect();
        let n = t.elem_count() as u64;
        weights += n;
        f16_data += (n * if is_norm(hf) { 4 } else { 2 }).div_ceil(32) * 32;
        if is_norm(hf) {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            data_bytes += 4 * v.len() as u64;
            w.tensor(
                &gname,
                dims,
                GGML_F32,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            );
            continue;
        }
        match packing {
            Some(p) => {
                let (rows, cols) = t.dims2()?;
                q2::check_packable(hf, cols, q.group_size, p)?;
                let (codes, scales) = codes_and_scales(&t, q.group_size, q.scale)?;
                let codes = codes.to_vec2::<f32>()?;
                let scales = scales.to_vec2::<f32>()?;
                let mut data = Vec::with_capacity(rows * p.row_bytes(cols));
                for (c, s) in codes.iter().zip(&scales) {
                    let c: Vec<i8> = c.iter().map(|&x| x as i8).collect();
                    q2::pack_row(&c, s, q.group_size, p, &mut data);
                }
                data_bytes += data.len() as u64;
                w.tensor(&gname, dims, p.ggml_type(), data);
            }
            None => {
                let eff = Kernels::default()
                    .effective_weight(&t, &q)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let data: Vec<u8> = if format == Format::F16 {
                    eff.iter()
                        .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                        .collect()
                } else {
                    eff.iter().flat_map(|x| x.to_le_bytes()).collect()
                };
                data_bytes += data.len() as u64;
                w.tensor(
                    &gname,
                    dims,
                    if format == Format::F16 {
                        GGML_F16
                    } else {
                        GGML_F32
                    },
                    data,
                );
            }
        }
    }
    let bytes_all = w.to_bytes();
    let header = GgufFile::parse(out, bytes_all.clone())?.data_offset as u64;
    crate::files::write_atomic(out, &bytes_all)?;
    let bytes = bytes_all.len() as u64;
    let f16_bytes = header + f16_data;
    Ok(ExportReport {
        bytes,
        weights,
        bits_per_weight: bytes as f64 * 8.0 / weights as f64,
        data_bits_per_weight: data_bytes as f64 * 8.0 / weights as f64,
        f16_bytes,
        ratio_to_f16: bytes as f64 / f16_bytes as f64,
    })
}
