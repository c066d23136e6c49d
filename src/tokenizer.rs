//! The model's tokenizer: a Hugging Face `tokenizer.json`, from a path or a hub id; and training
//! one ([`train_bpe`]): a byte-level BPE fitted to a text for models trained from scratch.

use crate::error::{Error, Result};
use crate::hub::{looks_like_hub_id, resolve_file, HubOptions};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
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

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Msg(format!("tokenizer {}: cannot load: {e}", path.display())))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
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

    /// End-of-sequence ids this tokenizer knows (Qwen3: <|endoftext|>, <|im_end|>).
    pub fn eos_ids(&self) -> Vec<u32> {
        ["<|endoftext|>", "<|im_end|>", "</s>"]
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect()
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
    /// Bytes of text each token id stands for (bits per byte divides by their sum). Byte-level
    /// BPE: one byte per character of the token's name; added tokens: their UTF-8 length; other
    /// tokenizers: the length of the token decoded alone.
    pub fn token_byte_lengths(&self) -> Vec<u32> {
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "The quick brown fox jumps over the lazy dog.\n\nA lazy dog sleeps; the fox \
        runs 42 times.\n\nNaïve café owners don't mind: the dog's fox is quick.\n\n";

    fn trained(vocab: usize) -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tk = train_bpe(&TEXT.repeat(20), vocab).unwrap();
        std::fs::write(&path, tk.to_string(false).unwrap()).unwrap();
        Tokenizer::from_file(&path).unwrap()
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

    #[test]
    fn too_small_a_vocabulary_is_refused_with_the_minimum() {
        let e = train_bpe(TEXT, 200).err().unwrap().to_string();
        assert!(
            e.contains("--vocab-size") && e.contains("283") && e.contains("200"),
            "{e}"
        );
    }
}
