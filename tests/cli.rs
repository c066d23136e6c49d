//! The `tern` binary as a user runs it: clear errors with non-zero exits, Ctrl-C saves a
//! checkpoint and exits 130, and a hub id loads offline from the HF_HOME cache.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

fn tern(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
    c.args(args).env("RUST_LOG", "warn");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_cfg(dir: &Path, extra: &str) -> String {
    let p = dir.join("cfg.toml");
    std::fs::write(&p, format!("{}{extra}", tiny_train_config(dir))).unwrap();
    p.display().to_string()
}

#[test]
fn config_errors_exit_nonzero_with_a_clear_message() {
    let d = tempfile::tempdir().unwrap();
    let o = tern(&["train", "--config", "/nonexistent/cfg.toml"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/cfg.toml"),
        "{}",
        stderr(&o)
    );

    let cfg = write_cfg(d.path(), "");
    std::fs::write(
        d.path().join("bad.toml"),
        "[train]\nsteps = 3\nlearning_rate = 0.1\n",
    )
    .unwrap();
    let o = tern(
        &[
            "train",
            "--config",
            &d.path().join("bad.toml").display().to_string(),
        ],
        &[],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        e.contains("bad.toml") && e.contains("learning_rate") && e.contains("line 3"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");

    let o = tern(
        &["train", "--config", &cfg, "--set", "train.batch_size=0"],
        &[],
    );
    assert!(
        stderr(&o).contains("train.batch_size") && o.status.code() == Some(1),
        "{}",
        stderr(&o)
    );
    let o = tern(
        &[
            "train",
            "--config",
            &cfg,
            "--set",
            "data.train_file=/nope.txt",
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("/nope.txt") && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    let o = tern(
        &[
            "train",
            "--config",
            &cfg,
            "--resume",
            &d.path().join("empty").display().to_string(),
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("no complete checkpoint") && o.status.code() == Some(1),
        "{}",
        stderr(&o)
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130_then_resume_finishes() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_cfg(d.path(), "");
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "train",
            "--config",
            &cfg,
            "--set",
            "train.steps=100000",
            "--set",
            "checkpoint.every=0",
            "--quiet",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = d.path().join("run/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .lines()
        .count()
        < 3
    {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let ckpts = tern::train::checkpoint::list(&d.path().join("run")).unwrap();
    assert_eq!(ckpts.len(), 1, "one checkpoint saved on Ctrl-C");
    let stopped_at = ckpts[0].0;
    let o = tern(
        &[
            "train",
            "--config",
            &cfg,
            "--set",
            &format!("train.steps={}", stopped_at + 2),
            "--resume",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("steps {}", stopped_at + 2)));
}

#[test]
fn hub_id_trains_offline_from_the_hf_home_cache() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("hf");
    let repo = home.join("hub/models--tern-test--tiny");
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    copy_dir(
        &fixtures_dir().join("tied_gqa2"),
        &repo.join("snapshots").join(sha),
    );
    let base = tiny_train_config(d.path());
    // Drop the scratch architecture keys: the checkpoint's config.json defines the model.
    let model_end = base.find("[data]").unwrap();
    let text = format!(
        "[model]\nsource = \"tern-test/tiny\"\ngroup_size = 64\n\n{}",
        &base[model_end..]
    );
    let cfg = d.path().join("hub.toml");
    std::fs::write(&cfg, text).unwrap();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_CACHE", ""),
    ];
    let o = tern(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.steps=2",
            "--set",
            "eval.every=0",
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = tern(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "model.source=tern-test/absent",
            "--set",
            "train.steps=1",
        ],
        &env,
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("tern-test/absent"),
        "{e}"
    );
}

/// Found trying tern as a new user: an export over the checkpoint's own weights, an eval context
/// beyond the model's positions, zero beams. Each is refused up front with an error naming the
/// problem, and no input is touched.
#[test]
fn bad_requests_are_refused_and_inputs_stay_untouched() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    copy_dir(&fixtures_dir().join("tied_gqa2"), &ck);
    write_word_tokenizer(&ck.join("tokenizer.json"), &WORDS);
    let snapshot = || -> Vec<Vec<u8>> {
        ["model.safetensors", "config.json", "tokenizer.json"]
            .iter()
            .map(|f| std::fs::read(ck.join(f)).unwrap())
            .collect()
    };
    let before = snapshot();
    let ck_s = ck.display().to_string();
    for own in ["model.safetensors", "config.json", "tokenizer.json"] {
        let out = ck.join("sub/../").join(own).display().to_string();
        std::fs::create_dir_all(ck.join("sub")).unwrap();
        let o = tern(&["export", "--model", &ck_s, "--out", &out], &[]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.contains("--out") && e.contains("inputs") && e.contains(own),
            "{e}"
        );
    }
    assert!(snapshot() == before, "export changed its input checkpoint");

    let data = d.path().join("text.txt");
    write_corpus(&data, 30);
    let o = tern(
        &[
            "eval",
            "--model",
            &ck_s,
            "--data",
            &data.display().to_string(),
            "--ctx",
            "100000",
        ],
        &[],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("--ctx 100000") && e.contains("max_position_embeddings = 512"),
        "{e}"
    );

    let o = tern(
        &[
            "generate",
            "--model",
            &ck_s,
            "-p",
            "the stack",
            "--beams",
            "0",
        ],
        &[],
    );
    let e = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("--beams") && e.contains("at least 1"), "{e}");
    assert!(
        snapshot() == before,
        "a command changed its input checkpoint"
    );
}

#[test]
fn an_unknown_scale_store_is_refused_by_flag_and_by_environment() {
    let o = tern(&["--scales", "bytes", "info"], &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("bytes") && e.contains("byte"), "{e}");
    let o = tern(&["info"], &[("TERN_SCALES", "bytes")]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("TERN_SCALES=bytes: expected f32 or byte"), "{e}");
    for ok in ["f32", "byte"] {
        let o = tern(&["info"], &[("TERN_SCALES", ok)]);
        assert_eq!(o.status.code(), Some(0), "TERN_SCALES={ok}: {}", stderr(&o));
    }
}

#[test]
fn an_unknown_activation_scheme_is_refused_by_flag_and_by_environment() {
    let o = tern(&["--act-quant", "row", "info"], &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("row") && e.contains("per_token"), "{e}");
    let o = tern(&["info"], &[("TERN_ACT_QUANT", "row")]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("TERN_ACT_QUANT=row: expected none or per_token"),
        "{e}"
    );
    for ok in ["none", "per_token"] {
        let o = tern(&["info"], &[("TERN_ACT_QUANT", ok)]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "TERN_ACT_QUANT={ok}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn tokenizer_train_fits_a_bpe_that_train_and_eval_use_with_bits_per_byte() {
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("corpus.txt");
    write_corpus(&corpus, 400);
    let before = std::fs::read(&corpus).unwrap();
    let tok = d.path().join("bpe.json");
    let (c, t) = (corpus.display().to_string(), tok.display().to_string());

    let train_tok = |vocab: &str, out: &str| {
        tern(
            &[
                "tokenizer",
                "train",
                "--data",
                &c,
                "--vocab-size",
                vocab,
                "--out",
                out,
            ],
            &[],
        )
    };

    // Refused: --out naming the input, and a vocabulary below 256 bytes + 26 added tokens.
    let o = train_tok("300", &c);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--out"), "{}", stderr(&o));
    let o = train_tok("100", &t);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("--vocab-size") && !tok.exists(), "{e}");
    let after = std::fs::read(&corpus).unwrap();
    assert_eq!(after, before, "the corpus was modified");

    let o = train_tok("300", &t);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("300 tokens"), "{out}");

    // A scratch model trains on it (EOS from the tokenizer: id 2) and eval reports bits per byte.
    let cfg = d.path().join("cfg.toml");
    let text = tiny_train_config(d.path())
        .replace("vocab_size = 32", "vocab_size = 300")
        .replace(&format!("{}/tok.json", d.path().display()), &t)
        .replace(&format!("{}/train.txt", d.path().display()), &c)
        .replace("steps = 30", "steps = 4");
    std::fs::write(&cfg, text).unwrap();
    let o = tern(
        &["train", "--config", &cfg.display().to_string(), "--quiet"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("bits per byte"));
    let ck = d.path().join("run/checkpoints/step-00000004");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["eos_token_id"], 2, "{config}");
    assert_eq!(config["bos_token_id"], 0, "{config}");
    let o = tern(
        &[
            "eval",
            "--model",
            &ck.display().to_string(),
            "--data",
            &c,
            "--ctx",
            "32",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let expect = v["nll"].as_f64().unwrap()
        / (std::f64::consts::LN_2 * v["bytes_per_token"].as_f64().unwrap());
    assert!((v["bpb"].as_f64().unwrap() - expect).abs() < 1e-9, "{v}");
}
