//! Token ids -> streamed text, with stop strings.
//!
//! A token's text is not always whole on its own: byte-level BPE splits a UTF-8 character across
//! tokens (decoding shows U+FFFD until the rest arrives), and a stop string may arrive over
//! several tokens. So the stream decodes everything generated so far and sends only what can no
//! longer change: never a trailing U+FFFD, never a tail that could still grow into a stop
//! string. When a stop string appears the text ends just before it.
//!
//! Decoding the whole output every token is O(n) per token; outputs here are at most a context
//! long (thousands of tokens), where it costs far less than the forward.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

pub struct TextStream {
    ids: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    stop: Vec<String>,
}

/// What one token adds: the text now safe to send, and whether a stop string ended the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            ids: Vec::new(),
            sent: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    pub fn push(&mut self, tok: u32, tokenizer: &Tokenizer) -> Result<Piece> {
        self.ids.push(tok);
        let full = tokenizer.decode(&self.ids)?;
        self.resync(&full);
        if let Some(at) = self.first_stop(&full) {
            let text = full.get(self.sent..at).unwrap_or("").to_string();
            self.sent = full.len();
            return Ok(Piece {
                text,
                stopped: true,
            });
        }
        let safe = safe_end(&full, &self.stop, tokenizer.unsettled_replacements());
        let text = full.get(self.sent..safe).unwrap_or("").to_string();
        self.sent = self.sent.max(safe);
        Ok(Piece {
            text,
            stopped: false,
        })
    }

    /// Everything not yet sent (at the end of generation, held text is final).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let full = tokenizer.decode(&self.ids)?;
        self.resync(&full);
        let text = full.get(self.sent..).unwrap_or("").to_string();
        self.sent = full.len();
        Ok(text)
    }

    /// A decoder may rewrite text already sent: byte fallback turns a whole run of byte tokens
    /// into one U+FFFD per byte when a later byte breaks it, so "é" sent becomes three U+FFFD.
    /// What went out stands; the stream goes on from the next character boundary of the new text
    /// (without this it would slice inside a character, or send nothing more).
    fn resync(&mut self, full: &str) {
        while self.sent < full.len() && !full.is_char_boundary(self.sent) {
            self.sent += 1;
        }
    }

    /// Byte offset of the earliest stop string in `full`.
    fn first_stop(&self, full: &str) -> Option<usize> {
        self.stop.iter().filter_map(|s| full.find(s.as_str())).min()
    }
}

/// The end of the text that can be sent: before the trailing U+FFFD that may still become a
/// character (at most `unsettled` of them: see [`Tokenizer::unsettled_replacements`]; the ones
/// before are final, so a run of invalid bytes does not hold the stream back) and before the
/// longest tail that is a proper prefix of a stop string.
fn safe_end(full: &str, stop: &[String], unsettled: usize) -> usize {
    let held = full
        .chars()
        .rev()
        .take(unsettled)
        .take_while(|&c| c == '\u{FFFD}')
        .count();
    let body = &full[..full.len() - held * '\u{FFFD}'.len_utf8()];
    let mut end = body.len();
    for s in stop {
        // Longest k < len(s) with body ending in s[..k], on character boundaries.
        for (k, _) in s
            .char_indices()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if body.ends_with(&s[..k]) {
                end = end.min(body.len() - k);
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_end_holds_partial_characters_and_stop_prefixes() {
        let stop = vec!["</s>".to_string(), "\n\n".to_string()];
        assert_eq!(safe_end("hello", &stop, 1), 5);
        assert_eq!(safe_end("hello</", &stop, 1), 5);
        assert_eq!(safe_end("hello\n", &stop, 1), 5);
        assert_eq!(safe_end("héllo\u{FFFD}", &stop, 1), "héllo".len());
        assert_eq!(
            safe_end("a\u{FFFD}\u{FFFD}\u{FFFD}", &stop, 1),
            "a\u{FFFD}\u{FFFD}".len(),
            "only the last U+FFFD can still change"
        );
        assert_eq!(safe_end("a\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}", &stop, 3), 4);
        assert_eq!(
            safe_end("a<b", &stop, 1),
            3,
            "'<b' is no prefix of a stop string"
        );
        assert_eq!(safe_end("ab", &[], 1), 2);
    }

    /// Feeds `ids` one at a time: the pieces sent after each, and everything together with what
    /// `finish` adds, which must be the whole decoded text.
    fn stream(ids: &[u32], tok: &Tokenizer) -> Vec<String> {
        let mut s = TextStream::new(Vec::new());
        let mut sent: Vec<String> = ids.iter().map(|&t| s.push(t, tok).unwrap().text).collect();
        sent.push(s.finish(tok).unwrap());
        assert_eq!(sent.concat(), tok.decode(ids).unwrap());
        sent
    }

    #[test]
    fn a_character_split_over_byte_tokens_is_sent_whole_and_invalid_bytes_do_not_stall() {
        let tok = crate::tokenizer::trained_for_tests(&"plain ascii text. ".repeat(20), 300);
        assert_eq!(tok.unsettled_replacements(), 1, "byte-level BPE");
        // No merges touch these bytes: one token per byte.
        let ni = tok.encode("你").unwrap();
        assert_eq!(ni.len(), 3, "{ni:?}");
        let a = tok.encode("a").unwrap()[0];
        let (e4, bd, a0) = (ni[0], ni[1], ni[2]);
        assert_eq!(
            stream(&[a, e4, bd, a0, a], &tok),
            ["a", "", "", "你", "a", ""]
        );
        // 0xE4 then 0xE4: the first can no longer become a character, so it goes out as U+FFFD
        // while the second waits; repeated, the stream lags one token, not the whole output.
        let r = '\u{FFFD}'.to_string();
        assert_eq!(
            stream(&[a, e4, e4, e4, a], &tok),
            ["a", "", &r, &r, &(r.clone() + "a"), ""]
        );
        assert_eq!(stream(&[e4, e4, bd, a0], &tok), ["", &r, "", "你", ""]);
    }

    /// SentencePiece-style byte fallback (Llama 2's tokenizers): `<0xNN>` tokens, decoded one
    /// U+FFFD per byte while a run of them is not valid UTF-8.
    fn byte_fallback_tokenizer() -> Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = [
            "a", "<0xE4>", "<0xBD>", "<0xA0>", "<0xC3>", "<0xA9>", "<0xFF>",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
        .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "ByteFallback"},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": true, "vocab": vocab, "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        Tokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn byte_fallback_holds_up_to_three_replacements_and_a_rewrite_cannot_panic() {
        let tok = byte_fallback_tokenizer();
        assert_eq!(tok.unsettled_replacements(), 3);
        let [a, e4, bd, a0, c3, a9, ff] = [0, 1, 2, 3, 4, 5, 6];
        assert_eq!(
            stream(&[a, e4, bd, a0, a], &tok),
            ["a", "", "", "你", "a", ""]
        );
        let r = '\u{FFFD}'.to_string();
        assert_eq!(
            stream(&[a, e4, e4, e4, e4, a], &tok),
            ["a", "", "", "", &r, &(r.repeat(3) + "a"), ""]
        );
        // "é" is sent, then 0xFF breaks its run: the decoder rewrites it as three U+FFFD, whose
        // bytes no longer line up with the two sent. The text already out stands, the stream
        // goes on after the first rewritten character, and nothing panics.
        let mut s = TextStream::new(Vec::new());
        let sent: Vec<String> = [c3, a9, ff, a]
            .iter()
            .map(|&t| s.push(t, &tok).unwrap().text)
            .collect();
        assert_eq!(sent, ["", "é", "", &(r.repeat(2) + "a")]);
        assert_eq!(s.finish(&tok).unwrap(), "");
    }
}
