//! `tern plot --out FILE.png --run NAME=RUN_DIR [--run ...] [--title T]`

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// NAME=RUN_DIR (its metrics.jsonl), repeatable.
    #[arg(long = "run", required = true)]
    runs: Vec<String>,
    #[arg(long, default_value = "tern: validation loss")]
    title: String,
}

pub fn run(a: Args) -> Result<i32> {
    let mut curves = Vec::new();
    let mut inputs = Vec::new();
    for r in &a.runs {
        let (name, dir) = r
            .split_once('=')
            .with_context(|| format!("--run '{r}': expected NAME=RUN_DIR"))?;
        let path = Path::new(dir).join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--run {name}: reading {}", path.display()))?;
        let mut pts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            if let (Some(step), Some(loss)) = (
                v.get("step").and_then(|s| s.as_u64()),
                v.get("val_loss").and_then(|s| s.as_f64()),
            ) {
                pts.push((step as usize, loss));
            }
        }
        anyhow::ensure!(!pts.is_empty(), "{}: no val_loss rows", path.display());
        curves.push((name.to_string(), pts));
        inputs.push(path);
    }
    tern::files::ensure_not_an_input(&a.out, &inputs, "--out")?;
    tern::plot::plot_curves(&a.out, &a.title, &curves)?;
    println!("wrote {}", a.out.display());
    Ok(0)
}
