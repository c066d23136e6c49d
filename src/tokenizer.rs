//! The model's tokenizer: a Hugging Face `tokenizer.json` (from a path, a directory or a hub id,
//! with `tokenizer_config.json` beside it when there is one), or the vocabulary a GGUF file
//! carries (`tokenizer.ggml.*`, [`Tokenizer::from_ggml`]) built into the same kind of
//! tokenizer with llama.cpp's pre-tokenizer split rules; and training one ([`train_bpe`]): a
//! byte-level BPE fitted to a text for models trained from scratch.
//!
//! [`TokenizerMeta`] keeps what llama.cpp needs to reproduce the tokenizer and that tokenizer.json
//! does not say (the pre-tokenizer's name, BOS/EOS, whether to add BOS, the chat template):
//! checkpoints write it as `tokenizer_config.json`, export as `tokenizer.ggml.*`.

use crate::error::{Error, Result};
use crate::hub::{looks_like_hub_id, resolve_file, HubOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file beside tokenizer.json with its special tokens and chat template (HF layout).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from: a tokenizer.json, or the GGUF file that carried it.
    pub path: PathBuf,
    pub meta: TokenizerMeta,
}

/// What llama.cpp needs beyond tokenizer.json: `tokenizer.ggml.pre` and the special tokens.
/// Read from a GGUF, or from `tokenizer_config.json` (HF keys, plus `tern_ggml_pre`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerMeta {
    /// llama.cpp's pre-tokenizer name (qwen2, smollm, llama-bpe, gpt-2, ...).
    #[serde(
        rename = "tern_ggml_pre",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pre: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_bos_token: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

impl TokenizerMeta {
    /// Reads the keys tern uses from an HF `tokenizer_config.json` (special tokens may be strings
    /// or `{"content": ...}` objects; other keys are ignored).
    pub fn from_config_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Msg(format!("{}: invalid JSON: {e}", path.display())))?;
        let token = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        let template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|x| x.as_str()))
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            pre: v
                .get("tern_ggml_pre")
                .and_then(|x| x.as_str())
                .map(str::to_string),
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            add_bos_token: v.get("add_bos_token").and_then(|x| x.as_bool()),
            chat_template: template,
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A tokenizer as a GGUF file stores it (`tokenizer.ggml.*`; the gguf module reads the fields).
#[derive(Debug, Clone, Default)]
pub struct GgmlVocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) is what tern reads.
    pub model: String,
    /// `tokenizer.ggml.pre` ("default" when absent, as llama.cpp).
    pub pre: String,
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: Option<bool>,
    pub chat_template: Option<String>,
}

/// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied one after the other, each
/// splitting the pieces the previous one left.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT_LLAMA_CPP: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers tern builds, by llama.cpp's names: (names, regexes).
const PRE_TOKENIZERS: [(&[&str], &[&str]); 5] = [
    (
        &["default"],
        &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_SPLIT,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
    ),
    (
        &["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "roberta-bpe"],
        &[GPT2_SPLIT],
    ),
    (
        &[
            "llama-bpe",
            "llama3",
            "llama-v3",
            "smaug-bpe",
            "dbrx",
            "falcon3",
            "pixtral",
        ],
        &[LLAMA3_SPLIT],
    ),
    (
        &["qwen2", "deepseek-r1-qwen", "stablelm2"],
        &[QWEN2_SPLIT_LLAMA_CPP],
    ),
    (
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva",
        ],
        &[r"\p{N}", GPT2_SPLIT],
    ),
];

/// The split regexes of a llama.cpp pre-tokenizer name, or None for one tern does not know.
pub fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    PRE_TOKENIZERS
        .iter()
        .find(|(names, _)| names.contains(&pre))
        .map(|(_, r)| *r)
}

fn known_pre_names() -> String {
    PRE_TOKENIZERS
        .iter()
        .map(|(n, _)| n.join("/"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// llama.cpp's name for the pre-tokenizer a tokenizer.json describes, when it is one of the known
/// ones: Split regexes in llama.cpp's or the hub's spelling, or GPT-2's byte-level regex with or
/// without single digits split first (SmolLM's `Digits` + `ByteLevel`).
pub fn detect_pre(tokenizer_json: &serde_json::Value) -> Option<&'static str> {
    let pre = tokenizer_json.get("pre_tokenizer")?;
    let steps: Vec<&serde_json::Value> = match pre.get("type").and_then(|t| t.as_str())? {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pre],
    };
    // The hub's original spelling of the Qwen2 and Llama-3 regexes (case-insensitive group).
    let canonical = |r: &str| -> String {
        r.replace(
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
        )
    };
    let mut regexes = Vec::new();
    for st in steps {
        match st.get("type").and_then(|t| t.as_str())? {
            "Split" => regexes.push(canonical(st.get("pattern")?.get("Regex")?.as_str()?)),
            "Digits" if st.get("individual_digits")?.as_bool()? => {
                regexes.push(r"\p{N}".to_string())
            }
            "ByteLevel" => {
                if st
                    .get("use_regex")
                    .and_then(|u| u.as_bool())
                    .unwrap_or(true)
                {
                    regexes.push(GPT2_SPLIT.to_string());
                }
            }
            _ => return None,
        }
    }
    PRE_TOKENIZERS
        .iter()
        .find(|(_, r)| {
            r.len() == regexes.len()
                && r.iter().zip(&regexes).all(|(a, b)| {
                    // GPT-2's hub regex ends in an extra `|\s+` that llama.cpp leaves out.
                    *a == b || format!("{a}|\\s+") == *b
                })
        })
        .map(|(names, _)| names[0])
}

impl Tokenizer {
    /// `spec` is a tokenizer.json path, a directory holding one, or a hub id.
    pub fn load(spec: &str, hub: &HubOptions) -> Result<Self> {
        let p = Path::new(spec);
        let path = if p.is_file() {
            p.to_path_buf()
        } else if p.is_dir() {
            p.join("tokenizer.json")
        } else if looks_like_hub_id(spec) && !spec.ends_with(".json") {
            resolve_file(spec, "tokenizer.json", hub)?
        } else {
            return Err(Error::Msg(format!(
                "tokenizer '{spec}': no such file (run scripts/fetch_assets.sh to fetch Qwen3's tokenizer \
                 into data/tokenizer.json, or give a hub id)"
            )));
        };
        Self::from_file(&path)
    }

    /// A tokenizer.json, with the tokenizer_config.json beside it when there is one.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Msg(format!("tokenizer {}: cannot load: {e}", path.display())))?;
        let cfg = path.with_file_name(TOKENIZER_CONFIG_FILE);
        let meta = if cfg.is_file() {
            TokenizerMeta::from_config_file(&cfg)?
        } else {
            TokenizerMeta::default()
        };
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            meta,
        })
    }

    /// The tokenizer a GGUF carries (`origin` names the file in messages): byte-level BPE over its
    /// tokens and merges, llama.cpp's split rules for its pre-tokenizer, control and
    /// user-defined tokens as added tokens (special / not), no normalizer (llama.cpp has none).
    pub fn from_ggml(v: GgmlVocab, origin: &Path) -> Result<Self> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::{AddedToken, SplitDelimiterBehavior};

        let bad = |m: String| Error::Msg(format!("GGUF {}: {m}", origin.display()));
        if v.model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model = \"{}\": tern reads byte-level BPE tokenizers (\"gpt2\") only",
                v.model
            )));
        }
        let regexes = pre_tokenizer_regexes(&v.pre).ok_or_else(|| {
            bad(format!(
                "tokenizer.ggml.pre = \"{}\" is a pre-tokenizer tern does not know (it knows {})",
                v.pre,
                known_pre_names()
            ))
        })?;
        if v.token_types.len() != v.tokens.len() && !v.token_types.is_empty() {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                v.token_types.len(),
                v.tokens.len()
            )));
        }
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(v.tokens.len());
        for (i, t) in v.tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let merges = v
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("tokenizer.ggml.merges: \"{m}\" is not \"a b\"")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("building the BPE model: {e}")))?;
        let mut tk = tokenizers::Tokenizer::new(bpe);
        let mut steps = Vec::with_capacity(regexes.len() + 1);
        for r in regexes {
            let split = Split::new(
                SplitPattern::Regex((*r).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| bad(format!("pre-tokenizer regex {r}: {e}")))?;
            steps.push(split.into());
        }
        let byte_level = ByteLevel::new(false, false, false);
        steps.push(byte_level.into());
        tk.with_pre_tokenizer(Some(Sequence::new(steps)));
        tk.with_post_processor(Some(byte_level));
        tk.with_decoder(Some(byte_level));
        let added: Vec<AddedToken> = v
            .token_types
            .iter()
            .enumerate()
            .filter_map(|(i, &ty)| match ty {
                3 => Some(AddedToken::from(v.tokens[i].clone(), true)),
                4 => Some(AddedToken::from(v.tokens[i].clone(), false)),
                _ => None,
            })
            .collect();
        tk.add_tokens(&added);
        let name = |id: Option<u32>| id.and_then(|i| v.tokens.get(i as usize)).cloned();
        let meta = TokenizerMeta {
            pre: Some(v.pre.clone()),
            bos_token: name(v.bos),
            eos_token: name(v.eos),
            pad_token: name(v.pad),
            add_bos_token: v.add_bos,
            chat_template: v.chat_template.clone(),
        };
        let tok = Self {
            inner: tk,
            path: origin.to_path_buf(),
            meta,
        };
        // Added tokens must keep the ids the file gives them.
        for (i, &ty) in v.token_types.iter().enumerate() {
            if matches!(ty, 3 | 4) && tok.token_id(&v.tokens[i]) != Some(i as u32) {
                return Err(bad(format!(
                    "token {i} ({:?}) appears twice in tokenizer.ggml.tokens",
                    v.tokens[i]
                )));
            }
        }
        Ok(tok)
    }

    /// The tokenizer.json of this tokenizer: the file's own text when it came from one, else
    /// serialized.
    pub fn json_text(&self) -> Result<String> {
        let is_json = self
            .path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json && self.path.is_file() {
            return std::fs::read_to_string(&self.path).map_err(|e| Error::io(&self.path, e));
        }
        self.inner
            .to_string(false)
            .map_err(|e| Error::Msg(format!("serializing the tokenizer: {e}")))
    }

    /// Writes tokenizer.json (and tokenizer_config.json when there is metadata to keep) into
    /// `dir`, atomically; a file already in place (the tokenizer's own) is left alone.
    pub fn save_into(&self, dir: &Path) -> Result<()> {
        let dst = dir.join("tokenizer.json");
        if self.path != dst {
            crate::files::write_atomic(&dst, self.json_text()?.as_bytes())?;
        }
        if !self.meta.is_empty() {
            let cfg = dir.join(TOKENIZER_CONFIG_FILE);
            let src_cfg = self.path.with_file_name(TOKENIZER_CONFIG_FILE);
            if cfg != src_cfg {
                let text = serde_json::to_string_pretty(&self.meta).expect("meta serializes");
                crate::files::write_atomic(&cfg, text.as_bytes())?;
            }
        }
        Ok(())
    }

    /// llama.cpp's pre-tokenizer name: the recorded one, or the one tokenizer.json describes.
    pub fn ggml_pre(&self) -> Option<String> {
        if let Some(p) = &self.meta.pre {
            return Some(p.clone());
        }
        let v: serde_json::Value = serde_json::from_str(&self.json_text().ok()?).ok()?;
        detect_pre(&v).map(str::to_string)
    }

    /// The BOS id to put before a prompt, when the tokenizer asks for one (`add_bos_token`).
    pub fn bos_to_add(&self) -> Option<u32> {
        if self.meta.add_bos_token != Some(true) {
            return None;
        }
        self.meta
            .bos_token
            .as_deref()
            .and_then(|t| self.token_id(t))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Msg(format!("decoding: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End-of-sequence ids this tokenizer knows (Qwen3: <|endoftext|>, <|im_end|>; its
    /// configured EOS token).
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = ["<|endoftext|>", "<|im_end|>", "</s>"]
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect();
        if let Some(e) = self
            .meta
            .eos_token
            .as_deref()
            .and_then(|t| self.token_id(t))
        {
            if !ids.contains(&e) {
                ids.push(e);
            }
        }
        ids
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Qwen3's added tokens (name, special), in Qwen3's order: the special ones become CONTROL tokens
/// in a GGUF, the others USER_DEFINED, as in Qwen3's own tokenizer.json.
pub const QWEN3_ADDED_TOKENS: [(&str, bool); 26] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
    ("<think>", false),
    ("</think>", false),
];

/// Qwen2/Qwen3's pre-tokenization split (contractions, letter runs, single digits, punctuation
/// runs, newlines, spaces): what llama.cpp's `qwen2` pre-tokenizer implements.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Trains a byte-level BPE of exactly `vocab_size` tokens (Qwen3's 26 added tokens included) on
/// `text`, with Qwen3's normalizer (NFC), pre-tokenization and decoder, so that the result is a
/// drop-in Qwen3 tokenizer.json that llama.cpp's `qwen2` pre-tokenizer reproduces.
pub fn train_bpe(text: &str, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::normalizers::unicode::NFC;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::Split;
    use tokenizers::{AddedToken, SplitDelimiterBehavior};

    let alphabet = ByteLevel::alphabet();
    let n_added = QWEN3_ADDED_TOKENS.len();
    let min = alphabet.len() + n_added + 1;
    if vocab_size < min {
        return Err(Error::Msg(format!(
            "--vocab-size: expected at least {min} (256 byte tokens + {n_added} Qwen3 added tokens + 1 merge), found {vocab_size}"
        )));
    }
    let err =
        |what: &str, e: tokenizers::Error| Error::Msg(format!("tokenizer training: {what}: {e}"));
    let split = Split::new(
        tokenizers::pre_tokenizers::split::SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| err("pre-tokenizer regex", e))?;
    let byte_level = ByteLevel::new(false, false, false);
    let mut tk = tokenizers::Tokenizer::new(BPE::default());
    tk.with_normalizer(Some(NFC));
    tk.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
    tk.with_post_processor(Some(byte_level));
    tk.with_decoder(Some(byte_level));
    // The special tokens first (ids 0..14, <|endoftext|> = 0), the user-defined ones after the
    // merges, so that the total is exactly vocab_size.
    let (special, plain): (Vec<&(&str, bool)>, Vec<_>) =
        QWEN3_ADDED_TOKENS.iter().partition(|t| t.1);
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size - plain.len())
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet.into_iter().collect())
        .special_tokens(
            special
                .iter()
                .map(|t| AddedToken::from(t.0, true))
                .collect(),
        )
        .build()
        .into();
    // Paragraphs as training sequences: newlines stay inside them, as in the text the model reads.
    tk.train(&mut trainer, text.split_inclusive("\n\n"))
        .map_err(|e| err("BPE", e))?;
    tk.add_tokens(
        &plain
            .iter()
            .map(|t| AddedToken::from(t.0, false))
            .collect::<Vec<_>>(),
    );
    Ok(tk)
}

impl Tokenizer {
    /// How many U+FFFD at the end of a decoded text may still turn into a character when more
    /// tokens come. Byte-level BPE decodes all bytes at once, lossily, so an incomplete character
    /// at the end is exactly one U+FFFD and every one before it is final (invalid bytes stay
    /// invalid). Other decoders (SentencePiece's byte fallback) write one U+FFFD per byte, and an
    /// incomplete character has at most 3 bytes.
    pub fn unsettled_replacements(&self) -> usize {
        if self.is_byte_level() {
            1
        } else {
            3
        }
    }

    fn is_byte_level(&self) -> bool {
        matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        )
    }

    /// Bytes of text each token id stands for (bits per byte divides by their sum). Byte-level
    /// BPE: one byte per character of the token's name; added tokens: their UTF-8 length; other
    /// tokenizers: the length of the token decoded alone.
    pub fn token_byte_lengths(&self) -> Vec<u32> {
        let byte_level = self.is_byte_level();
        let added = self.inner.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    return t.content.len() as u32;
                }
                match self.inner.id_to_token(id) {
                    Some(name) if byte_level => name.chars().count() as u32,
                    Some(_) => self
                        .inner
                        .decode(&[id], false)
                        .map_or(0, |s| s.len() as u32),
                    None => 0,
                }
            })
            .collect()
    }
}

/// A byte-level BPE of `vocab` tokens trained on `text` (every byte has a token), for tests.
#[cfg(test)]
pub(crate) fn trained_for_tests(text: &str, vocab: usize) -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let tk = train_bpe(text, vocab).unwrap();
    std::fs::write(&path, tk.to_string(false).unwrap()).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "The quick brown fox jumps over the lazy dog.\n\nA lazy dog sleeps; the fox \
        runs 42 times.\n\nNaïve café owners don't mind: the dog's fox is quick.\n\n";

    fn trained(vocab: usize) -> Tokenizer {
        trained_for_tests(&TEXT.repeat(20), vocab)
    }

    #[test]
    fn trained_bpe_has_the_requested_size_qwen3_specials_and_round_trips() {
        let tok = trained(320);
        assert_eq!(tok.vocab_size(), 320);
        assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.token_id("<|im_end|>"), Some(2));
        assert_eq!(tok.token_id("</think>"), Some(319));
        let ids = tok.encode(TEXT).unwrap();
        assert!(
            ids.len() < TEXT.len() / 2,
            "merges learned: {} ids",
            ids.len()
        );
        assert_eq!(tok.decode(&ids).unwrap(), TEXT);
        // Added tokens are single tokens; unseen text still encodes through the byte alphabet.
        assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
        let odd = "Zürich 東京 ∑";
        assert_eq!(tok.decode(&tok.encode(odd).unwrap()).unwrap(), odd);
    }

    #[test]
    fn token_byte_lengths_add_up_to_the_text_length() {
        let tok = trained(300);
        let len = tok.token_byte_lengths();
        let text = format!("{TEXT}Zürich 東京<|endoftext|>");
        let total: u32 = tok
            .encode(&text)
            .unwrap()
            .iter()
            .map(|&i| len[i as usize])
            .sum();
        assert_eq!(total as usize, text.len());
    }

    fn ggml_vocab(pre: &str, add_bos: Option<bool>) -> GgmlVocab {
        let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into()];
        tokens.extend(["a", "b", "ab", "Ġ", "Ġab", "1", "2"].map(String::from));
        GgmlVocab {
            model: "gpt2".into(),
            pre: pre.into(),
            token_types: [3, 3, 1, 1, 1, 1, 1, 1, 1].into(),
            tokens,
            merges: vec!["a b".into(), "Ġ ab".into()],
            bos: Some(0),
            eos: Some(1),
            pad: None,
            add_bos,
            chat_template: Some("{{ messages }}".into()),
        }
    }

    #[test]
    fn a_ggml_vocabulary_builds_a_tokenizer_with_its_specials_and_split_rules() {
        let tok =
            Tokenizer::from_ggml(ggml_vocab("smollm", Some(true)), Path::new("m.gguf")).unwrap();
        // "ab ab" -> "ab", "Ġab"; digits one by one under smollm's rules; specials whole.
        assert_eq!(tok.encode("ab ab12</s>").unwrap(), vec![4, 6, 7, 8, 1]);
        assert_eq!(tok.bos_to_add(), Some(0));
        assert_eq!(tok.eos_ids(), vec![1]);
        assert_eq!(tok.meta.chat_template.as_deref(), Some("{{ messages }}"));
        let no_bos = Tokenizer::from_ggml(ggml_vocab("gpt2", None), Path::new("m.gguf")).unwrap();
        assert_eq!(no_bos.bos_to_add(), None);
        // The saved pair (tokenizer.json + tokenizer_config.json) reads back the same.
        let d = tempfile::tempdir().unwrap();
        tok.save_into(d.path()).unwrap();
        let back = Tokenizer::from_file(&d.path().join("tokenizer.json")).unwrap();
        assert_eq!(back.meta, tok.meta);
        assert_eq!(back.ggml_pre().as_deref(), Some("smollm"));
        assert_eq!(
            back.encode("ab ab12").unwrap(),
            tok.encode("ab ab12").unwrap()
        );
        let e = Tokenizer::from_ggml(ggml_vocab("nope", None), Path::new("m.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("m.gguf") && e.contains("nope") && e.contains("smollm"),
            "{e}"
        );
    }

    #[test]
    fn the_pre_tokenizer_is_recognized_in_hub_and_llama_cpp_spellings() {
        let qwen = serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}});
        assert_eq!(detect_pre(&qwen), Some("qwen2"));
        let smol = serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}});
        assert_eq!(detect_pre(&smol), Some("smollm"));
        let gpt2 =
            serde_json::json!({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}});
        assert_eq!(detect_pre(&gpt2), Some("gpt-2"));
        assert_eq!(
            detect_pre(&serde_json::json!({"pre_tokenizer": {"type": "Whitespace"}})),
            None
        );
    }

    #[test]
    fn too_small_a_vocabulary_is_refused_with_the_minimum() {
        let e = train_bpe(TEXT, 200).err().unwrap().to_string();
        assert!(
            e.contains("--vocab-size") && e.contains("283") && e.contains("200"),
            "{e}"
        );
    }
}
