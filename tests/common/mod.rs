//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3")
}

/// `bytes` (a GGUF file's) with the first `from` after `key` replaced by `to`, of the same
/// length so that every offset in the file stays valid: a metadata value corrupted in place.
pub fn with_value_replaced(bytes: &[u8], key: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "a same-length rewrite");
    let find = |hay: &[u8], pat: &[u8]| hay.windows(pat.len()).position(|w| w == pat);
    let k = find(bytes, key).expect("the key is in the file");
    let at = k + find(&bytes[k..], from).expect("the value follows its key");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

/// tests/fixtures/llama (scripts/make_llama_fixtures.py).
pub fn llama_fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

/// The expected tensors of a Llama fixture.
pub fn llama_expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    let p = llama_fixtures_dir().join(format!("{name}.expected.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).expect("expected logits file")
}

pub const FIXTURES: [&str; 3] = ["tied_gqa2", "untied_gqa3_bf16", "hidden96_sharded_f16"];

/// The expected tensors transformers wrote for fixture `name`.
pub fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    let p = fixtures_dir().join(format!("{name}.expected.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).expect("expected logits file")
}

pub fn input_ids(exp: &std::collections::HashMap<String, Tensor>) -> Tensor {
    exp["input_ids"].to_dtype(DType::U32).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// The largest |value| of a tensor, as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Copies a directory's files (not recursive).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// A word-level tokenizer.json over `words` (id = position; "[UNK]" first), whitespace split.
pub fn write_word_tokenizer(path: &Path, words: &[&str]) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.to_string(), (i + 1).into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
}

pub const WORDS: [&str; 24] = [
    "the",
    "a",
    "compiler",
    "translates",
    "program",
    "into",
    "machine",
    "code",
    "stack",
    "holds",
    "values",
    "queue",
    "orders",
    "jobs",
    "kernel",
    "schedules",
    "processes",
    "network",
    "carries",
    "packets",
    "cache",
    "stores",
    "data",
    ".",
];

/// A corpus with learnable structure: subject-verb-object sentences from fixed triples, so a
/// small model's loss drops quickly. Deterministic.
pub fn write_corpus(path: &Path, sentences: usize) {
    let triples = [
        ("compiler", "translates", "program"),
        ("stack", "holds", "values"),
        ("queue", "orders", "jobs"),
        ("kernel", "schedules", "processes"),
        ("network", "carries", "packets"),
        ("cache", "stores", "data"),
    ];
    let mut text = String::new();
    for i in 0..sentences {
        let (s, v, o) = triples[(i * 7 + i / 3) % triples.len()];
        let art = if i % 2 == 0 { "the" } else { "a" };
        text.push_str(&format!("{art} {s} {v} the {o} into machine code .\n"));
        if i % 10 == 9 {
            text.push('\n');
        }
    }
    std::fs::write(path, text).unwrap();
}

/// A tiny training config over a fresh corpus and tokenizer in `dir`.
pub fn tiny_train_config(dir: &Path) -> String {
    write_word_tokenizer(&dir.join("tok.json"), &WORDS);
    write_corpus(&dir.join("train.txt"), 400);
    format!(
        r#"
[model]
source = "scratch"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 8
vocab_size = 32
max_position_embeddings = 64
group_size = 16

[data]
train_file = "{d}/train.txt"
tokenizer = "{d}/tok.json"
seq_len = 16
val_fraction = 0.1

[train]
steps = 30
batch_size = 4
lr = 1e-2
warmup_steps = 3
device = "cpu"
out_dir = "{d}/run"

[eval]
every = 10
batches = 2

[checkpoint]
every = 10
keep = 2
"#,
        d = dir.display()
    )
}

/// A small Qwen3 architecture (2 layers, 4 heads over 2 KV heads) for tests.
pub fn small_config(
    hidden: usize,
    intermediate: usize,
    head_dim: usize,
    vocab: usize,
) -> tern::model::ModelConfig {
    let mut c = tern::model::ModelConfig::qwen3_0_6b();
    c.hidden_size = hidden;
    c.intermediate_size = intermediate;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.head_dim = Some(head_dim);
    c.vocab_size = vocab;
    c.rope_theta = 10_000.0;
    c
}

/// Greedy generation of a few prompts together (one batch) gives each prompt exactly the tokens
/// it gets alone: the guarantee every packed layout and input scheme must keep.
pub fn assert_batched_greedy_equals_alone(model: std::sync::Arc<tern::model::Model>) {
    use tern::decode::generate::{generate_batch, GenerateConfig};
    use tern::decode::sampler::SamplerConfig;
    let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 42], vec![100, 3, 9, 250, 7, 81], vec![64, 1]];
    let cfg = GenerateConfig {
        max_new: 12,
        sampler: SamplerConfig {
            temp: 0.0,
            ..Default::default()
        },
        eos: vec![],
    };
    let together = generate_batch(&model, &prompts, &cfg, |_, _| false).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate_batch(&model, std::slice::from_ref(p), &cfg, |_, _| false).unwrap();
        assert_eq!(together[i], alone[0], "prompt {i}");
    }
}
