//! Qwen3 architecture, read from Hugging Face `config.json` field names.
//!
//! HF configs carry many keys we do not need (architectures, torch_dtype, ...); those are ignored.
//! Keys that would change the math in ways tern does not implement (attention bias, rope scaling,
//! an activation other than SiLU) are rejected rather than silently ignored.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
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
    // Read only to refuse what we do not implement.
    #[serde(default, skip_serializing)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing)]
    pub rope_scaling: Option<serde_json::Value>,
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

impl Qwen3Config {
    /// The Qwen3-0.6B architecture (Qwen/Qwen3-0.6B config.json).
    pub fn qwen3_0_6b() -> Self {
        Self {
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
            attention_bias: false,
            rope_scaling: None,
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
                "attention_bias = true is not supported (Qwen3 has no attention bias)".into(),
            );
        }
        if let Some(rs) = &self.rope_scaling {
            if !rs.is_null() {
                return err(format!(
                    "rope_scaling {rs} is not supported (plain RoPE only)"
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
        let attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 2 * hd;
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
}

/// transformers >= 5 writes `rope_parameters: {rope_theta, rope_type}` where older configs (and
/// the hub's Qwen3 releases) have a top-level `rope_theta`. Accept both; refuse non-default RoPE.
fn normalize_rope_keys(v: &mut serde_json::Value, origin: &str) -> Result<()> {
    let Some(obj) = v.as_object_mut() else {
        return Err(Error::model_config(origin, "expected a JSON object"));
    };
    if let Some(rp) = obj.get("rope_parameters").cloned() {
        if !rp.is_null() {
            let kind = rp
                .get("rope_type")
                .and_then(|x| x.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::model_config(
                    origin,
                    format!("rope_parameters.rope_type: expected \"default\", found \"{kind}\""),
                ));
            }
            if !obj.contains_key("rope_theta") {
                if let Some(theta) = rp.get("rope_theta") {
                    obj.insert("rope_theta".into(), theta.clone());
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
        let n = Qwen3Config::qwen3_0_6b().num_params();
        assert!((590_000_000..610_000_000).contains(&n), "{n}");
    }

    #[test]
    fn rejects_bad_head_ratio_and_unknown_activation() {
        let mut c = Qwen3Config::qwen3_0_6b();
        c.num_key_value_heads = Some(5);
        assert!(c
            .validate("t")
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let mut c = Qwen3Config::qwen3_0_6b();
        c.hidden_act = Some("gelu".into());
        assert!(c
            .validate("t")
            .unwrap_err()
            .to_string()
            .contains("hidden_act"));
        let e = Qwen3Config::from_json_str("{\"hidden_size\": 8}", "x.json").unwrap_err();
        assert!(e.to_string().contains("x.json"), "{e}");
        let base = r#""hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10"#;
        let c = Qwen3Config::from_json_str(
            &format!("{{{base}, \"rope_parameters\": {{\"rope_theta\": 5.0, \"rope_type\": \"default\"}}}}"),
            "v5.json",
        )
        .unwrap();
        assert_eq!(c.rope_theta, 5.0);
        let e = Qwen3Config::from_json_str(
            &format!(
                "{{{base}, \"rope_parameters\": {{\"rope_theta\": 5.0, \"rope_type\": \"yarn\"}}}}"
            ),
            "x.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("x.json"), "{e}");
    }
}
