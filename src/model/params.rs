//! Named parameters of a Qwen3 model under their Hugging Face names, held as candle `Var`s so the
//! optimizer can update them in place while the model's tensors (which share storage) see it.

use super::config::Qwen3Config;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub fn layer_name(i: usize, rest: &str) -> String {
    format!("model.layers.{i}.{rest}")
}

/// Projection weights of one decoder layer, by HF suffix.
pub const LAYER_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// RMSNorm weights of one decoder layer, by HF suffix.
pub const LAYER_NORMS: [&str; 4] = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
];

/// Every tensor a checkpoint of this architecture holds, with its shape, in a fixed order.
pub fn expected_shapes(cfg: &Qwen3Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
    let mut v = vec![(EMBED.to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let shapes: [(&str, Vec<usize>); 11] = [
            ("self_attn.q_proj.weight", vec![nh * hd, h]),
            ("self_attn.k_proj.weight", vec![nkv * hd, h]),
            ("self_attn.v_proj.weight", vec![nkv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, nh * hd]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_norm.weight", vec![hd]),
            ("self_attn.k_norm.weight", vec![hd]),
        ];
        for (n, s) in shapes {
            v.push((layer_name(l, n), s));
        }
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
        self.vars.get(name).ok_or_else(|| Error::Msg(format!("parameter '{name}' is missing")))
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
    pub fn scratch(cfg: &Qwen3Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
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
