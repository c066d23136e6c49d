//! GGUF -> a Qwen3 for inference on the CPU: Q2_0/PQ2_0 tensors stay packed in the file's bytes
//! and are multiplied directly, F16/BF16/F32 tensors become dense f32; the architecture comes
//! from the qwen3.* metadata.

use super::file::{GgufFile, TensorInfo, GGML_BF16, GGML_F16, GGML_F32};
use crate::error::{Error, Result};
use crate::kernels::ternary_matmul::PackedMatrix;
use crate::model::layers::{TernaryEmbedding, TernaryLinear};
use crate::model::params::{self, expected_shapes, gguf_name};
use crate::model::{Qwen3, Qwen3Config};
use crate::quant::codec::Packing;
use crate::quant::QuantConfig;
use candle_core::{Device, Tensor};

/// The model stored in `file` (weights as the file holds them: already projected or packed).
pub fn load_model(file: &GgufFile) -> Result<Qwen3> {
    let cfg = config_from_gguf(file)?;
    let shapes = expected_shapes(&cfg);
    let find = |hf: &str| -> Result<&TensorInfo> {
        let g = gguf_name(hf)?;
        file.tensor(&g).ok_or_else(|| {
            Error::Msg(format!(
                "GGUF {}: missing tensor '{g}'",
                file.path.display()
            ))
        })
    };
    let shape_of = |hf: &str| -> Vec<usize> {
        shapes
            .iter()
            .find(|(n, _)| n == hf)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let dense = |hf: &str| -> Result<Tensor> {
        let t = find(hf)?;
        let want = shape_of(hf);
        let have: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if have != want {
            return Err(Error::Msg(format!(
                "GGUF tensor '{}': shape {have:?}, expected {want:?}",
                t.name
            )));
        }
        let data = file.data(t);
        let v: Vec<f32> = match t.ggml_type {
            GGML_F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GGML_F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            GGML_BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(Error::Msg(format!(
                    "GGUF tensor '{}': type {other} is not dense",
                    t.name
                )))
            }
        };
        Ok(Tensor::from_vec(v, want, &Device::Cpu)?)
    };
    let packed = |hf: &str| -> Result<Option<PackedMatrix>> {
        let t = find(hf)?;
        let Some(p) = Packing::from_ggml_type(t.ggml_type) else {
            return Ok(None);
        };
        let (rows, cols) = t.rows_cols();
        if [rows, cols] != shape_of(hf)[..] {
            return Err(Error::Msg(format!(
                "GGUF tensor '{}': shape [{rows}, {cols}], expected {:?}",
                t.name,
                shape_of(hf)
            )));
        }
        Ok(Some(PackedMatrix::new(file.data(t), rows, cols, p)?))
    };
    let lin = |hf: &str| -> Result<TernaryLinear> {
        match packed(hf)? {
            Some(m) => TernaryLinear::from_packed(m),
            None => Ok(TernaryLinear::new(dense(hf)?)),
        }
    };
    let embed = match packed(params::EMBED)? {
        Some(m) => TernaryEmbedding::from_packed(m)?,
        None => TernaryEmbedding::new(dense(params::EMBED)?),
    };
    // Weights in the file are already projected (or packed): run them as they are.
    let group = file
        .get("tern.group_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(128) as usize;
    let quant = QuantConfig {
        ternary: false,
        group_size: group,
        ..QuantConfig::default()
    };
    Qwen3::from_parts(&cfg, quant, lin, dense, embed)
}

/// The architecture recorded in a GGUF file's qwen3.* metadata.
pub fn config_from_gguf(file: &GgufFile) -> Result<Qwen3Config> {
    let origin = file.path.display().to_string();
    let arch = file
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if arch != "qwen3" {
        return Err(Error::model_config(
            &origin,
            format!("general.architecture: expected \"qwen3\", found \"{arch}\""),
        ));
    }
    let int = |k: &str| -> Result<usize> {
        file.get(&format!("qwen3.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::model_config(&origin, format!("missing integer key 'qwen3.{k}'")))
    };
    let float = |k: &str| -> Result<f64> {
        file.get(&format!("qwen3.{k}"))
            .and_then(|v| v.as_f64())
            .ok_or_else(|| Error::model_config(&origin, format!("missing number key 'qwen3.{k}'")))
    };
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::model_config(&origin, "missing tensor 'token_embd.weight'"))?;
    let mut cfg = Qwen3Config::qwen3_0_6b();
    cfg.hidden_size = int("embedding_length")?;
    cfg.intermediate_size = int("feed_forward_length")?;
    cfg.num_hidden_layers = int("block_count")?;
    cfg.num_attention_heads = int("attention.head_count")?;
    cfg.num_key_value_heads = Some(int("attention.head_count_kv")?);
    cfg.head_dim = Some(int("attention.key_length")?);
    cfg.rms_norm_eps = float("attention.layer_norm_rms_epsilon")?;
    cfg.rope_theta = float("rope.freq_base")?;
    cfg.max_position_embeddings = int("context_length")?;
    cfg.vocab_size = embd.rows_cols().0;
    cfg.tie_word_embeddings = file.tensor("output.weight").is_none();
    cfg.eos_token_id = file
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.as_u64())
        .map(serde_json::Value::from);
    cfg.bos_token_id = None;
    cfg.validate(&origin)?;
    Ok(cfg)
}
