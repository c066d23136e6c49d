//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3")
}

pub const FIXTURES: [&str; 3] = ["tied_gqa2", "untied_gqa3_bf16", "hidden96_sharded_f16"];

/// The expected tensors transformers wrote for fixture `name`.
pub fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    let p = fixtures_dir().join(format!("{name}.expected.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).expect("expected logits file")
}

pub fn input_ids(exp: &std::collections::HashMap<String, Tensor>) -> Tensor {
    exp["input_ids"].to_dtype(DType::U32).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Copies a directory's files (not recursive).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}
