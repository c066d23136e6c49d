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
        if let Some(at) = self.first_stop(&full) {
            let text = full.get(self.sent..at).unwrap_or("").to_string();
            self.sent = full.len();
            return Ok(Piece {
                text,
                stopped: true,
            });
        }
        let safe = safe_end(&full, &self.stop);
        let text = if safe > self.sent {
            full[self.sent..safe].to_string()
        } else {
            String::new()
        };
        self.sent = self.sent.max(safe);
        Ok(Piece {
            text,
            stopped: false,
        })
    }

    /// Everything not yet sent (at the end of generation, held text is final).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let full = tokenizer.decode(&self.ids)?;
        let text = full.get(self.sent..).unwrap_or("").to_string();
        self.sent = full.len();
        Ok(text)
    }

    /// Byte offset of the earliest stop string in `full`.
    fn first_stop(&self, full: &str) -> Option<usize> {
        self.stop.iter().filter_map(|s| full.find(s.as_str())).min()
    }
}

/// The end of the text that can be sent: before a trailing U+FFFD (an incomplete character) and
/// before the longest tail that is a proper prefix of a stop string.
fn safe_end(full: &str, stop: &[String]) -> usize {
    let mut end = full.len();
    let body = full.trim_end_matches('\u{FFFD}');
    end = end.min(body.len());
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
        assert_eq!(safe_end("hello", &stop), 5);
        assert_eq!(safe_end("hello</", &stop), 5);
        assert_eq!(safe_end("hello\n", &stop), 5);
        assert_eq!(safe_end("héllo\u{FFFD}", &stop), "héllo".len());
        assert_eq!(
            safe_end("a<b", &stop),
            3,
            "'<b' is no prefix of a stop string"
        );
        assert_eq!(safe_end("ab", &[]), 2);
    }
}
