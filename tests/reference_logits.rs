//! tern's Qwen3 against transformers: fixtures written by scripts/make_fixtures.py are loaded
//! through the same loader as hub checkpoints and must reproduce transformers' logits.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use tern::hub::{resolve_model_dir, HubOptions};
use tern::model::{load_checkpoint, KvCache, Model};
use tern::quant::{QuantConfig, ScaleRule};

const TOL: f32 = 1e-4;

fn model_for(dir: &std::path::Path, quant: QuantConfig) -> Model {
    let ck = load_checkpoint(dir, DType::F32, &Device::Cpu).expect("fixture loads");
    Model::new(&ck.config, quant, &ck.params).unwrap()
}

#[test]
fn full_precision_logits_match_transformers() {
    for name in FIXTURES {
        let exp = expected(name);
        let m = model_for(&fixtures_dir().join(name), QuantConfig::full_precision());
        let logits = m.full_logits(&input_ids(&exp)).unwrap();
        let d = max_abs_diff(&logits, &exp["logits_full"]);
        assert!(d < TOL, "{name}: max |diff| = {d}");
    }
}

#[test]
fn ternary_logits_match_transformers_ternarized_by_the_script() {
    for name in FIXTURES {
        let exp = expected(name);
        for (rule, key) in [
            (ScaleRule::MeanAbs, "logits_ternary_mean_abs"),
            (ScaleRule::MaxAbs, "logits_ternary_max_abs"),
        ] {
            let q = QuantConfig {
                scale: rule,
                ..QuantConfig::default()
            };
            let m = model_for(&fixtures_dir().join(name), q);
            let logits = m.full_logits(&input_ids(&exp)).unwrap();
            let d = max_abs_diff(&logits, &exp[key]);
            assert!(d < TOL, "{name} {rule}: max |diff| = {d}");
            // The ternary model is a different function from the full-precision one.
            assert!(
                max_abs_diff(&logits, &exp["logits_full"]) > 1e-2,
                "{name}: ternary == full?"
            );
        }
    }
}

/// Lays a fixture out as the hub cache does: models--org--name/{refs/main, snapshots/<sha>/...}.
fn fake_hub_cache(root: &std::path::Path, id: &str, fixture: &str) {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    let sha = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    copy_dir(
        &fixtures_dir().join(fixture),
        &repo.join("snapshots").join(sha),
    );
}

#[test]
fn hub_id_loads_from_the_cache_offline_through_the_same_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        cache_dir: tmp.path().to_path_buf(),
        offline: true,
        revision: "main".into(),
    };
    for (i, name) in FIXTURES.iter().enumerate() {
        let id = format!("tern-test/fixture{i}");
        fake_hub_cache(tmp.path(), &id, name);
        let dir = resolve_model_dir(&id, &opts).expect("resolves offline from the cache");
        let exp = expected(name);
        let m = model_for(&dir, QuantConfig::full_precision());
        let d = max_abs_diff(
            &m.full_logits(&input_ids(&exp)).unwrap(),
            &exp["logits_full"],
        );
        assert!(d < TOL, "{name} via hub cache: {d}");
    }
    let err = resolve_model_dir("tern-test/not-cached", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("config.json") && err.contains("not-cached"),
        "{err}"
    );
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    for name in FIXTURES {
        let exp = expected(name);
        let ids = input_ids(&exp);
        let m = model_for(&fixtures_dir().join(name), QuantConfig::default())
            .freeze()
            .unwrap();
        let full = m.full_logits(&ids).unwrap();
        let mut cache = KvCache::new(m.cfg.num_hidden_layers);
        let t = ids.dim(1).unwrap();
        let mut parts = vec![m
            .logits(
                &m.forward(&ids.narrow(1, 0, 7).unwrap(), &mut cache)
                    .unwrap(),
            )
            .unwrap()];
        for i in 7..t {
            parts.push(
                m.logits(
                    &m.forward(&ids.narrow(1, i, 1).unwrap(), &mut cache)
                        .unwrap(),
                )
                .unwrap(),
            );
        }
        assert_eq!(cache.len(), t);
        let inc = Tensor::cat(&parts, 1).unwrap();
        let d = max_abs_diff(&inc, &full);
        assert!(d < TOL, "{name}: cached vs full {d}");
        // Frozen ternary equals the ternary reference too.
        assert!(max_abs_diff(&full, &exp["logits_ternary_mean_abs"]) < TOL);
        // Rollback: truncate to 10 and re-decode position 10.
        cache.truncate(10).unwrap();
        let again = m
            .logits(
                &m.forward(&ids.narrow(1, 10, 1).unwrap(), &mut cache)
                    .unwrap(),
            )
            .unwrap();
        assert!(max_abs_diff(&again, &full.narrow(1, 10, 1).unwrap()) < TOL);
    }
}
