//! Checkpoint -> GGUF: llama.cpp's qwen3 tensor names and metadata, the tokenizer as
//! tokenizer.ggml.*, ternary weights as Q2_0 / PQ2_0 blocks (or dense F16/F32).

use super::file::{GgufFile, GgufWriter, Value, GGML_F16, GGML_F32};
use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::model::params::{gguf_name, is_norm};
use crate::model::{Params, Qwen3Config};
use crate::quant::codec::{self as q2, Packing};
use crate::quant::projection::codes_and_scales;
use crate::quant::QuantConfig;
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

/// Tokenizer metadata (tokenizer.ggml.*) from a Hugging Face tokenizer.json, padded to `vocab`.
fn tokenizer_metadata(w: &mut GgufWriter, tokenizer_json: &Path, cfg: &Qwen3Config) -> Result<()> {
    let text = std::fs::read_to_string(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: invalid JSON: {e}", tokenizer_json.display())))?;
    let bad = |m: &str| Error::Msg(format!("{}: {m}", tokenizer_json.display()));
    let model = v.get("model").ok_or_else(|| bad("no 'model'"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad("GGUF export supports BPE tokenizers (Qwen3's) only"));
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
    let find = |s: &str| names.iter().position(|n| n == s).map(|i| i as u32);
    let eos = cfg
        .eos_ids()
        .first()
        .copied()
        .or_else(|| find("<|endoftext|>"))
        .unwrap_or(0);
    let pad = find("<|endoftext|>").unwrap_or(eos);
    w.meta("tokenizer.ggml.model", Value::Str("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::Str("qwen2".into()));
    w.meta("tokenizer.ggml.tokens", Value::strings(names));
    w.meta("tokenizer.ggml.token_type", Value::Array(5, types));
    w.meta("tokenizer.ggml.merges", Value::strings(merges));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(eos));
    w.meta("tokenizer.ggml.padding_token_id", Value::U32(pad));
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(pad));
    w.meta("tokenizer.ggml.add_bos_token", Value::Bool(false));
    Ok(())
}

/// Writes `params` as a GGUF file llama.cpp loads. Ternary tensors are the model's projection
/// exactly (codes and group scales; only the scale is rounded to f16).
pub fn export_gguf(
    cfg: &Qwen3Config,
    quant: &QuantConfig,
    params: &Params,
    tokenizer_json: Option<&Path>,
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
    w.meta("general.architecture", Value::Str("qwen3".into()));
    w.meta("general.name", Value::Str(name.into()));
    w.meta(
        "qwen3.block_count",
        Value::U32(cfg.num_hidden_layers as u32),
    );
    w.meta(
        "qwen3.context_length",
        Value::U32(cfg.max_position_embeddings as u32),
    );
    w.meta("qwen3.embedding_length", Value::U32(cfg.hidden_size as u32));
    w.meta(
        "qwen3.feed_forward_length",
        Value::U32(cfg.intermediate_size as u32),
    );
    w.meta(
        "qwen3.attention.head_count",
        Value::U32(cfg.num_attention_heads as u32),
    );
    w.meta(
        "qwen3.attention.head_count_kv",
        Value::U32(cfg.kv_heads() as u32),
    );
    w.meta(
        "qwen3.attention.key_length",
        Value::U32(cfg.head_dim() as u32),
    );
    w.meta(
        "qwen3.attention.value_length",
        Value::U32(cfg.head_dim() as u32),
    );
    w.meta(
        "qwen3.attention.layer_norm_rms_epsilon",
        Value::F32(cfg.rms_norm_eps as f32),
    );
    w.meta("qwen3.rope.freq_base", Value::F32(cfg.rope_theta as f32));
    w.meta("tern.ternary", Value::Bool(quant.ternary));
    w.meta("tern.group_size", Value::U32(quant.group_size as u32));
    w.meta("tern.scale", Value::Str(quant.scale.to_string()));
    match tokenizer_json {
        Some(t) => tokenizer_metadata(&mut w, t, cfg)?,
        None => tracing::warn!(
            "no tokenizer.json: the GGUF has no tokenizer and llama.cpp will not load it"
        ),
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
        let t = var.as_tensor().detach().to_dtype(DType::F32)?;
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
