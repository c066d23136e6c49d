//! The architecture of a Qwen3 or Llama model, read from Hugging Face `config.json` field names.
//!
//! The two families share one decoder: pre-norm blocks, GQA attention with RoPE (the half-split
//! "rotate_half" form of transformers), a SiLU-gated MLP, RMSNorm. What differs is recorded here:
//! `model_type` (Qwen3 normalizes q and k per head before RoPE, Llama does not), an explicit or
//! derived head_dim, rope theta and Llama-3 rope scaling, a tied or separate LM head.
//!
//! HF configs carry many keys we do not need (architectures, torch_dtype, ...); those are ignored.
//! Keys that would change the math in ways tern does not implement (attention or MLP bias, rope
//! scaling other than Llama-3's, an activation other than SiLU, another model_type) are rejected
//! rather than silently ignored.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The model family (`model_type` in config.json, `general.architecture` in GGUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Qwen3: RMSNorm on q and k per head before RoPE.
    #[default]
    Qwen3,
    /// Llama (Llama 2/3, SmolLM, ...): no q/k norms.
    Llama,
}

impl Arch {
    /// The name config.json (`model_type`) and GGUF (`general.architecture`) use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3 => "qwen3",
            Arch::Llama => "llama",
        }
    }

    /// transformers' class, for config.json's `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
        }
    }

    /// Whether q and k pass through a per-head RMSNorm before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Arch::Qwen3
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qwen3" => Some(Arch::Qwen3),
            "llama" => Some(Arch::Llama),
            _ => None,
        }
    }
}

/// Llama-3 rope scaling (`rope_scaling` with `rope_type = "llama3"`): low frequencies are divided
/// by `factor`, high ones kept, the band between blended (transformers' `_compute_llama3_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// Always "llama3" (the only kind tern implements).
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// The divisor of each rotary frequency `1 / theta^(2i/d)`, i < d/2 (llama.cpp's
    /// `rope_freqs.weight` holds exactly these).
    pub fn frequency_factors(&self, theta: f64, head_dim: usize) -> Vec<f64> {
        let old = self.original_max_position_embeddings as f64;
        let low_wavelen = old / self.low_freq_factor;
        let high_wavelen = old / self.high_freq_factor;
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (old / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `model_type`; configs without one are Qwen3 (tern's first checkpoints wrote none).
    #[serde(default, rename = "model_type")]
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    /// Llama-3 rope scaling; None = plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    // Read only to refuse what we do not implement.
    #[serde(default, skip_serializing)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing)]
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    32_768
}

impl ModelConfig {
    /// The Qwen3-0.6B architecture (Qwen/Qwen3-0.6B config.json).
    pub fn qwen3_0_6b() -> Self {
        Self {
            arch: Arch::Qwen3,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_hidden_layers: 28,
            num_attention_heads: 16,
            num_key_value_heads: Some(8),
            head_dim: Some(128),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            vocab_size: 151_936,
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
            bos_token_id: Some(serde_json::json!(151643)),
            eos_token_id: Some(serde_json::json!(151645)),
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: Some("silu".into()),
        }
    }

    /// The SmolLM2-135M architecture (Llama; HuggingFaceTB/SmolLM2-135M config.json).
    pub fn smollm2_135m() -> Self {
        Self {
            arch: Arch::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: Some(3),
            head_dim: Some(64),
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            vocab_size: 49_152,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(serde_json::json!(1)),
            eos_token_id: Some(serde_json::json!(2)),
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: Some("silu".into()),
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let mut v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::model_config(origin, format!("invalid JSON: {e}")))?;
        normalize_rope_keys(&mut v, origin)?;
        if v.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true) {
            return Err(Error::model_config(
                origin,
                "use_sliding_window = true is not supported",
            ));
        }
        let cfg: Self = serde_path_to_error::deserialize(v).map_err(|e| {
            let key = e.path().to_string();
            Error::model_config(origin, format!("key '{key}': {}", e.into_inner()))
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the numbers describe a model tern can run.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |m: String| Err(Error::model_config(origin, m));
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
        ] {
            if v == 0 {
                return err(format!("key '{k}': expected a positive integer, found 0"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(format!(
                "head_dim must be even for RoPE, found {}",
                self.head_dim()
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return err(format!(
                "rms_norm_eps: expected a positive number, found {}",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return err(format!(
                "rope_theta: expected a positive number, found {}",
                self.rope_theta
            ));
        }
        if self.attention_bias {
            return err(
                "attention_bias = true is not supported (tern's layers have no bias)".into(),
            );
        }
        if self.mlp_bias {
            return err("mlp_bias = true is not supported (tern's layers have no bias)".into());
        }
        if let Some(rs) = &self.rope_scaling {
            if rs.rope_type != "llama3" {
                return err(format!(
                    "rope_scaling.rope_type: expected \"llama3\" (or no rope_scaling), found \"{}\"",
                    rs.rope_type
                ));
            }
            let ok = |x: f64| x > 0.0 && x.is_finite();
            if !(ok(rs.factor) && ok(rs.low_freq_factor) && ok(rs.high_freq_factor))
                || rs.high_freq_factor <= rs.low_freq_factor
                || rs.original_max_position_embeddings == 0
            {
                return err(format!(
                    "rope_scaling: expected positive factors with high_freq_factor > low_freq_factor \
                     and original_max_position_embeddings > 0, found {rs:?}"
                ));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return err(format!("hidden_act: expected \"silu\", found \"{act}\""));
            }
        }
        Ok(())
    }

    /// Number of parameters (weights of every tensor), tied head counted once.
    pub fn num_params(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (nh, nkv) = (self.num_attention_heads, self.kv_heads());
        let qk_norms = if self.arch.qk_norm() { 2 * hd } else { 0 };
        let attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + qk_norms;
        let mlp = 3 * h * i;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// First EOS id named by the config (HF allows an int or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        json_ids(self.eos_token_id.as_ref())
    }

    /// BOS ids named by the config.
    pub fn bos_ids(&self) -> Vec<u32> {
        json_ids(self.bos_token_id.as_ref())
    }

    /// The rotary frequencies `1 / theta^(2i/d)`, each divided by its Llama-3 factor when the
    /// config scales RoPE.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim();
        let factors = self
            .rope_scaling
            .as_ref()
            .map(|rs| rs.frequency_factors(self.rope_theta, hd));
        (0..hd / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64);
                (f / factors.as_ref().map_or(1.0, |v| v[i])) as f32
            })
            .collect()
    }
}

/// transformers >= 5 writes `rope_parameters: {rope_theta, rope_type, ...}` where older configs
/// (and the hub's releases) have a top-level `rope_theta` and `rope_scaling`. Accept both; a
/// `rope_scaling` (or rope_parameters) of type "default" is plain RoPE; "llama3" keeps its
/// parameters; anything else is refused by `validate`.
fn normalize_rope_keys(v: &mut serde_json::Value, origin: &str) -> Result<()> {
    let Some(obj) = v.as_object_mut() else {
        return Err(Error::model_config(origin, "expected a JSON object"));
    };
    let kind = |x: &serde_json::Value| {
        x.get("rope_type")
            .or_else(|| x.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default")
            .to_string()
    };
    if let Some(rp) = obj.get("rope_parameters").cloned() {
        if !rp.is_null() {
            if !obj.contains_key("rope_theta") {
                if let Some(theta) = rp.get("rope_theta") {
                    obj.insert("rope_theta".into(), theta.clone());
                }
            }
            if kind(&rp) != "default" && obj.get("rope_scaling").is_none_or(|x| x.is_null()) {
                let mut scaling = rp.clone();
                if let Some(m) = scaling.as_object_mut() {
                    m.remove("rope_theta");
                }
                obj.insert("rope_scaling".into(), scaling);
            }
        }
    }
    if let Some(rs) = obj.get("rope_scaling") {
        if !rs.is_null() {
            match kind(rs).as_str() {
                "default" => {
                    obj.insert("rope_scaling".into(), serde_json::Value::Null);
                }
                "llama3" => {}
                other => {
                    return Err(Error::model_config(
                        origin,
                        format!(
                            "rope_scaling.rope_type: expected \"llama3\" or \"default\", found \"{other}\" \
                             (tern implements plain and Llama-3 RoPE only)"
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn json_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_0_6b_has_about_600m_params() {
        let n = ModelConfig::qwen3_0_6b().num_params();
        assert!((590_000_000..610_000_000).contains(&n), "{n}");
    }

    #[test]
    fn rejects_bad_head_ratio_and_unknown_activation() {
        let mut c = ModelConfig::qwen3_0_6b();
        c.num_key_value_heads = Some(5);
        assert!(c
            .validate("t")
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let mut c = ModelConfig::qwen3_0_6b();
        c.hidden_act = Some("gelu".into());
        assert!(c
            .validate("t")
            .unwrap_err()
            .to_string()
            .contains("hidden_act"));
        let e = ModelConfig::from_json_str("{\"hidden_size\": 8}", "x.json").unwrap_err();
        assert!(e.to_string().contains("x.json"), "{e}");
        let base = r#""hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10"#;
        let c = ModelConfig::from_json_str(
            &format!("{{{base}, \"rope_parameters\": {{\"rope_theta\": 5.0, \"rope_type\": \"default\"}}}}"),
            "v5.json",
        )
        .unwrap();
        assert_eq!(c.rope_theta, 5.0);
        let e = ModelConfig::from_json_str(
            &format!(
                "{{{base}, \"rope_parameters\": {{\"rope_theta\": 5.0, \"rope_type\": \"yarn\"}}}}"
            ),
            "x.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("x.json"), "{e}");
    }
}
