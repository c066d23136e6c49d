//! `tern train --config FILE [--set section.key=value]... [--resume [DIR]] [--quiet]`

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The TOML config (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the newest checkpoint in DIR (default: the config's train.out_dir).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    resume: Option<String>,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
}

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT), after its checkpoint is saved.
const EXIT_INTERRUPTED: i32 = 130;

pub fn run(a: Args) -> Result<i32> {
    let cfg = tern::train::TrainConfig::load(&a.config, &a.set)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second Ctrl-C: exiting without a checkpoint");
            std::process::exit(EXIT_INTERRUPTED);
        }
        eprintln!("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    let resume = a.resume.map(|r| {
        if r.is_empty() {
            cfg.train.out_dir.clone()
        } else {
            PathBuf::from(r)
        }
    });
    let opts = tern::train::TrainOptions {
        resume,
        interrupt,
        progress: !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    let out = tern::train::train(&cfg, opts)?;
    print_summary(&out.summary);
    if out.interrupted {
        eprintln!(
            "interrupted at step {}; resume with --resume",
            out.last_step
        );
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(0)
}

fn print_summary(s: &serde_json::Value) {
    let f = |k: &str| {
        s.get(k)
            .and_then(|v| v.as_f64())
            .map(|v| format!("{v:.4}"))
            .unwrap_or("-".into())
    };
    println!(
        "steps {} | tokens seen {} | {} tokens/s | wall {} s",
        s["steps"],
        s["tokens_seen"],
        f("tokens_per_sec"),
        f("elapsed_s")
    );
    println!(
        "train loss {} -> {} (mean of last 10: {})",
        f("train_loss_first"),
        f("train_loss_last"),
        f("train_loss_last10_mean")
    );
    println!(
        "val loss {} -> {} | val PPL {} -> {} | bits per byte {} -> {}",
        f("val_loss_first"),
        f("val_loss"),
        f("val_ppl_first"),
        f("val_ppl"),
        f("val_bpb_first"),
        f("val_bpb")
    );
    let t = &s["ternary_check"];
    let share = |k: &str| t[k].as_f64().unwrap_or(0.0);
    println!(
        "ternary check: {} ({} groups, {} bad) | share -1 {:.3}, 0 {:.3}, +1 {:.3}",
        if t["ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "FAILED"
        },
        t["groups"],
        t["bad_groups"],
        share("share_minus1"),
        share("share_zero"),
        share("share_plus1")
    );
    for (key, label) in [
        ("samples", "sample (greedy)"),
        ("samples_sampled", "sample (temp 0.8)"),
    ] {
        for x in s[key].as_array().into_iter().flatten() {
            println!(
                "{label}: {}{}",
                x["prompt"].as_str().unwrap_or(""),
                x["text"].as_str().unwrap_or("")
            );
            println!(
                "  (first 32 words: {:.0}% distinct, longest repeat {})",
                100.0 * x["distinct_word_share"].as_f64().unwrap_or(0.0),
                x["longest_word_run"]
            );
        }
    }
    println!("checkpoint: {}", s["checkpoint"].as_str().unwrap_or("-"));
}
