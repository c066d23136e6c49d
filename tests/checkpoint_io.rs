//! Loader errors are clear (they name the file and the tensor, expected vs found), and tern's own
//! checkpoints round-trip through the same loader.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tern::model::{load_checkpoint, params::Params, save_checkpoint, Model};
use tern::quant::{QuantConfig, ScaleRule};

fn fixture_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures_dir().join(name), tmp.path());
    tmp
}

fn load_err(dir: &Path) -> String {
    match load_checkpoint(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn tensors_of(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

#[test]
fn missing_files_are_named() {
    let d = fixture_copy("tied_gqa2");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("no model.safetensors") && e.contains(&d.path().display().to_string()),
        "{e}"
    );
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert!(load_err(d.path()).contains("missing config.json"));
    assert!(load_err(&d.path().join("nope")).contains("not a directory"));
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let d = fixture_copy("tied_gqa2");
    let f = d.path().join("model.safetensors");
    let mut t = tensors_of(&f);
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&t, &f).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("missing 1 tensor(s): model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );

    let mut t = tensors_of(&fixtures_dir().join("tied_gqa2/model.safetensors"));
    t.insert(
        "model.layers.7.self_attn.q_proj.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &f).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("unexpected") && e.contains("model.layers.7.self_attn.q_proj.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let d = fixture_copy("tied_gqa2");
    let f = d.path().join("model.safetensors");
    let mut t = tensors_of(&f);
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((64, 96), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &f).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("expected shape [64, 128], found [64, 96]"),
        "{e}"
    );
}

#[test]
fn truncated_or_garbage_safetensors_is_a_clear_error() {
    let d = fixture_copy("tied_gqa2");
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("cannot read safetensors"),
        "{e}"
    );
    std::fs::write(&f, b"not a safetensors file at all").unwrap();
    assert!(load_err(d.path()).contains("cannot read safetensors"));
    std::fs::write(&f, []).unwrap();
    assert!(load_err(d.path()).contains("cannot read safetensors"));
}

#[test]
fn broken_index_and_config_are_named() {
    let d = fixture_copy("hidden96_sharded_f16");
    std::fs::remove_file(d.path().join("model-00002-of-00005.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00002-of-00005.safetensors"),
        "{e}"
    );

    let d = fixture_copy("tied_gqa2");
    std::fs::write(d.path().join("config.json"), "{ \"hidden_size\": 128, ").unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
    std::fs::write(d.path().join("config.json"), r#"{"hidden_size": "wide"}"#).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}

#[test]
fn nan_weights_are_refused() {
    let d = fixture_copy("tied_gqa2");
    let f = d.path().join("model.safetensors");
    let mut t = tensors_of(&f);
    let bad = Tensor::full(f32::NAN, (128,), &Device::Cpu).unwrap();
    t.insert("model.norm.weight".into(), bad);
    candle_core::safetensors::save(&t, &f).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.norm.weight") && e.contains("NaN"), "{e}");
}

#[test]
fn saved_checkpoint_round_trips_through_the_same_loader() {
    let src = load_checkpoint(
        &fixtures_dir().join("untied_gqa3_bf16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let q = QuantConfig {
        scale: ScaleRule::MaxAbs,
        group_size: 64,
        ..QuantConfig::default()
    };
    save_checkpoint(out.path(), &src.config, &q, &src.params, None).unwrap();
    let back = load_checkpoint(out.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config, src.config);
    assert_eq!(back.quant, Some(q));
    for (name, var) in src.params.iter() {
        let d = max_abs_diff(var.as_tensor(), back.params.var(name).unwrap().as_tensor());
        assert_eq!(d, 0.0, "{name} changed in the round trip");
    }
    let exp = expected("untied_gqa3_bf16");
    let m = Model::new(&back.config, QuantConfig::full_precision(), &back.params).unwrap();
    assert!(
        max_abs_diff(
            &m.full_logits(&input_ids(&exp)).unwrap(),
            &exp["logits_full"]
        ) < 1e-4
    );
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn scratch_init_is_deterministic_and_scaled_by_fan_in() {
    let cfg =
        tern::model::ModelConfig::from_json_file(&fixtures_dir().join("tied_gqa2/config.json"))
            .unwrap();
    let a = Params::scratch(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let b = Params::scratch(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let c = Params::scratch(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let w = |p: &Params, n: &str| p.tensor(n).unwrap();
    let name = "model.layers.0.mlp.down_proj.weight"; // fan_in = intermediate_size = 256
    assert_eq!(max_abs_diff(&w(&a, name), &w(&b, name)), 0.0);
    assert!(max_abs_diff(&w(&a, name), &w(&c, name)) > 0.0);
    let std = w(&a, name)
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!(
        (std - 256f32.powf(-0.5)).abs() < 0.01 * 256f32.powf(-0.5) * 5.0,
        "std {std}"
    );
    let norm = w(&a, "model.layers.0.input_layernorm.weight")
        .to_vec1::<f32>()
        .unwrap();
    assert!(norm.iter().all(|x| *x == 1.0));
}
