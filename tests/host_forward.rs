//! The host forward of packed models (`model::host`) against the one forward
//! (`Model::forward`) over the same paged cache: the same logits bit for bit, on prompt chunks,
//! mixed prefill-and-decode steps and decoding, for Qwen3 (q/k norms, tied and untied heads,
//! GQA 2 and 3), Llama (no q/k norms, scaled RoPE) and per-token inputs, with f32 and f16
//! caches. And which models take it.

mod common;
use common::*;

use candle_core::{DType, Device};
use tern::decode::generate::{paged_forward, paged_forward_reference};
use tern::decode::paged::{KvType, PagedKvCache, PagedStep, SeqId};
use tern::gguf::{export_gguf, file::GgufFile, Format};
use tern::kernels::Kernels;
use tern::model::{load_checkpoint, Model};
use tern::quant::{ActQuant, QuantConfig};

/// A checkpoint fixture exported to Q2_0 (inputs quantized as `act` says) and loaded packed.
fn packed(dir: &std::path::Path, act: ActQuant) -> Model {
    let ck = load_checkpoint(dir, DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let q = QuantConfig {
        act_quant: act,
        ..QuantConfig::default()
    };
    export_gguf(&ck.config, &q, &ck.params, None, Format::Q2_0, "t", &out).unwrap();
    let m = tern::gguf::load_model(&GgufFile::read(&out).unwrap()).unwrap();
    assert!(m.runs_on_host(), "{}", dir.display());
    m
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Steps of three sequences through both forwards, each over its own cache: two prompts
/// together (chunks crossing the 4-position blocks), then a step mixing two decoding tokens with
/// a third prompt, then greedy decoding of all three. Every step's logits must be equal.
fn assert_host_equals_one_forward(model: &Model, kv: KvType, what: &str) {
    let c = &model.cfg;
    let new_cache =
        || PagedKvCache::with_type(c.num_hidden_layers, c.kv_heads(), c.head_dim(), 4, kv);
    let (mut host, mut plain) = (new_cache(), new_cache());
    let seqs: Vec<SeqId> = (0..3).map(|_| host.add_seq()).collect();
    for _ in 0..3 {
        plain.add_seq();
    }
    let v = c.vocab_size as u32;
    let prompt =
        |len: u32, seed: u32| -> Vec<u32> { (0..len).map(|i| (i * 37 + seed) % v).collect() };
    let mut batch = vec![(seqs[0], prompt(9, 1)), (seqs[1], prompt(3, 5))];
    for step in 0..12 {
        let got = paged_forward(model, &batch, &mut host).unwrap();
        let want = paged_forward_reference(model, &batch, &mut plain).unwrap();
        let differ = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .position(|(a, b)| a != b);
        assert_eq!(got.len(), want.len(), "{what} {kv:?}: step {step}");
        assert!(
            differ.is_none() && got.concat().len() == want.concat().len(),
            "{what} {kv:?}: step {step}: logit {differ:?} differs"
        );
        let mut next: Vec<(SeqId, Vec<u32>)> = batch
            .iter()
            .zip(&got)
            .map(|((s, _), l)| (*s, vec![argmax(l)]))
            .collect();
        if step == 0 {
            next.push((seqs[2], prompt(6, 11)));
        }
        batch = next;
    }
}

#[test]
fn the_host_forward_equals_the_one_forward_bit_for_bit() {
    let qwen = fixtures_dir();
    let cases = [
        (qwen.join("tied_gqa2"), ActQuant::None),
        (qwen.join("untied_gqa3_bf16"), ActQuant::None),
        (qwen.join("tied_gqa2"), ActQuant::PerToken),
        (llama_fixtures_dir().join("untied_rope3"), ActQuant::None),
    ];
    for (dir, act) in cases {
        let model = packed(&dir, act);
        for kv in [KvType::F32, KvType::F16] {
            assert_host_equals_one_forward(&model, kv, &format!("{} {act:?}", dir.display()));
        }
    }
}

#[test]
fn only_packed_f32_models_with_the_fused_kernels_run_on_the_host() {
    let dir = fixtures_dir().join("tied_gqa2");
    let m = packed(&dir, ActQuant::None);
    assert!(!m.clone().with_kernels(Kernels::Reference).runs_on_host());
    let ck = load_checkpoint(&dir, DType::F32, &Device::Cpu).unwrap();
    let dense = Model::new(&ck.config, QuantConfig::default(), &ck.params)
        .unwrap()
        .freeze()
        .unwrap();
    assert!(!dense.runs_on_host());
    // Asked anyway, it refuses with a reason instead of running another model's forward.
    let mut cache = PagedKvCache::new(1, 1, 1, 1);
    let s = cache.add_seq();
    let (mut step, ids) = PagedStep::new(&mut cache, &[(s, vec![1])]).unwrap();
    let err = dense.host_logits(&ids, &mut step, &[0]).unwrap_err();
    assert!(err.to_string().contains("not packed"), "{err}");
}
