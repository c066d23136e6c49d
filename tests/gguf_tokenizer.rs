//! The tokenizer a GGUF carries, built by tern (`Tokenizer::from_ggml`), gives stock llama.cpp's
//! token ids: SmolLM2's real GGUF (pre-tokenizer "smollm") on text with digits, Unicode, runs of
//! spaces and newlines, and on a FOLDOC excerpt, against ids llama-tokenize wrote
//! (scripts/make_tokenizer_fixtures.sh). Needs data/smollm2 (scripts/fetch_smollm2.sh, which
//! scripts/check.sh runs); without it the test prints SKIP, unless TERN_REQUIRE_SMOLLM2 is set.

use std::path::Path;

#[test]
fn smollm2_gguf_tokenizer_equals_llama_cpp_token_for_token() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        assert!(
            std::env::var_os("TERN_REQUIRE_SMOLLM2").is_none(),
            "TERN_REQUIRE_SMOLLM2 is set but {} is missing",
            gguf.display()
        );
        eprintln!(
            "SKIP: {} missing (scripts/fetch_smollm2.sh)",
            gguf.display()
        );
        return;
    }
    let tok = tern::source::tokenizer_from_spec(&gguf.display().to_string()).unwrap();
    assert_eq!(tok.meta.pre.as_deref(), Some("smollm"));
    assert_eq!(tok.meta.add_bos_token, Some(false));
    for name in ["tricky", "foldoc_excerpt"] {
        let dir = root.join("tests/fixtures/tokenize");
        let text = std::fs::read_to_string(dir.join(format!("{name}.txt"))).unwrap();
        let want: Vec<u32> = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.smollm2.ids.json"))).unwrap(),
        )
        .unwrap();
        let got = tok.encode(&text).unwrap();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got == want,
            "{name}: {} ids vs llama.cpp's {}, first difference at {first:?}",
            got.len(),
            want.len()
        );
        assert_eq!(tok.decode(&got).unwrap(), text, "{name}: decode");
    }
    // Long texts are tokenized in blocks (data::tokenize): the same ids as one call.
    let excerpt =
        std::fs::read_to_string(root.join("tests/fixtures/tokenize/foldoc_excerpt.txt")).unwrap();
    let long = format!("{}\n\n{}", excerpt.repeat(4), excerpt.repeat(3));
    assert!(long.len() > 2 << 16);
    assert_eq!(
        tern::data::tokenize(&tok, &long).unwrap(),
        tok.encode(&long).unwrap()
    );
}
