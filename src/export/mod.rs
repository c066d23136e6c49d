//! Export to GGUF for llama.cpp, and verification of exported files.
//!
//! - [`q2`]: the 2-bit ternary codec (Q2_0 = ggml type 42, PQ2_0 = type 142).
//! - [`gguf`]: GGUF v3 reader and writer.
//! - this file: checkpoint -> GGUF (llama.cpp's qwen3 tensor names and metadata, the tokenizer
//!   as tokenizer.ggml.*), and GGUF -> checks against the source projection.

pub mod gguf;
pub mod q2;

use crate::error::{Error, Result};
use crate::model::params::is_norm;
use crate::model::{Params, Qwen3Config};
use crate::ternary::projection::{codes_and_scales, effective_weight};
use crate::ternary::QuantConfig;
use candle_core::DType;
use gguf::{GgufFile, GgufWriter, Value, GGML_F16, GGML_F32};
use half::f16;
use q2::Packing;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q2_0,
    PQ2_0,
    F16,
    F32,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q2_0" => Ok(Format::Q2_0),
            "pq2_0" => Ok(Format::PQ2_0),
            "f16" => Ok(Format::F16),
            "f32" => Ok(Format::F32),
            o => Err(Error::Msg(format!("--format: expected q2_0, pq2_0, f16 or f32, found '{o}'"))),
        }
    }
}

/// llama.cpp's name for an HF tensor name of Qwen3.
pub fn gguf_name(hf: &str) -> Result<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Ok(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.").ok_or_else(|| Error::Msg(format!("no GGUF name for tensor '{hf}'")))?;
    let (layer, suffix) = rest.split_once('.').ok_or_else(|| Error::Msg(format!("no GGUF name for tensor '{hf}'")))?;
    let part = match suffix {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.q_norm.weight" => "attn_q_norm",
        "self_attn.k_norm.weight" => "attn_k_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return Err(Error::Msg(format!("no GGUF name for tensor '{hf}'"))),
    };
    Ok(format!("blk.{layer}.{part}.weight"))
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
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: invalid JSON: {e}", tokenizer_json.display())))?;
    let bad = |m: &str| Error::Msg(format!("{}: {m}", tokenizer_json.display()));
    let model = v.get("model").ok_or_else(|| bad("no 'model'"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad("GGUF export supports BPE tokenizers (Qwen3's) only"));
    }
    let vocab = model.get("vocab").and_then(|x| x.as_object()).ok_or_else(|| bad("no model.vocab"))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; cfg.vocab_size];
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad("non-integer id in model.vocab"))? as usize;
        if id < tokens.len() {
            tokens[id] = Some((tok.clone(), 1)); // NORMAL
        }
    }
    for a in v.get("added_tokens").and_then(|x| x.as_array()).into_iter().flatten() {
        let (Some(id), Some(content)) = (a.get("id").and_then(|x| x.as_u64()), a.get("content").and_then(|x| x.as_str())) else {
            continue;
        };
        let special = a.get("special").and_then(|x| x.as_bool()).unwrap_or(false);
        if (id as usize) < tokens.len() {
            tokens[id as usize] = Some((content.to_string(), if special { 3 } else { 4 })); // CONTROL / USER_DEFINED
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
            serde_json::Value::Array(p) if p.len() == 2 => {
                Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
            }
            _ => Err(bad("a merge is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<_>>()?;
    let find = |s: &str| names.iter().position(|n| n == s).map(|i| i as u32);
    let eos = cfg.eos_ids().first().copied().or_else(|| find("<|endoftext|>")).unwrap_or(0);
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
        return Err(Error::Msg("--format q2_0/pq2_0 needs --precision ternary (a full-precision model is not ternary)".into()));
    }
    if packing.is_some() && !quant.embeddings {
        return Err(Error::Msg(
            "this model was trained with full-precision embeddings (ternary_embeddings = false): export it with --format f16 or f32".into(),
        ));
    }
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::Str("qwen3".into()));
    w.meta("general.name", Value::Str(name.into()));
    w.meta("qwen3.block_count", Value::U32(cfg.num_hidden_layers as u32));
    w.meta("qwen3.context_length", Value::U32(cfg.max_position_embeddings as u32));
    w.meta("qwen3.embedding_length", Value::U32(cfg.hidden_size as u32));
    w.meta("qwen3.feed_forward_length", Value::U32(cfg.intermediate_size as u32));
    w.meta("qwen3.attention.head_count", Value::U32(cfg.num_attention_heads as u32));
    w.meta("qwen3.attention.head_count_kv", Value::U32(cfg.kv_heads() as u32));
    w.meta("qwen3.attention.key_length", Value::U32(cfg.head_dim() as u32));
    w.meta("qwen3.attention.value_length", Value::U32(cfg.head_dim() as u32));
    w.meta("qwen3.attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32));
    w.meta("qwen3.rope.freq_base", Value::F32(cfg.rope_theta as f32));
    w.meta("tern.ternary", Value::Bool(quant.ternary));
    w.meta("tern.group_size", Value::U32(quant.group_size as u32));
    w.meta("tern.scale", Value::Str(quant.scale.to_string()));
    match tokenizer_json {
        Some(t) => tokenizer_metadata(&mut w, t, cfg)?,
        None => tracing::warn!("no tokenizer.json: the GGUF has no tokenizer and llama.cpp will not load it"),
    }
    let q = QuantConfig { ramp: 1.0, ..*quant };
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
            w.tensor(&gname, dims, GGML_F32, v.iter().flat_map(|x| x.to_le_bytes()).collect());
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
                let eff = effective_weight(&t, &q)?.flatten_all()?.to_vec1::<f32>()?;
                let data: Vec<u8> = if format == Format::F16 {
                    eff.iter().flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes()).collect()
                } else {
                    eff.iter().flat_map(|x| x.to_le_bytes()).collect()
                };
                data_bytes += data.len() as u64;
                w.tensor(&gname, dims, if format == Format::F16 { GGML_F16 } else { GGML_F32 }, data);
            }
        }
    }
    let bytes_all = w.to_bytes();
    let header = GgufFile::parse(out, bytes_all.clone())?.data_offset as u64;
    crate::model::io::write_atomic(out, &bytes_all)?;
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

/// Result of checking one GGUF tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub groups: usize,
    pub shares: [f64; 3],
    pub problems: Vec<String>,
}

/// Checks every packed tensor of a GGUF: codes in {-1, 0, +1}, finite non-negative scales, one
/// scale per `tern.group_size` group; with `source`, that codes and scales equal the source
/// projection exactly (scale rounded to f16).
pub fn verify_gguf(file: &GgufFile, source: Option<(&Params, &QuantConfig)>) -> Result<Vec<TensorCheck>> {
    let group = file.get("tern.group_size").and_then(|v| v.as_u64()).map(|g| g as usize);
    let mut out = Vec::new();
    let by_gguf: std::collections::HashMap<String, &str> = match source {
        Some((p, _)) => p.iter().filter_map(|(n, _)| gguf_name(n).ok().map(|g| (g, n.as_str()))).collect(),
        None => Default::default(),
    };
    for t in &file.tensors {
        let p = match t.ggml_type {
            42 => Packing::Q2_0,
            142 => Packing::PQ2_0,
            _ => continue,
        };
        let (rows, cols) = t.rows_cols();
        let data = file.data(t);
        let mut chk = TensorCheck { name: t.name.clone(), groups: 0, shares: [0.0; 3], problems: vec![] };
        let mut counts = [0u64; 3];
        let src = match (source, by_gguf.get(&t.name)) {
            (Some((params, q)), Some(hf)) => {
                let w = params.tensor(hf)?.to_dtype(DType::F32)?;
                if w.dims() != [rows, cols] {
                    chk.problems.push(format!("shape [{rows}, {cols}] but the source has {:?}", w.dims()));
                    out.push(chk);
                    continue;
                }
                let (c, s) = codes_and_scales(&w, q.group_size, q.scale)?;
                Some((c.to_vec2::<f32>()?, s.to_vec2::<f32>()?, q.group_size))
            }
            (Some(_), None) => {
                chk.problems.push("no such tensor in the source checkpoint".into());
                None
            }
            _ => None,
        };
        let g = src.as_ref().map(|s| s.2).or(group).unwrap_or(p.block());
        for r in 0..rows {
            let row = &data[r * p.row_bytes(cols)..(r + 1) * p.row_bytes(cols)];
            let (codes, scales) = q2::unpack_row(row, cols, p);
            if let Some(j) = codes.iter().position(|&c| c == 2) {
                if chk.problems.len() < 5 {
                    chk.problems.push(format!("row {r} col {j}: code 3 (+2), not ternary"));
                }
            }
            for &c in &codes {
                if (-1..=1).contains(&c) {
                    counts[(c + 1) as usize] += 1;
                }
            }
            let per_group = g / p.block();
            for (gi, sc) in scales.chunks(per_group.max(1)).enumerate() {
                chk.groups += 1;
                if sc.iter().any(|x| !x.is_finite() || *x < 0.0) || sc.iter().any(|x| x.to_bits() != sc[0].to_bits()) {
                    if chk.problems.len() < 5 {
                        chk.problems.push(format!("row {r} group {gi}: scales {sc:?} are not one finite non-negative value"));
                    }
                }
            }
            if let Some((sc, ss, sg)) = &src {
                let code_bad = codes.iter().zip(&sc[r]).position(|(&a, &b)| a as f32 != b);
                if let Some(j) = code_bad {
                    if chk.problems.len() < 5 {
                        chk.problems.push(format!("row {r} col {j}: code {} but the source projection has {}", codes[j], sc[r][j]));
                    }
                }
                for (bi, &d) in scales.iter().enumerate() {
                    let want = f16::from_f32(ss[r][bi * p.block() / sg]).to_f32();
                    if d.to_bits() != want.to_bits() && chk.problems.len() < 5 {
                        chk.problems.push(format!("row {r} block {bi}: scale {d} but the source's is {want}"));
                    }
                }
            }
        }
        let n = counts.iter().sum::<u64>().max(1) as f64;
        chk.shares = [counts[0] as f64 / n, counts[1] as f64 / n, counts[2] as f64 / n];
        out.push(chk);
    }
    if let Some((params, _)) = source {
        for (hf, _) in params.iter() {
            let g = gguf_name(hf)?;
            if file.tensor(&g).is_none() {
                out.push(TensorCheck { name: g, groups: 0, shares: [0.0; 3], problems: vec!["missing from the GGUF".into()] });
            }
        }
    }
    Ok(out)
}
