//! Chat templates: the model's own Jinja template (tokenizer_config.json's `chat_template` or the
//! GGUF's `tokenizer.chat_template`) rendered with minijinja the way transformers renders it:
//! trim_blocks and lstrip_blocks on, Python string/dict methods (`.strip()`, `.startswith()`,
//! `.items()`: minijinja-contrib's pycompat), `raise_exception`, `strftime_now`, and the
//! variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
//!
//! A model without a template gets ChatML (`<|im_start|>role\n...<|im_end|>\n`), as llama-server
//! falls back to.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use serde::Serialize;

pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    /// True when the model carried no template and ChatML stands in.
    pub fallback: bool,
}

impl ChatTemplate {
    /// The tokenizer's template, or ChatML. A template that does not compile is an error naming
    /// the problem (not a silent fallback).
    pub fn for_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let (src, fallback) = match tok.meta.chat_template.as_deref() {
            Some(t) if !t.trim().is_empty() => (t.to_string(), false),
            _ => (CHATML.to_string(), true),
        };
        let mut t = Self::new(&src)?;
        t.bos = tok.meta.bos_token.clone().unwrap_or_default();
        t.eos = tok.meta.eos_token.clone().unwrap_or_default();
        t.fallback = fallback;
        Ok(t)
    }

    pub fn new(source: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Msg(format!("chat template: {e}")))?;
        Ok(Self {
            env,
            bos: String::new(),
            eos: String::new(),
            fallback: false,
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Msg(format!("chat template: {e}")))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Msg(format!("chat template: {e}")))
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

/// `strftime_now(fmt)` (Llama 3's templates print today's date): UTC, with the directives those
/// templates use (%d %m %Y %y %b %B %H %M %S %%); others are kept as written.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs, &fmt)
}

fn format_utc(secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let tod = secs % 86_400;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{d:02}"),
            Some('m') => out += &format!("{m:02}"),
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y % 100),
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('H') => out += &format!("{:02}", tod / 3600),
            Some('M') => out += &format!("{:02}", tod / 60 % 60),
            Some('S') => out += &format!("{:02}", tod % 60),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let s = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hf_dialect_python_methods_blocks_and_raise_exception() {
        let src = "{% for m in messages %}\n  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}\n  [{{ m.content.strip().upper() }}]{% if m.content.startswith(' ') %}!{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        let s = t.render(&[Message::new("user", " hi ")], false).unwrap();
        // lstrip_blocks drops the indentation before a block tag, trim_blocks the newline after
        // one (jinja2 with transformers' settings renders the same '  [HI]!').
        assert_eq!(s, "  [HI]!");
        let err = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad role tool"), "{err}");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(format_utc(0, "%d %b %Y"), "01 Jan 1970");
        // 2026-12-03 10:00:00 UTC.
        assert_eq!(
            format_utc(1_796_292_000, "%Y-%m-%d %H:%M %B %%x"),
            "2026-12-03 10:00 December %x"
        );
    }
}
