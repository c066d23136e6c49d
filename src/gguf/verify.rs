//! GGUF -> checks: every packed block is ternary with one finite scale per group, and, given
//! the source checkpoint, equal to its projection exactly (the scale rounded to f16).

use super::file::GgufFile;
use crate::error::Result;
use crate::model::params::gguf_name;
use crate::model::Params;
use crate::quant::codec::{self as q2, Packing};
use crate::quant::projection::codes_and_scales;
use crate::quant::QuantConfig;
use candle_core::DType;
use half::f16;

/// Result of checking one GGUF tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub groups: usize,
    pub shares: [f64; 3],
    pub problems: Vec<String>,
}

/// Checks every packed tensor of a GGUF: codes in {-1, 0, +1}, finite non-negative scales, one
/// scale per `tern.group_size` group; with `source`, that codes and scales equal the source
/// projection exactly (scale rounded to f16).
pub fn verify_gguf(
    file: &GgufFile,
    source: Option<(&Params, &QuantConfig)>,
) -> Result<Vec<TensorCheck>> {
    let group = file
        .get("tern.group_size")
        .and_then(|v| v.as_u64())
        .map(|g| g as usize);
    // A Llama file holds q/k rows interleaved (llama.cpp's RoPE order): compare in that order.
    let cfg = super::load::config_from_gguf(file).ok();
    let file_order = |hf: &str, rows: usize| -> Option<Vec<usize>> {
        let cfg = cfg.as_ref()?;
        super::load::rope_interleaved(cfg, hf)
            .then(|| super::load::inverse(&super::load::llama_rope_rows(rows, cfg.head_dim())))
    };
    let mut out = Vec::new();
    let by_gguf: std::collections::HashMap<String, &str> = match source {
        Some((p, _)) => p
            .iter()
            .filter_map(|(n, _)| gguf_name(n).ok().map(|g| (g, n.as_str())))
            .collect(),
        None => Default::default(),
    };
    for t in &file.tensors {
        let Some(p) = Packing::from_ggml_type(t.ggml_type) else {
            continue;
        };
        let (rows, cols) = t.rows_cols();
        let data = file.data(t);
        let mut chk = TensorCheck {
            name: t.name.clone(),
            groups: 0,
            shares: [0.0; 3],
            problems: vec![],
        };
        let mut counts = [0u64; 3];
        let src = match (source, by_gguf.get(&t.name)) {
            (Some((params, q)), Some(hf)) => {
                let w = params.tensor(hf)?.to_dtype(DType::F32)?;
                if w.dims() != [rows, cols] {
                    chk.problems.push(format!(
                        "shape [{rows}, {cols}] but the source has {:?}",
                        w.dims()
                    ));
                    out.push(chk);
                    continue;
                }
                let (c, s) = codes_and_scales(&w, q.group_size, q.scale)?;
                let (mut c, mut s) = (c.to_vec2::<f32>()?, s.to_vec2::<f32>()?);
                if let Some(order) = file_order(hf, rows) {
                    c = order.iter().map(|&i| c[i].clone()).collect();
                    s = order.iter().map(|&i| s[i].clone()).collect();
                }
                Some((c, s, q.group_size))
            }
            (Some(_), None) => {
                chk.problems
                    .push("no such tensor in the source checkpoint".into());
                None
            }
            _ => None,
        };
        let g = src.as_ref().map(|s| s.2).or(group).unwrap_or(p.block());
        for r in 0..rows {
            let row = &data[r * p.row_bytes(cols)..(r + 1) * p.row_bytes(cols)];
            let (codes, scales) = q2::unpack_row(row, cols, p);
            if let Some(j) = codes.iter().position(|&c| c == 2) {
                if chk.problems.len() < 5 {
                    chk.problems
                        .push(format!("row {r} col {j}: code 3 (+2), not ternary"));
                }
            }
            for &c in &codes {
                if (-1..=1).contains(&c) {
                    counts[(c + 1) as usize] += 1;
                }
            }
            let per_group = g / p.block();
            for (gi, sc) in scales.chunks(per_group.max(1)).enumerate() {
                chk.groups += 1;
                if (sc.iter().any(|x| !x.is_finite() || *x < 0.0)
                    || sc.iter().any(|x| x.to_bits() != sc[0].to_bits()))
                    && chk.problems.len() < 5
                {
                    chk.problems.push(format!(
                        "row {r} group {gi}: scales {sc:?} are not one finite non-negative value"
                    ));
                }
            }
            if let Some((sc, ss, sg)) = &src {
                let code_bad = codes.iter().zip(&sc[r]).position(|(&a, &b)| a as f32 != b);
                if let Some(j) = code_bad {
                    if chk.problems.len() < 5 {
                        chk.problems.push(format!(
                            "row {r} col {j}: code {} but the source projection has {}",
                            codes[j], sc[r][j]
                        ));
                    }
                }
                for (bi, &d) in scales.iter().enumerate() {
                    let want = f16::from_f32(ss[r][bi * p.block() / sg]).to_f32();
                    if d.to_bits() != want.to_bits() && chk.problems.len() < 5 {
                        chk.problems.push(format!(
                            "row {r} block {bi}: scale {d} but the source's is {want}"
                        ));
                    }
                }
            }
        }
        let n = counts.iter().sum::<u64>().max(1) as f64;
        chk.shares = [
            counts[0] as f64 / n,
            counts[1] as f64 / n,
            counts[2] as f64 / n,
        ];
        out.push(chk);
    }
    if let Some((params, _)) = source {
        for (hf, _) in params.iter() {
            let g = gguf_name(hf)?;
            if file.tensor(&g).is_none() {
                out.push(TensorCheck {
                    name: g,
                    groups: 0,
                    shares: [0.0; 3],
                    problems: vec!["missing from the GGUF".into()],
                });
            }
        }
    }
    Ok(out)
}
