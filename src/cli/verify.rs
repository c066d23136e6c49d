//! `tern verify --model CHECKPOINT | --model FILE.gguf [--source CHECKPOINT] [--json]`

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint dir / hub id, or a .gguf file.
    #[arg(long)]
    model: String,
    /// For a GGUF: the checkpoint it was exported from.
    #[arg(long)]
    source: Option<String>,
    #[arg(long)]
    json: bool,
}

/// One checked tensor.
struct Row {
    name: String,
    groups: usize,
    shares: [f64; 3],
    max_deviation: f64,
    problems: Vec<String>,
}

pub fn run(a: Args) -> Result<i32> {
    let rows = if super::is_gguf(&a.model) {
        gguf_rows(&a.model, a.source.as_deref())?
    } else {
        checkpoint_rows(&a)?
    };
    let failed = rows.iter().filter(|r| !r.problems.is_empty()).count();
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"tensor": r.name, "groups": r.groups, "share_minus1": r.shares[0], "share_zero": r.shares[1],
                    "share_plus1": r.shares[2], "max_deviation": r.max_deviation, "problems": r.problems})
            })
            .collect();
        println!("{}", serde_json::json!({"ok": failed == 0, "tensors": v}));
    } else {
        println!(
            "{:<44} {:>9} {:>7} {:>7} {:>7} {:>10}  status",
            "tensor", "groups", "-1", "0", "+1", "max dev"
        );
        for r in &rows {
            let status = if r.problems.is_empty() {
                "ok".to_string()
            } else {
                format!("FAIL: {}", r.problems.join("; "))
            };
            let [m, z, p] = r.shares;
            println!(
                "{:<44} {:>9} {m:>7.4} {z:>7.4} {p:>7.4} {:>10.2e}  {status}",
                r.name, r.groups, r.max_deviation
            );
        }
        println!("{} tensors checked, {failed} failed", rows.len());
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

fn gguf_rows(model: &str, source: Option<&str>) -> Result<Vec<Row>> {
    let file = tern::gguf::GgufFile::read(std::path::Path::new(model))?;
    let src = source.map(super::load_latents).transpose()?;
    let q = src.as_ref().map(|c| c.quant.unwrap_or_default());
    let checks = tern::gguf::verify_gguf(&file, src.as_ref().map(|c| &c.params).zip(q.as_ref()))?;
    anyhow::ensure!(
        !checks.is_empty(),
        "{model}: no Q2_0/PQ2_0 tensors to verify"
    );
    Ok(checks
        .into_iter()
        .map(|c| Row {
            name: c.name,
            groups: c.groups,
            shares: c.shares,
            max_deviation: 0.0,
            problems: c.problems,
        })
        .collect())
}

fn checkpoint_rows(a: &Args) -> Result<Vec<Row>> {
    anyhow::ensure!(
        a.source.is_none(),
        "--source applies to a .gguf --model only"
    );
    let ck = super::load_latents(&a.model)?;
    let (_, per) = tern::train::trainer::verify_model(&ck.params, &ck.quant.unwrap_or_default())?;
    Ok(per
        .into_iter()
        .map(|(name, r)| {
            let problems = if r.ok() {
                vec![]
            } else {
                vec![format!("{} groups are not {{-s, 0, +s}}", r.bad_groups)]
            };
            Row {
                name,
                groups: r.groups,
                shares: r.shares(),
                max_deviation: r.max_deviation,
                problems,
            }
        })
        .collect())
}
