//! The training config: a TOML file with sections `[model] [data] [train] [eval] [checkpoint]`,
//! every key optional with a documented default, overridable by `--set section.key=value`.
//!
//! Unknown keys, wrong types and bad values are errors naming the file (or the `--set`), the key
//! and what was expected. Architecture keys use Hugging Face names.

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::quant::{ActQuant, QuantConfig, ScaleRule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
}

/// `[model]`. `source` = "scratch" | a local HF-layout directory | a hub id | a GGUF file (any
/// type tern reads, dequantized into f32 latents). The architecture keys apply to scratch only
/// (a source's own config defines its architecture); unset ones take the defaults in
/// [`ModelSection::scratch_config`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// default "scratch"
    pub source: String,
    /// "qwen3" (default) or "llama": the family of a scratch model
    pub model_type: Option<crate::model::Arch>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    /// default true: every projection, the embedding and the LM head are ternary
    pub ternary: bool,
    /// default 128
    pub group_size: usize,
    /// default "mean_abs"
    pub scale: ScaleRule,
    /// default true: the embedding and the LM head are ternary too (false: full precision)
    pub ternary_embeddings: bool,
    /// default "none": f32 layer inputs in training (int8 per 32 in packed inference);
    /// "per_token": int8 per token in training (straight-through) and inference, for the
    /// leaner packed kernels (src/quant/activations.rs)
    pub act_quant: ActQuant,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            source: "scratch".into(),
            model_type: None,
            hidden_size: None,
            intermediate_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            num_key_value_heads: None,
            head_dim: None,
            vocab_size: None,
            rope_theta: None,
            rms_norm_eps: None,
            max_position_embeddings: None,
            tie_word_embeddings: None,
            ternary: true,
            group_size: 128,
            scale: ScaleRule::MeanAbs,
            ternary_embeddings: true,
            act_quant: ActQuant::None,
        }
    }
}

impl ModelSection {
    pub fn is_scratch(&self) -> bool {
        self.source == "scratch"
    }

    fn arch_keys_set(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        macro_rules! chk { ($($f:ident),*) => { $( if self.$f.is_some() { v.push(stringify!($f)); } )* } }
        chk!(
            model_type,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rope_theta,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings
        );
        v
    }

    /// Scratch architecture. Defaults: Qwen3, hidden 256, intermediate 768, 4 layers, 4 heads, 2 KV
    /// heads, head_dim 64, vocab 151936 (Qwen3 tokenizer), rope_theta 1e6, eps 1e-6,
    /// 4096 positions, tied embeddings.
    pub fn scratch_config(&self) -> ModelConfig {
        let mut c = ModelConfig::qwen3_0_6b();
        c.arch = self.model_type.unwrap_or_default();
        c.hidden_size = self.hidden_size.unwrap_or(256);
        c.intermediate_size = self.intermediate_size.unwrap_or(768);
        c.num_hidden_layers = self.num_hidden_layers.unwrap_or(4);
        c.num_attention_heads = self.num_attention_heads.unwrap_or(4);
        c.num_key_value_heads = Some(self.num_key_value_heads.unwrap_or(2));
        c.head_dim = Some(self.head_dim.unwrap_or(64));
        c.vocab_size = self.vocab_size.unwrap_or(151_936);
        c.rope_theta = self.rope_theta.unwrap_or(1_000_000.0);
        c.rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        c.max_position_embeddings = self.max_position_embeddings.unwrap_or(4096);
        c.tie_word_embeddings = self.tie_word_embeddings.unwrap_or(true);
        c
    }

    pub fn quant(&self) -> QuantConfig {
        QuantConfig {
            ternary: self.ternary,
            group_size: self.group_size,
            scale: self.scale,
            ramp: 1.0,
            embeddings: self.ternary_embeddings,
            gemm_bf16: false,
            act_quant: self.act_quant,
        }
    }
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// default "data/train_data.txt"
    pub train_file: PathBuf,
    /// tokenizer.json path, directory, hub id or GGUF file; default: the source model's own
    /// tokenizer (its tokenizer.json, or the GGUF's), or "data/tokenizer.json" for scratch
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// tokens per training window (the model sees seq_len, predicts seq_len); default 256
    pub seq_len: usize,
    /// share of the token stream held out for validation (its tail); default 0.05
    pub val_fraction: f64,
    /// seed of the window order; default 0
    pub seed: u64,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train_file: "data/train_data.txt".into(),
            tokenizer: None,
            seq_len: 256,
            val_fraction: 0.05,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Constant,
    Linear,
}

/// How the STE ramp's lambda goes from 0 to 1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RampShape {
    #[default]
    Linear,
    Cosine,
}

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// optimizer steps; default 1000
    pub steps: usize,
    /// sequences per micro-batch; default 8
    pub batch_size: usize,
    /// micro-batches per optimizer step; default 1
    pub grad_accum_steps: usize,
    /// peak learning rate; default 1.5e-3
    pub lr: f64,
    /// floor of the decay; default lr / 10
    pub min_lr: Option<f64>,
    /// linear warmup steps; default 100
    pub warmup_steps: usize,
    /// after warmup: "cosine" (default) | "constant" | "linear" down to min_lr
    pub schedule: Schedule,
    /// decoupled AdamW weight decay (not on norm weights); default 0.1
    pub weight_decay: f64,
    /// default 0.9
    pub beta1: f64,
    /// default 0.95
    pub beta2: f64,
    /// default 1e-8
    pub eps: f64,
    /// global-norm clip; 0 = off; default 1.0
    pub max_grad_norm: f64,
    /// STE ramp lambda 0 -> 1 over these steps; 0 = off (fully ternary from step 1); default 0
    pub ste_ramp_steps: usize,
    /// shape of the ramp: "linear" (default) or "cosine" (slow start and end)
    pub ste_ramp_shape: RampShape,
    /// logit distillation from the source model (frozen, full precision): weight a of the soft
    /// term in (1 - a) CE + a T^2 KL(teacher || student); 0 = off (default)
    pub distill_alpha: f64,
    /// distillation temperature T; default 1
    pub distill_temperature: f64,
    /// hidden-state distillation from the same teacher: weight b of the mean over layers of the
    /// residual streams' relative squared error, added to the loss; 0 = off (default)
    pub distill_hidden: f64,
    /// default 0
    pub seed: u64,
    /// "auto" | "cpu" | "cuda[:N]" | "metal[:N]"; default "auto"
    pub device: String,
    /// default "runs/default"
    pub out_dir: PathBuf,
    /// "fused" (tern's kernels, default) | "reference" (plain candle ops; for benchmarks)
    pub kernels: crate::kernels::Kernels,
    /// "f32" (default) | "bf16": mixed precision on a GPU (bf16 GEMMs and activations, f32
    /// latent weights, optimizer state, norms and loss); on a CPU with AVX512-BF16 or AMX-BF16, the ternary
    /// layers' GEMMs in bf16 and the rest f32 (other CPUs refuse it)
    pub dtype: crate::kernels::ComputeDtype,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 8,
            grad_accum_steps: 1,
            lr: 1.5e-3,
            min_lr: None,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            max_grad_norm: 1.0,
            ste_ramp_steps: 0,
            ste_ramp_shape: RampShape::Linear,
            distill_alpha: 0.0,
            distill_temperature: 1.0,
            distill_hidden: 0.0,
            seed: 0,
            device: "auto".into(),
            out_dir: "runs/default".into(),
            kernels: crate::kernels::Kernels::Fused,
            dtype: crate::kernels::ComputeDtype::F32,
        }
    }
}

impl TrainSection {
    pub fn min_lr(&self) -> f64 {
        self.min_lr.unwrap_or(self.lr * 0.1)
    }
}

/// `[eval]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// evaluate every this many steps (and at the end); 0 = only at the end; default 100
    pub every: usize,
    /// validation batches per evaluation (0 = the whole validation split); default 20
    pub batches: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 100,
            batches: 20,
        }
    }
}

/// `[checkpoint]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// save every this many steps (and at the end); 0 = only at the end; default 500
    pub every: usize,
    /// how many checkpoints to keep; default 3
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 500,
            keep: 3,
        }
    }
}

impl DataSection {
    /// The tokenizer spec to load: `tokenizer`, else the source model's own (None), else for
    /// scratch models "data/tokenizer.json".
    pub fn tokenizer_spec(&self, model: &ModelSection) -> Option<String> {
        match &self.tokenizer {
            Some(t) => Some(t.clone()),
            None if model.is_scratch() => Some("data/tokenizer.json".into()),
            None => None,
        }
    }
}

impl TrainConfig {
    /// Reads `path`, applies `overrides` ("section.key=value", value in TOML syntax or a bare
    /// string) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string(), overrides)
    }

    pub fn from_toml_str(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        // Parse once as typed config: toml's errors carry the line and column of the bad key.
        toml::from_str::<TrainConfig>(text)
            .map_err(|e| cfg_err(origin, e.to_string().trim_end()))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| cfg_err(origin, e.to_string()))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let cfg: TrainConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                cfg_err(
                    &format!("{origin} (with --set overrides)"),
                    format!("key '{key}': {}", e.into_inner()),
                )
            })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, expected: &str, found: String| {
            Err(cfg_err(
                origin,
                format!("key '{key}': expected {expected}, found {found}"),
            ))
        };
        let m = &self.model;
        if m.source.trim().is_empty() {
            return bad(
                "model.source",
                "\"scratch\", a checkpoint directory, a hub id or a GGUF file",
                "\"\"".into(),
            );
        }
        if !m.is_scratch() && !m.arch_keys_set().is_empty() {
            return Err(cfg_err(
                origin,
                format!(
                    "keys {:?} in [model] apply only to source = \"scratch\"; the checkpoint's config.json \
                     defines the architecture of '{}'",
                    m.arch_keys_set(),
                    m.source
                ),
            ));
        }
        if m.is_scratch() {
            m.scratch_config().validate(&format!("{origin} [model]"))?;
        }
        if m.group_size == 0 {
            return bad("model.group_size", "a positive integer", "0".into());
        }
        let d = &self.data;
        if d.seq_len < 2 {
            return bad("data.seq_len", "an integer >= 2", d.seq_len.to_string());
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return bad(
                "data.val_fraction",
                "a number in (0, 1)",
                d.val_fraction.to_string(),
            );
        }
        let t = &self.train;
        for (k, v) in [
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum_steps", t.grad_accum_steps),
        ] {
            if v == 0 {
                return bad(k, "a positive integer", "0".into());
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", "a positive number", t.lr.to_string());
        }
        if !(t.min_lr() >= 0.0 && t.min_lr() <= t.lr) {
            return bad(
                "train.min_lr",
                "a number in [0, train.lr]",
                t.min_lr().to_string(),
            );
        }
        for (k, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(k, "a number in [0, 1)", v.to_string());
            }
        }
        if t.eps <= 0.0 || t.eps.is_nan() {
            return bad("train.eps", "a positive number", t.eps.to_string());
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return bad(
                "train.weight_decay",
                "a number >= 0",
                t.weight_decay.to_string(),
            );
        }
        // NaN fails both tests.
        if t.max_grad_norm < 0.0 || !t.max_grad_norm.is_finite() {
            return bad(
                "train.max_grad_norm",
                "a number >= 0 (0 = no clipping)",
                t.max_grad_norm.to_string(),
            );
        }
        if !(0.0..=1.0).contains(&t.distill_alpha) {
            return bad(
                "train.distill_alpha",
                "a number in [0, 1]",
                t.distill_alpha.to_string(),
            );
        }
        if !(t.distill_temperature > 0.0 && t.distill_temperature.is_finite()) {
            return bad(
                "train.distill_temperature",
                "a positive number",
                t.distill_temperature.to_string(),
            );
        }
        if !(t.distill_hidden >= 0.0 && t.distill_hidden.is_finite()) {
            return bad(
                "train.distill_hidden",
                "a number >= 0 (0 = off)",
                t.distill_hidden.to_string(),
            );
        }
        for (key, v) in [
            ("train.distill_alpha", t.distill_alpha),
            ("train.distill_hidden", t.distill_hidden),
        ] {
            if v > 0.0 && m.is_scratch() {
                return bad(
                    key,
                    "0 for model.source = \"scratch\" (the teacher is the source model)",
                    v.to_string(),
                );
            }
        }
        if self.checkpoint.keep == 0 {
            return bad("checkpoint.keep", "a positive integer", "0".into());
        }
        crate::device::parse_device(&t.device)
            .map_err(|e| cfg_err(origin, format!("key 'train.device': {e}")))?;
        Ok(())
    }
}

fn cfg_err(origin: &str, msg: impl Into<String>) -> Error {
    Error::Msg(format!("config {origin}: {}", msg.into()))
}

/// Applies one `section.key=value` override to the raw TOML table.
fn apply_override(table: &mut toml::Table, o: &str) -> Result<()> {
    let err = |m: String| Err(Error::Msg(format!("--set '{o}': {m}")));
    let Some((key, raw)) = o.split_once('=') else {
        return err("expected section.key=value".into());
    };
    let (key, raw) = (key.trim(), raw.trim());
    let Some((section, field)) = key.split_once('.') else {
        return err(format!(
            "key '{key}' must be section.key (sections: model, data, train, eval, checkpoint)"
        ));
    };
    if !["model", "data", "train", "eval", "checkpoint"].contains(&section) {
        return err(format!(
            "unknown section '{section}' (expected model, data, train, eval or checkpoint)"
        ));
    }
    // A TOML literal (number, bool, quoted string, array) or else a bare string.
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let sec = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match sec.as_table_mut() {
        Some(t) => {
            t.insert(field.to_string(), value);
            Ok(())
        }
        None => err(format!("'{section}' is not a table in the config")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<TrainConfig> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_toml_str(text, "test.toml", &sets)
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c, TrainConfig::default());
        assert!(c.model.is_scratch() && c.model.ternary && c.model.group_size == 128);
    }

    #[test]
    fn overrides_apply_with_toml_or_bare_values() {
        let c = parse(
            "[train]\nsteps = 5\n",
            &[
                "train.steps=20",
                "model.source=Qwen/Qwen3-0.6B",
                "model.scale=max_abs",
                "train.lr=1e-4",
                "model.ternary=false",
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 20);
        assert_eq!(c.model.source, "Qwen/Qwen3-0.6B");
        assert_eq!(c.model.scale, ScaleRule::MaxAbs);
        assert_eq!(c.train.lr, 1e-4);
        assert!(!c.model.ternary);
    }

    #[test]
    fn errors_name_file_key_line_and_expectation() {
        let e = parse("[train]\nsteps = 5\nstepz = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("stepz") && e.contains("line 3"),
            "{e}"
        );
        let e = parse("[train]\nlr = \"fast\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("line 2") && e.contains("lr"),
            "{e}"
        );
        let e = parse("[train]\nlr = -1.0\n", &[]).unwrap_err().to_string();
        assert!(
            e.contains("train.lr") && e.contains("positive") && e.contains("-1"),
            "{e}"
        );
        let e = parse("", &["train.steps=abc"]).unwrap_err().to_string();
        assert!(e.contains("train.steps") && e.contains("--set"), "{e}");
        let e = parse("", &["trian.steps=3"]).unwrap_err().to_string();
        assert!(e.contains("unknown section 'trian'"), "{e}");
        let e = parse("", &["train.nope=3"]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = parse(
            "[model]\nsource = \"Qwen/Qwen3-0.6B\"\nhidden_size = 64\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hidden_size") && e.contains("scratch"), "{e}");
        let e = parse("[model]\nscale = \"median\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("scale") && e.contains("line 2"), "{e}");
        let e = parse("[data]\nval_fraction = 1.5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.val_fraction"), "{e}");
        let e = parse(
            "[model]\nnum_attention_heads = 6\nnum_key_value_heads = 4\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple"), "{e}");
        let e = parse("[train]\ndevice = \"tpu\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.device"), "{e}");
        let e = parse("[train]\ndistill_hidden = -1.0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.distill_hidden") && e.contains(">= 0"),
            "{e}"
        );
        // The default source is "scratch": no teacher to distill from.
        let e = parse("[train]\ndistill_hidden = 1.0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.distill_hidden") && e.contains("scratch"),
            "{e}"
        );
    }
}
