//! `tern export --model M --out model.gguf [--format q2_0|pq2_0|f16|f32] [--precision ternary|full]`

use anyhow::Result;
use std::path::PathBuf;
use tern::gguf::Format;
use tern::runtime::Precision;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// tern checkpoint dir, HF-layout dir, hub id or GGUF file (dequantized).
    #[arg(long)]
    model: String,
    /// The GGUF file to write (never one of the model's own files).
    #[arg(long)]
    out: PathBuf,
    /// q2_0 (ggml type 42), pq2_0 (PrismML type 142), f16 or f32.
    #[arg(long, value_enum, default_value_t = Format::Q2_0)]
    format: Format,
    #[arg(long, value_enum, default_value_t = Precision::Ternary)]
    precision: Precision,
}

pub fn run(a: Args) -> Result<i32> {
    let ck = super::load_latents(&a.model)?;
    tern::files::ensure_not_an_input(&a.out, &ck.inputs, "--out")?;
    let quant = tern::quant::QuantConfig {
        ternary: a.precision == Precision::Ternary,
        ..ck.quant.unwrap_or_default()
    };
    let name = ck.name();
    let r = tern::gguf::export_gguf(
        &ck.config,
        &quant,
        &ck.params,
        ck.tokenizer.as_ref(),
        a.format,
        &name,
        &a.out,
    )?;
    println!(
        "wrote {} ({} bytes, {:.2} MiB)",
        a.out.display(),
        r.bytes,
        r.bytes as f64 / (1u64 << 20) as f64
    );
    println!(
        "{} weights: {:.3} bits per weight in tensor data, {:.3} over the whole file (metadata and tokenizer \
         included); {:.3}x the size of the same model as F16 GGUF ({} bytes)",
        r.weights, r.data_bits_per_weight, r.bits_per_weight, r.ratio_to_f16, r.f16_bytes
    );
    Ok(0)
}
