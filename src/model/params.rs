//! Named parameters of a model under their Hugging Face names, held as candle `Var`s so the
//! optimizer can update them in place while the model's tensors (which share storage) see it;
//! and the one table of tensor names (HF and GGUF) and shapes.

use super::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;

/// Tensors outside the decoder layers: HF name and llama.cpp's GGUF name.
pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
const GLOBAL_GGUF: [(&str, &str); 3] = [
    (EMBED, "token_embd.weight"),
    (FINAL_NORM, "output_norm.weight"),
    (LM_HEAD, "output.weight"),
];

/// The tensors of one decoder layer, in the order checkpoints list them (scratch init draws
/// them in this order, so it is part of the format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    InputNorm,
    PostNorm,
    QNorm,
    KNorm,
}

use LayerTensor as L;

impl LayerTensor {
    pub const ALL: [LayerTensor; 11] = [
        L::Q,
        L::K,
        L::V,
        L::O,
        L::Gate,
        L::Up,
        L::Down,
        L::InputNorm,
        L::PostNorm,
        L::QNorm,
        L::KNorm,
    ];

    /// The one table of names: (HF suffix after `model.layers.{i}.`, GGUF part of `blk.{i}.{part}.weight`).
    fn names(self) -> (&'static str, &'static str) {
        match self {
            L::Q => ("self_attn.q_proj.weight", "attn_q"),
            L::K => ("self_attn.k_proj.weight", "attn_k"),
            L::V => ("self_attn.v_proj.weight", "attn_v"),
            L::O => ("self_attn.o_proj.weight", "attn_output"),
            L::Gate => ("mlp.gate_proj.weight", "ffn_gate"),
            L::Up => ("mlp.up_proj.weight", "ffn_up"),
            L::Down => ("mlp.down_proj.weight", "ffn_down"),
            L::InputNorm => ("input_layernorm.weight", "attn_norm"),
            L::PostNorm => ("post_attention_layernorm.weight", "ffn_norm"),
            L::QNorm => ("self_attn.q_norm.weight", "attn_q_norm"),
            L::KNorm => ("self_attn.k_norm.weight", "attn_k_norm"),
        }
    }

    /// The tensors a layer of this architecture holds, in checkpoint order (Llama has no q/k norms).
    pub fn of(cfg: &ModelConfig) -> impl Iterator<Item = LayerTensor> {
        let qk_norm = cfg.arch.qk_norm();
        Self::ALL
            .into_iter()
            .filter(move |t| qk_norm || !matches!(t, L::QNorm | L::KNorm))
    }

    /// llama.cpp's GGUF name of this tensor in layer `i`.
    pub fn gguf(self, i: usize) -> String {
        format!("blk.{i}.{}.weight", self.names().1)
    }

    /// The HF name of this tensor in layer `i`.
    pub fn hf(self, i: usize) -> String {
        format!("model.layers.{i}.{}", self.names().0)
    }

    /// `[rows, cols]` of a projection, `[len]` of a norm.
    pub fn shape(self, cfg: &ModelConfig) -> Vec<usize> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        match self {
            L::Q => vec![nh * hd, h],
            L::K | L::V => vec![nkv * hd, h],
            L::O => vec![h, nh * hd],
            L::Gate | L::Up => vec![i, h],
            L::Down => vec![h, i],
            L::InputNorm | L::PostNorm => vec![h],
            L::QNorm | L::KNorm => vec![hd],
        }
    }
}

/// llama.cpp's GGUF name for an HF tensor name (the same for Qwen3 and Llama).
pub fn gguf_name(hf: &str) -> Result<String> {
    if let Some((_, g)) = GLOBAL_GGUF.iter().find(|(h, _)| *h == hf) {
        return Ok(g.to_string());
    }
    let unknown = || Error::Msg(format!("no GGUF name for tensor '{hf}'"));
    let rest = hf.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, suffix) = rest.split_once('.').ok_or_else(unknown)?;
    let part = LayerTensor::ALL
        .iter()
        .map(|t| t.names())
        .find(|(h, _)| *h == suffix)
        .ok_or_else(unknown)?
        .1;
    Ok(format!("blk.{layer}.{part}.weight"))
}

/// Every tensor a checkpoint of this architecture holds, with its shape, in a fixed order.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut v = vec![(EMBED.to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        v.extend(LayerTensor::of(cfg).map(|t| (t.hf(l), t.shape(cfg))));
    }
    v.push((FINAL_NORM.to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push((LM_HEAD.to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// True for RMSNorm weights: they stay high precision and get no weight decay.
pub fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight")
}

#[derive(Debug, Clone, Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (k, t) in tensors {
            vars.insert(k, Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| Error::Msg(format!("parameter '{name}' is missing")))
    }

    /// The tensor view of a parameter (shares storage with the `Var`, so it tracks gradients).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.var(name)?.as_tensor().clone())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// BitNet-style scratch init: projections and embedding ~ normal(0, fan_in^-1/2) where
    /// fan_in is the row length (input dim); norm weights = 1. Deterministic by `seed`.
    pub fn scratch(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = Vec::new();
        for (name, shape) in expected_shapes(cfg) {
            let n: usize = shape.iter().product();
            let t = if is_norm(&name) {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else {
                let fan_in = *shape.last().expect("2-D weight") as f64;
                let normal = Normal::new(0.0f32, fan_in.powf(-0.5) as f32)
                    .map_err(|e| Error::Msg(format!("scratch init of {name}: {e}")))?;
                let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                Tensor::from_vec(data, shape.as_slice(), device)?
            };
            tensors.push((name, t.to_dtype(dtype)?));
        }
        Self::from_tensors(tensors)
    }
}
