//! GGUF -> a model. Two ways, by what the file holds:
//!
//! - [`load_model`]: a file tern exported (ternary: Q2_0/PQ2_0 tensors, or F16/F32 already
//!   projected) for inference on the CPU: Q2_0/PQ2_0 tensors stay packed and are multiplied
//!   directly, dense ones become f32.
//! - [`latents_from_gguf`]: any GGUF of the Qwen3 or Llama family (F32/F16/BF16, llama.cpp's
//!   Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and K-quants through candle's decoders, tern's own Q2_0/PQ2_0) as
//!   f32 latent weights under their HF names: a starting point for training, a teacher, a base.
//!
//! The architecture comes from the `{arch}.*` metadata ([`config_from_gguf`]). llama.cpp's
//! converter stores a Llama model's q and k rows interleaved for its "normal" RoPE (the two
//! rotary halves of each head alternate); tern computes the half-split RoPE of transformers, so
//! those rows are put back in HF order here ([`llama_rope_rows`]), and export interleaves them
//! again. Qwen3 files use the half-split form as they are.

use super::file::{
    candle_type, type_name, GgufFile, TensorInfo, GGML_BF16, GGML_F16, GGML_F32, READABLE_TYPES,
};
use crate::error::{Error, Result};
use crate::kernels::ternary_matmul::PackedMatrix;
use crate::model::config::{Arch, RopeScaling};
use crate::model::layers::{TernaryEmbedding, TernaryLinear};
use crate::model::params::{self, expected_shapes, gguf_name, LayerTensor};
use crate::model::{Model, ModelConfig, Params};
use crate::quant::codec::{self, Packing};
use crate::quant::{ActQuant, QuantConfig};
use candle_core::{Device, Tensor};

/// Metadata key where tern records Llama-3 rope scaling (JSON of the HF `rope_scaling`) beside
/// the `rope_freqs.weight` factors llama.cpp reads, so that tern can read its own export back.
pub const TERN_ROPE_SCALING: &str = "tern.rope_scaling";

/// For each row of an HF-order q or k matrix (`rows` = heads x `head_dim`), the row of the
/// llama.cpp Llama GGUF that holds it: within a head, HF row `i * hd/2 + j` (half i, pair j)
/// is GGUF row `2 j + i`.
pub fn llama_rope_rows(rows: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (head, k) = (r / head_dim, r % head_dim);
            let (i, j) = (k / half, k % half);
            head * head_dim + 2 * j + i
        })
        .collect()
}

/// Row `r` of the result is row `order[r]` of `data` (rows of `row_len` items).
pub fn gather_rows<T: Copy>(data: &[T], row_len: usize, order: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for &src in order {
        out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
    }
    out
}

/// The inverse permutation of `order`.
pub fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; order.len()];
    for (i, &o) in order.iter().enumerate() {
        inv[o] = i;
    }
    inv
}

/// Whether the GGUF stores this HF tensor with llama.cpp's interleaved RoPE rows.
pub fn rope_interleaved(cfg: &ModelConfig, hf: &str) -> bool {
    cfg.arch == Arch::Llama
        && (0..cfg.num_hidden_layers)
            .any(|i| hf == LayerTensor::Q.hf(i) || hf == LayerTensor::K.hf(i))
}

/// The values of a tensor as f32, row-major in HF order (`[rows, cols]` for ggml dims
/// `[cols, rows]`): dense types read directly, Q2_0/PQ2_0 by tern's codec, llama.cpp's quantized
/// types by candle.
pub fn tensor_f32(file: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>> {
    let data = file.data(t);
    let (rows, cols) = t.rows_cols();
    let what = || format!("GGUF {}: tensor '{}'", file.path.display(), t.name);
    Ok(match t.ggml_type {
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
        ty => {
            if let Some(p) = Packing::from_ggml_type(ty) {
                let rb = p.row_bytes(cols);
                let mut v = Vec::with_capacity(rows * cols);
                for r in 0..rows {
                    v.extend(codec::dequantize_row(&data[r * rb..(r + 1) * rb], cols, p));
                }
                v
            } else if let Some(dt) = candle_type(ty) {
                let dims: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dt,
                    data,
                    dims,
                    &Device::Cpu,
                )
                .map_err(|e| Error::Msg(format!("{}: {e}", what())))?;
                q.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?
            } else {
                return Err(Error::Msg(format!(
                    "{}: type {} is not one tern reads ({READABLE_TYPES})",
                    what(),
                    type_name(ty)
                )));
            }
        }
    })
}

/// The GGUF tensor of an HF name, or an error naming both.
fn find<'a>(file: &'a GgufFile, hf: &str) -> Result<&'a TensorInfo> {
    let g = gguf_name(hf)?;
    file.tensor(&g).ok_or_else(|| {
        Error::Msg(format!(
            "GGUF {}: missing tensor '{g}' ({hf})",
            file.path.display()
        ))
    })
}

fn check_shape(file: &GgufFile, t: &TensorInfo, want: &[usize]) -> Result<()> {
    let have: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
    if have != want {
        return Err(Error::Msg(format!(
            "GGUF {}: tensor '{}' has shape {have:?}, expected {want:?}",
            file.path.display(),
            t.name
        )));
    }
    Ok(())
}

/// True for a file whose weights are already ternary (tern's export: `tern.ternary`, or any
/// Q2_0/PQ2_0 tensor): it runs as it is, never projected again.
pub fn is_ternary(file: &GgufFile) -> bool {
    file.get("tern.ternary")
        .is_some_and(|v| *v == super::file::Value::Bool(true))
        || file
            .tensors
            .iter()
            .any(|t| Packing::from_ggml_type(t.ggml_type).is_some())
}

/// Every weight of the model in `file` as f32 latents under HF names (any type tern reads; a
/// Llama file's q/k rows back in HF order), with its architecture.
pub fn latents_from_gguf(file: &GgufFile) -> Result<(ModelConfig, Params)> {
    let cfg = config_from_gguf(file)?;
    let mut tensors = Vec::new();
    for (hf, shape) in expected_shapes(&cfg) {
        let t = find(file, &hf)?;
        check_shape(file, t, &shape)?;
        let mut v = tensor_f32(file, t)?;
        if rope_interleaved(&cfg, &hf) {
            v = gather_rows(&v, shape[1], &llama_rope_rows(shape[0], cfg.head_dim()));
        }
        if let Some(bad) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Msg(format!(
                "GGUF {}: tensor '{}' holds a non-finite value at element {bad}",
                file.path.display(),
                t.name
            )));
        }
        tensors.push((hf, Tensor::from_vec(v, shape, &Device::Cpu)?));
    }
    Ok((cfg, Params::from_tensors(tensors)?))
}

/// The model tern exported to `file` (weights as the file holds them: already projected, or
/// packed), for CPU inference.
pub fn load_model(file: &GgufFile) -> Result<Model> {
    let cfg = config_from_gguf(file)?;
    // `tern --act-quant` overrides what the file records (measuring a scheme on a model not
    // trained with it).
    let act = match ActQuant::override_from_env() {
        Some(a) => a,
        None => act_quant_of(file)?,
    };
    let shapes = expected_shapes(&cfg);
    let shape_of = |hf: &str| -> Vec<usize> {
        shapes
            .iter()
            .find(|(n, _)| n == hf)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let dense = |hf: &str| -> Result<Tensor> {
        let t = find(file, hf)?;
        let want = shape_of(hf);
        check_shape(file, t, &want)?;
        let mut v = tensor_f32(file, t)?;
        if rope_interleaved(&cfg, hf) {
            v = gather_rows(&v, want[1], &llama_rope_rows(want[0], cfg.head_dim()));
        }
        Ok(Tensor::from_vec(v, want, &Device::Cpu)?)
    };
    let packed = |hf: &str| -> Result<Option<PackedMatrix>> {
        let t = find(file, hf)?;
        let Some(p) = Packing::from_ggml_type(t.ggml_type) else {
            return Ok(None);
        };
        let (rows, cols) = t.rows_cols();
        check_shape(file, t, &shape_of(hf))?;
        let m = if rope_interleaved(&cfg, hf) {
            let order = llama_rope_rows(rows, cfg.head_dim());
            PackedMatrix::new(
                &gather_rows(file.data(t), p.row_bytes(cols), &order),
                rows,
                cols,
                p,
            )?
        } else {
            PackedMatrix::new(file.data(t), rows, cols, p)?
        };
        Ok(Some(m.with_act_quant(act)))
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
        act_quant: act,
        ..QuantConfig::default()
    };
    Model::from_parts(&cfg, quant, lin, dense, embed)
}

/// The input quantization a tern GGUF records (`tern.act_quant`; absent: `none`, as every file
/// written before the key existed).
pub fn act_quant_of(file: &GgufFile) -> Result<ActQuant> {
    let Some(v) = file.get("tern.act_quant") else {
        return Ok(ActQuant::None);
    };
    let name = v.as_str().unwrap_or("");
    ActQuant::from_name(name).ok_or_else(|| {
        Error::Msg(format!(
            "GGUF {}: tern.act_quant: expected {}, found {v:?}",
            file.path.display(),
            ActQuant::NAMES.map(|n| format!("\"{n}\"")).join(" or ")
        ))
    })
}

/// The architecture recorded in a GGUF file's `{arch}.*` metadata (arch = qwen3 or llama).
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let origin = file.path.display().to_string();
    let arch_name = file
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let arch = Arch::from_name(arch_name).ok_or_else(|| {
        Error::model_config(
            &origin,
            format!(
                "general.architecture: expected \"qwen3\" or \"llama\", found \"{arch_name}\" \
                 (tern runs the Qwen3 and Llama families)"
            ),
        )
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let opt_int = |k: &str| -> Result<Option<usize>> {
        match file.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| {
                Error::model_config(
                    &origin,
                    format!(
                        "key '{}': expected a non-negative integer, found {v:?}",
                        key(k)
                    ),
                )
            }),
        }
    };
    let int = |k: &str| -> Result<usize> {
        opt_int(k)?.ok_or_else(|| {
            Error::model_config(&origin, format!("missing integer key '{}'", key(k)))
        })
    };
    let float = |k: &str| -> Result<Option<f64>> {
        match file.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::model_config(
                    &origin,
                    format!("key '{}': expected a number, found {v:?}", key(k)),
                )
            }),
        }
    };
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::model_config(&origin, "missing tensor 'token_embd.weight'"))?;
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let head_dim = match opt_int("attention.key_length")? {
        Some(d) => d,
        None => hidden / heads.max(1),
    };
    if let Some(rot) = opt_int("rope.dimension_count")? {
        if rot != head_dim {
            return Err(Error::model_config(
                &origin,
                format!(
                    "key '{}': {rot} rotary dimensions of head_dim {head_dim} (partial RoPE) is not supported",
                    key("rope.dimension_count")
                ),
            ));
        }
    }
    if let Some(kind) = file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        if kind != "none" {
            return Err(Error::model_config(
                &origin,
                format!(
                    "key '{}' = \"{kind}\": tern implements plain and Llama-3 RoPE only",
                    key("rope.scaling.type")
                ),
            ));
        }
    }
    let rope_scaling = rope_scaling_of(file, &origin)?;
    let tok_id = |k: &str| {
        file.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
            .map(serde_json::Value::from)
    };
    let cfg = ModelConfig {
        arch,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(opt_int("attention.head_count_kv")?.unwrap_or(heads)),
        head_dim: Some(head_dim),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            Error::model_config(
                &origin,
                format!(
                    "missing number key '{}'",
                    key("attention.layer_norm_rms_epsilon")
                ),
            )
        })?,
        rope_theta: float("rope.freq_base")?.unwrap_or(10_000.0),
        vocab_size: embd.rows_cols().0,
        max_position_embeddings: int("context_length")?,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        bos_token_id: tok_id("bos_token_id"),
        eos_token_id: tok_id("eos_token_id"),
        rope_scaling,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: Some("silu".into()),
    };
    cfg.validate(&origin)?;
    Ok(cfg)
}

/// Llama-3 rope scaling of a GGUF: llama.cpp keeps only the per-frequency factors
/// (`rope_freqs.weight`); tern reads them when its own metadata says which scaling made them.
fn rope_scaling_of(file: &GgufFile, origin: &str) -> Result<Option<RopeScaling>> {
    let recorded =
        match file.get(TERN_ROPE_SCALING).and_then(|v| v.as_str()) {
            Some(json) => Some(serde_json::from_str::<RopeScaling>(json).map_err(|e| {
                Error::model_config(origin, format!("key '{TERN_ROPE_SCALING}': {e}"))
            })?),
            None => None,
        };
    if file.tensor("rope_freqs.weight").is_some() && recorded.is_none() {
        return Err(Error::model_config(
            origin,
            "tensor 'rope_freqs.weight' (Llama-3 rope scaling by per-frequency factors): tern reads \
             rope scaling from an HF config.json only; load the model's HF directory instead",
        ));
    }
    Ok(recorded)
}

/// The tokenizer a GGUF carries (`tokenizer.ggml.*`), or None when it has no token list.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Option<crate::tokenizer::Tokenizer>> {
    use super::file::Value;
    let Some(tokens) = file.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let bad = |k: &str, what: &str| {
        Error::Msg(format!(
            "GGUF {}: key '{k}': expected {what}",
            file.path.display()
        ))
    };
    let strings = |k: &str, v: &Value| -> Result<Vec<String>> {
        match v {
            Value::Array(_, items) => items
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(k, "an array of strings")),
            _ => Err(bad(k, "an array of strings")),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens", tokens)?;
    let merges = match file.get("tokenizer.ggml.merges") {
        Some(m) => strings("tokenizer.ggml.merges", m)?,
        None => vec![],
    };
    let token_types = match file.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|x| match x {
                Value::I32(t) => Some(*t),
                other => other.as_u64().map(|t| t as i32),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("tokenizer.ggml.token_type", "an array of integers"))?,
        Some(_) => return Err(bad("tokenizer.ggml.token_type", "an array of integers")),
        None => vec![],
    };
    let text = |k: &str| file.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let id = |k: &str| file.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let vocab = crate::tokenizer::GgmlVocab {
        model: text("tokenizer.ggml.model").unwrap_or_default(),
        pre: text("tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
        tokens,
        token_types,
        merges,
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        add_bos: match file.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        },
        chat_template: text("tokenizer.chat_template"),
    };
    Ok(Some(crate::tokenizer::Tokenizer::from_ggml(
        vocab, &file.path,
    )?))
}
