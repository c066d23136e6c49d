//! Decoding modules on real (tiny) Qwen3 models: beam search (greedy at K=1, batching,
//! exhaustive search), paged KV cache and tree speculative decoding against plain decoding.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use tern::decode::beam::{beam_search, BeamConfig, QwenBeams};
use tern::decode::generate::{generate_batch, GenerateConfig};
use tern::decode::sampler::SamplerConfig;
use tern::model::params::Params;
use tern::model::{load_checkpoint, Model};
use tern::quant::QuantConfig;

fn fixture_model(name: &str) -> Model {
    let ck = load_checkpoint(&fixtures_dir().join(name), DType::F32, &Device::Cpu).unwrap();
    Model::new(&ck.config, QuantConfig::default(), &ck.params)
        .unwrap()
        .freeze()
        .unwrap()
}

/// A scratch model with a tiny vocabulary, for exhaustive search.
fn tiny_vocab_model(vocab: usize) -> Model {
    let c = small_config(32, 48, 8, vocab);
    let params = Params::scratch(&c, 11, DType::F32, &Device::Cpu).unwrap();
    // Scratch init is near-uniform; sharpen it so the search has something to find.
    let params = Params::from_tensors(
        params
            .iter()
            .map(|(n, v)| (n.clone(), (v.as_tensor() * 8.0).unwrap())),
    )
    .unwrap();
    Model::new(&c, QuantConfig::full_precision(), &params)
        .unwrap()
        .freeze()
        .unwrap()
}

#[test]
fn beam_search_with_one_beam_and_no_penalty_is_greedy() {
    let m = fixture_model("untied_gqa3_bf16");
    let prompts = vec![vec![5u32, 17, 42], vec![100, 3, 9, 250, 7]];
    let greedy = generate_batch(
        &m,
        &prompts,
        &GenerateConfig {
            max_new: 10,
            sampler: SamplerConfig::default(),
            eos: vec![],
        },
        |_, _| false,
    )
    .unwrap();
    let beams = beam_search(
        &mut QwenBeams::new(&m),
        &prompts,
        &BeamConfig {
            beams: 1,
            length_penalty: 0.0,
            max_new: 10,
            eos: vec![],
        },
    )
    .unwrap();
    for (g, b) in greedy.iter().zip(&beams) {
        assert_eq!(g.0, b[0].tokens);
    }
}

#[test]
fn batched_beam_search_equals_each_prompt_alone() {
    let m = fixture_model("tied_gqa2");
    let prompts = vec![vec![5u32, 17, 42], vec![100, 3, 9, 250, 7]];
    let cfg = BeamConfig {
        beams: 3,
        length_penalty: 1.0,
        max_new: 6,
        eos: vec![2],
    };
    let together = beam_search(&mut QwenBeams::new(&m), &prompts, &cfg).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = beam_search(&mut QwenBeams::new(&m), std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(together[i].len(), 3);
        for (a, b) in together[i].iter().zip(&alone[0]) {
            assert_eq!(a.tokens, b.tokens, "prompt {i}");
            assert!(
                (a.score - b.score).abs() < 1e-4,
                "prompt {i}: {} vs {}",
                a.score,
                b.score
            );
        }
    }
}

/// Log-probability of `seq` after `prompt` by one full forward (no cache).
fn sequence_logprob(m: &Model, prompt: &[u32], seq: &[u32]) -> f64 {
    let all: Vec<u32> = prompt.iter().chain(seq).copied().collect();
    let logits = m
        .full_logits(
            &Tensor::new(all.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let lp = candle_nn::ops::log_softmax(&logits.squeeze(0).unwrap(), 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    seq.iter()
        .enumerate()
        .map(|(i, &t)| lp[prompt.len() - 1 + i][t as usize] as f64)
        .sum()
}

#[test]
fn beam_search_with_enough_beams_equals_exhaustive_search() {
    let (vocab, len, eos, a) = (5usize, 3usize, 0u32, 1.0f64);
    let m = tiny_vocab_model(vocab);
    let prompt = vec![3u32, 1, 4];
    // Every sequence that ends at EOS or reaches the length limit.
    let mut all: Vec<Vec<u32>> = vec![];
    let mut frontier: Vec<Vec<u32>> = vec![vec![]];
    for _ in 0..len {
        let mut next = vec![];
        for s in &frontier {
            for t in 0..vocab as u32 {
                let mut c = s.clone();
                c.push(t);
                if t == eos || c.len() == len {
                    all.push(c);
                } else {
                    next.push(c);
                }
            }
        }
        frontier = next;
    }
    let mut scored: Vec<(f64, Vec<u32>)> = all
        .into_iter()
        .map(|s| {
            (
                sequence_logprob(&m, &prompt, &s) / (s.len() as f64).powf(a),
                s,
            )
        })
        .collect();
    scored.sort_by(|x, y| y.0.total_cmp(&x.0));
    let k = 4;
    let cfg = BeamConfig {
        beams: vocab.pow(len as u32),
        length_penalty: a,
        max_new: len,
        eos: vec![eos],
    };
    let out = beam_search(&mut QwenBeams::new(&m), std::slice::from_ref(&prompt), &cfg).unwrap();
    for (h, (s, toks)) in out[0].iter().zip(&scored).take(k) {
        assert_eq!(&h.tokens, toks);
        assert!((h.score - s).abs() < 1e-4, "{} vs {s}", h.score);
    }
}

#[test]
fn speculative_greedy_equals_plain_greedy_token_for_token() {
    use tern::decode::speculative::{generate_speculative, Drafter};
    let target = fixture_model("untied_gqa3_bf16");
    // Draft: the same checkpoint in full precision (the target is its ternary projection).
    let ck = load_checkpoint(
        &fixtures_dir().join("untied_gqa3_bf16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let draft = Model::new(&ck.config, QuantConfig::full_precision(), &ck.params)
        .unwrap()
        .freeze()
        .unwrap();
    // A repetitive prompt so prompt lookup finds matches.
    let prompt: Vec<u32> = [5u32, 17, 42, 9, 5, 17, 42, 9, 5, 17].to_vec();
    let n = 24;
    let plain = generate_batch(
        &target,
        std::slice::from_ref(&prompt),
        &GenerateConfig {
            max_new: n,
            sampler: SamplerConfig::default(),
            eos: vec![],
        },
        |_, _| false,
    )
    .unwrap();
    for (depth, width) in [(1, 1), (3, 2), (5, 4)] {
        let (spec, stats) =
            generate_speculative(&target, &mut Drafter::Ngram, &prompt, n, depth, width, &[])
                .unwrap();
        assert_eq!(spec, plain[0].0, "ngram depth {depth} width {width}");
        assert!(stats.rounds <= n);
        let mut d = Drafter::Model {
            model: &draft,
            cache: tern::model::KvCache::new(draft.cfg.num_hidden_layers),
        };
        let (spec, _) =
            generate_speculative(&target, &mut d, &prompt, n, depth, width, &[]).unwrap();
        assert_eq!(spec, plain[0].0, "draft model depth {depth} width {width}");
    }
    // The target as its own draft accepts every drafted chain token.
    let mut d = Drafter::Model {
        model: &target,
        cache: tern::model::KvCache::new(target.cfg.num_hidden_layers),
    };
    let (spec, stats) = generate_speculative(&target, &mut d, &prompt, n, 4, 1, &[]).unwrap();
    assert_eq!(spec, plain[0].0);
    assert!(stats.mean_accepted_length() > 4.0, "{stats:?}");
}

#[test]
fn paged_kv_cache_generation_equals_the_contiguous_cache() {
    use tern::decode::generate::generate_paged;
    for name in ["untied_gqa3_bf16", "tied_gqa2"] {
        let m = fixture_model(name);
        let prompts = vec![
            vec![5u32, 17, 42],
            vec![100, 3, 9, 250, 7, 81, 12],
            vec![64, 64, 1, 200, 33],
        ];
        for sampler in [
            SamplerConfig::default(),
            SamplerConfig {
                temp: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed: 3,
                ..Default::default()
            },
            // The repetition penalty sees each row's own prompt and tokens in both caches.
            SamplerConfig {
                temp: 0.0,
                repeat_penalty: 1.5,
                repeat_last_n: 8,
                ..Default::default()
            },
        ] {
            let cfg = GenerateConfig {
                max_new: 20,
                sampler,
                eos: vec![],
            };
            let contiguous = generate_batch(&m, &prompts, &cfg, |_, _| false).unwrap();
            for block in [1, 4, 16] {
                let paged = generate_paged(
                    &m,
                    &prompts,
                    &cfg,
                    block,
                    tern::decode::paged::KvType::F32,
                    |_, _| false,
                )
                .unwrap();
                assert_eq!(paged, contiguous, "{name} block {block} {sampler:?}");
            }
        }
    }
}
