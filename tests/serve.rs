//! Serving: the continuous-batching engine against requests run alone (token for token, with
//! requests arriving mid-flight, chunked prefill, a client that leaves), the HTTP layer on a tiny
//! model over real sockets (statuses, OpenAI-style errors, streams), and a real OpenAI client
//! (PyPI's `openai`) driving `tern serve` on SmolLM2 (skipped, with the reason, when Python, the
//! package or the GGUF is missing; TERN_REQUIRE_OPENAI / TERN_REQUIRE_SMOLLM2 make that a
//! failure).

mod common;
use common::*;

use candle_core::{DType, Device};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use tern::decode::generate::{generate_paged, Finish, GenerateConfig};
use tern::decode::paged::KvType;
use tern::decode::sampler::SamplerConfig;
use tern::model::params::Params;
use tern::model::Model;
use tern::quant::QuantConfig;
use tern::serve::engine::{Done, Engine, EngineConfig, Event, GenRequest, Sink};
use tern::tokenizer::Tokenizer;

/// The weights of a scratch model whose vocabulary is the word tokenizer's (sharpened so greedy
/// choices are not near ties), its config, and that tokenizer (written to `dir/tok.json`).
fn tiny_parts(dir: &std::path::Path) -> (tern::model::ModelConfig, Params, Tokenizer) {
    let path = dir.join("tok.json");
    write_word_tokenizer(&path, &WORDS);
    let tok = Tokenizer::from_file(&path).unwrap();
    let c = small_config(32, 64, 8, WORDS.len() + 1);
    let p = Params::scratch(&c, 5, DType::F32, &Device::Cpu).unwrap();
    let p = Params::from_tensors(
        p.iter()
            .map(|(n, v)| (n.clone(), (v.as_tensor() * 6.0).unwrap())),
    )
    .unwrap();
    (c, p, tok)
}

/// That model, ternary and frozen for inference, and its tokenizer.
fn tiny(dir: &std::path::Path) -> (Arc<Model>, Arc<Tokenizer>) {
    let (c, p, tok) = tiny_parts(dir);
    let m = Model::new(&c, QuantConfig::default(), &p)
        .unwrap()
        .freeze()
        .unwrap();
    (Arc::new(m), Arc::new(tok))
}

/// What one request received: its tokens (in order), text, and end.
#[derive(Debug, Default, Clone, PartialEq)]
struct Got {
    tokens: Vec<u32>,
    text: String,
    done: Option<Done>,
    error: Option<String>,
}

/// A sink recording into `got`; it refuses events after `leave_after` of them (a client that
/// went away).
fn recorder(got: Arc<Mutex<Got>>, leave_after: Option<usize>) -> Sink {
    let mut seen = 0;
    Box::new(move |ev| {
        seen += 1;
        if leave_after.is_some_and(|n| seen > n) {
            return false;
        }
        let mut g = got.lock().unwrap();
        match ev {
            Event::Text { text, tokens, .. } => {
                g.text += &text;
                g.tokens.extend(tokens);
            }
            Event::Done(d) => g.done = Some(d),
            Event::Error(e) => g.error = Some(e),
        }
        true
    })
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampler: SamplerConfig) -> GenRequest {
    GenRequest {
        prompt,
        max_tokens,
        sampler,
        ..Default::default()
    }
}

fn sampled(seed: u64) -> SamplerConfig {
    SamplerConfig {
        temp: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..Default::default()
    }
}

/// Runs one request alone on a fresh engine.
/// KV block size of every engine and paged generation in these tests. One size everywhere: the
/// online softmax rescales per block, so another block size gives other last bits, and a near
/// tie in a sampled or greedy choice could then differ for that reason alone.
const BLOCK: usize = 4;

fn alone(model: &Arc<Model>, tok: &Arc<Tokenizer>, req: GenRequest, kv_type: KvType) -> Got {
    let cfg = EngineConfig {
        kv_type,
        block_size: BLOCK,
        ..Default::default()
    };
    let mut e = Engine::new(model.clone(), tok.clone(), cfg).unwrap();
    let got = Arc::new(Mutex::new(Got::default()));
    e.submit(req, recorder(got.clone(), None));
    while e.busy() {
        e.step().unwrap();
    }
    assert_eq!(e.kv_blocks_in_use(), 0);
    let g = got.lock().unwrap().clone();
    g
}

#[test]
fn batched_equals_alone_with_requests_arriving_mid_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = tiny(dir.path());
    batched_equals_alone(&model, &tok, KvType::F32);
}

/// The same on a packed Q2_0 model (tern's export of a fixture, run by the int8-activation
/// kernels: a decode token alone takes the one-token path, batched it takes the tiled one), with
/// the exact cache and with the f16 one `tern serve` uses by default. Every vector kernel gives
/// a row the same bits alone and in any tile (the kernels' own test), so this holds exactly
/// under any `TERN_ISA`; on an AMX CPU a step of 5 or more tokens runs AMX tiles, which round
/// differently in the last bits, and the test then also requires that no choice here sits on
/// such a near tie.
#[test]
fn batched_equals_alone_on_a_packed_gguf_model() {
    use tern::gguf::{export_gguf, file::GgufFile, Format};
    let dir = tempfile::tempdir().unwrap();
    let ck =
        tern::model::load_checkpoint(&fixtures_dir().join("tied_gqa2"), DType::F32, &Device::Cpu)
            .unwrap();
    let out = dir.path().join("m.gguf");
    export_gguf(
        &ck.config,
        &QuantConfig::default(),
        &ck.params,
        None,
        Format::Q2_0,
        "t",
        &out,
    )
    .unwrap();
    let model = tern::gguf::load_model(&GgufFile::read(&out).unwrap()).unwrap();
    assert!(model.is_packed());
    let words: Vec<String> = (1..model.cfg.vocab_size).map(|i| format!("w{i}")).collect();
    let path = dir.path().join("tok.json");
    write_word_tokenizer(&path, &words.iter().map(String::as_str).collect::<Vec<_>>());
    let tok = Tokenizer::from_file(&path).unwrap();
    let (model, tok) = (Arc::new(model), Arc::new(tok));
    for kv in [KvType::F32, KvType::F16] {
        batched_equals_alone(&model, &tok, kv);
    }
}

fn batched_equals_alone(model: &Arc<Model>, tok: &Arc<Tokenizer>, kv: KvType) {
    let (model, tok) = (model.clone(), tok.clone());
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 3, 5],
        vec![2, 9, 4, 7, 11, 6, 8],
        vec![14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 1, 2, 3],
        vec![10],
        vec![4, 4, 4, 4, 4],
    ];
    let samplers = [
        SamplerConfig::default(),
        sampled(7),
        SamplerConfig::default(),
        sampled(9),
        SamplerConfig {
            repeat_penalty: 1.3,
            ..Default::default()
        },
    ];
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .zip(samplers)
        .enumerate()
        .map(|(i, (p, s))| request(p.clone(), 9 + i, s))
        .collect();
    // Alone: the engine with one request, and (greedy rows) plain paged generation.
    let want: Vec<Got> = reqs
        .iter()
        .map(|r| alone(&model, &tok, r.clone(), kv))
        .collect();
    for (r, w) in reqs.iter().zip(&want) {
        assert_eq!(w.tokens.len(), r.max_tokens);
        if r.sampler.temp == 0.0 {
            let cfg = GenerateConfig {
                max_new: r.max_tokens,
                sampler: r.sampler,
                eos: vec![],
            };
            let plain = generate_paged(
                &model,
                std::slice::from_ref(&r.prompt),
                &cfg,
                BLOCK,
                kv,
                |_, _| false,
            )
            .unwrap();
            assert_eq!(plain[0].0, w.tokens, "engine alone == generate_paged");
        }
    }
    // Together: 3 at a time, a small prefill budget (the 14-token prompt takes 4 steps), and
    // requests joining at steps 0, 0, 2, 3 and 5.
    let cfg = EngineConfig {
        parallel: 3,
        prefill_chunk: 4,
        block_size: BLOCK,
        kv_type: kv,
        ..Default::default()
    };
    let mut e = Engine::new(model.clone(), tok.clone(), cfg).unwrap();
    let got: Vec<Arc<Mutex<Got>>> = reqs.iter().map(|_| Default::default()).collect();
    let joins = [0usize, 0, 2, 3, 5];
    let mut step = 0;
    loop {
        for (i, &at) in joins.iter().enumerate() {
            if at == step {
                e.submit(reqs[i].clone(), recorder(got[i].clone(), None));
            }
        }
        if !e.step().unwrap() && step > *joins.iter().max().unwrap() {
            break;
        }
        step += 1;
    }
    for (i, g) in got.iter().enumerate() {
        let g = g.lock().unwrap();
        assert_eq!(*g, want[i], "request {i}: batched differs from alone");
        assert_eq!(
            g.done,
            Some(Done {
                finish: Finish::Length,
                prompt_tokens: prompts[i].len(),
                completion_tokens: 9 + i,
            })
        );
        assert_eq!(g.text, tok.decode(&g.tokens).unwrap());
    }
    assert_eq!(e.kv_blocks_in_use(), 0, "every block freed");
}

#[test]
fn a_client_that_leaves_is_cancelled_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = tiny(dir.path());
    let (a, b) = (
        request(vec![1, 2, 3], 20, SamplerConfig::default()),
        request(vec![5, 6], 12, sampled(3)),
    );
    let want_b = alone(&model, &tok, b.clone(), KvType::F32);
    let mut e = Engine::new(model, tok, EngineConfig::default()).unwrap();
    let stats = e.stats();
    let (ga, gb) = (
        Arc::new(Mutex::new(Got::default())),
        Arc::new(Mutex::new(Got::default())),
    );
    e.submit(a, recorder(ga.clone(), Some(3)));
    e.submit(b, recorder(gb.clone(), None));
    while e.busy() {
        e.step().unwrap();
    }
    assert_eq!(
        ga.lock().unwrap().tokens.len(),
        3,
        "a received 3 events, then left"
    );
    assert_eq!(ga.lock().unwrap().done, None);
    assert_eq!(*gb.lock().unwrap(), want_b);
    assert_eq!(e.kv_blocks_in_use(), 0);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.requests_cancelled.load(Relaxed), 1);
    assert_eq!(stats.requests_done.load(Relaxed), 1);
}

/// Each generated token's reported log-probability and top alternatives equal the log-softmax
/// of the model's logits after the prompt and the tokens before it (a full forward, no cache),
/// for a greedy and a sampled request sharing the engine's steps.
#[test]
fn logprobs_are_the_models_log_softmax_of_each_generated_token() {
    use candle_core::Tensor;
    use tern::serve::engine::TokenLogprob;
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = tiny(dir.path());
    let reqs = [
        (vec![1u32, 2, 3], SamplerConfig::default()),
        (vec![5u32, 6], sampled(7)),
    ];
    let mut e = Engine::new(model.clone(), tok, EngineConfig::default()).unwrap();
    let got: Vec<Arc<Mutex<Vec<TokenLogprob>>>> = reqs.iter().map(|_| Default::default()).collect();
    for ((prompt, sampler), g) in reqs.iter().zip(&got) {
        let req = GenRequest {
            prompt: prompt.clone(),
            max_tokens: 6,
            sampler: *sampler,
            ignore_eos: true,
            logprobs: Some(3),
            ..Default::default()
        };
        let g = g.clone();
        e.submit(
            req,
            Box::new(move |ev| {
                if let Event::Text {
                    tokens, logprobs, ..
                } = ev
                {
                    let ids: Vec<u32> = logprobs.iter().map(|l| l.id).collect();
                    assert_eq!(tokens, ids, "one logprob per token, in order");
                    g.lock().unwrap().extend(logprobs);
                }
                true
            }),
        );
    }
    while e.busy() {
        e.step().unwrap();
    }
    for ((prompt, _), g) in reqs.iter().zip(&got) {
        let g = g.lock().unwrap();
        assert_eq!(g.len(), 6);
        let mut ids = prompt.clone();
        for lp in g.iter() {
            let tok_id = &lp.id;
            let n = ids.len();
            let logits: Vec<f32> = model
                .full_logits(
                    &Tensor::new(ids.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                )
                .unwrap()
                .squeeze(0)
                .unwrap()
                .get(n - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let want = |i: u32| logits[i as usize] as f64 - lse;
            assert!(
                (lp.logprob as f64 - want(*tok_id)).abs() < 1e-4,
                "{} vs {}",
                lp.logprob,
                want(*tok_id)
            );
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            order.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            assert_eq!(
                lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                order[..3].to_vec()
            );
            for &(i, p) in &lp.top {
                assert!((p as f64 - want(i)).abs() < 1e-4);
            }
            ids.push(*tok_id);
        }
    }
}

#[test]
fn stop_strings_end_the_text_before_them_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = tiny(dir.path());
    let free = alone(
        &model,
        &tok,
        request(vec![1, 2, 3], 12, SamplerConfig::default()),
        KvType::F32,
    );
    // Stop at the third generated word (word-level decoding joins words with spaces).
    let words: Vec<&str> = free.text.split(' ').collect();
    let stop = words[2].to_string();
    let cut = free.text.find(&stop).unwrap();
    let mut r = request(vec![1, 2, 3], 12, SamplerConfig::default());
    r.stop = vec![stop];
    let got = alone(&model, &tok, r, KvType::F32);
    assert_eq!(got.text, free.text[..cut]);
    assert_eq!(got.done.unwrap().finish, Finish::Stop);
    // Refused before any work: too long for the context, no room, empty, bad sampling values.
    let mut e = Engine::new(
        model.clone(),
        tok.clone(),
        EngineConfig {
            ctx: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let bad = [
        (
            request(vec![1; 8], 1, SamplerConfig::default()),
            "the prompt has 8 tokens",
        ),
        (
            request(vec![1; 4], 5, SamplerConfig::default()),
            "exceed the context of 8",
        ),
        (request(vec![], 1, SamplerConfig::default()), "empty"),
        (
            request(vec![99], 1, SamplerConfig::default()),
            "outside the vocabulary",
        ),
        (
            request(
                vec![1],
                1,
                SamplerConfig {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            "top-p",
        ),
    ];
    for (req, msg) in bad {
        let g = Arc::new(Mutex::new(Got::default()));
        e.submit(req, recorder(g.clone(), None));
        let err = g.lock().unwrap().error.clone().unwrap_or_default();
        assert!(err.contains(msg), "{err:?} should say {msg:?}");
    }
    assert!(!e.busy());
}

/// `tern chat` as a user runs it, stdin to stdout: a reply per message, `/reset` forgets the
/// conversation (the reply after it equals a fresh session's to the same message), and a
/// conversation that outgrows the context goes on with its oldest turns dropped.
#[test]
fn tern_chat_replies_resets_and_drops_old_turns_to_fit_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let (c, p, tok) = tiny_parts(dir.path());
    tern::model::save_checkpoint(&model_dir, &c, &QuantConfig::default(), &p, Some(&tok)).unwrap();
    let chat = |input: &str, ctx: &str| -> Vec<String> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["--threads", "1", "chat", "--model"])
            .arg(&model_dir)
            .args(["--temp", "0", "-n", "4", "--ctx", ctx, "--device", "cpu"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("error"), "{stderr}");
        // "> " opens every turn; what follows it is the reply (or /reset's note).
        stdout
            .split("> ")
            .skip(1)
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect()
    };
    let fresh = chat("the stack\n", "256");
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert!(!fresh[0].is_empty());
    let reset = chat("the compiler translates\n/reset\nthe stack\n/exit\n", "256");
    assert_eq!(reset.len(), 3, "{reset:?}");
    assert_eq!(reset[1], "(conversation cleared)");
    assert_eq!(reset[2], fresh[0], "after /reset the history is gone");
    // Ten turns in a context that holds about two: every turn still gets its reply.
    let long: String = (0..10)
        .map(|i| format!("the {} queue stack\n", WORDS[i]))
        .collect();
    let replies = chat(&long, "48");
    assert_eq!(replies.len(), 10, "{replies:?}");
}

/// A minimal HTTP/1.0 client (the response ends when the server closes the connection, so no
/// chunked decoding is needed): status and body.
fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        req += h;
        req += "\r\n";
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn http_api_answers_streams_and_refuses_with_openai_errors() {
    use tern::serve::template::ChatTemplate;
    let dir = tempfile::tempdir().unwrap();
    let (model, tok) = tiny(dir.path());
    let engine = Engine::new(
        model,
        tok.clone(),
        EngineConfig {
            ctx: 48,
            ..Default::default()
        },
    )
    .unwrap();
    let template = ChatTemplate::for_tokenizer(&tok).unwrap();
    assert!(
        template.fallback,
        "the word tokenizer has no template: ChatML stands in"
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = tern::serve::ServeOptions {
        model_id: "tiny".into(),
        api_key: Some("sekrit".into()),
        body_limit: 4096,
    };
    let server = std::thread::spawn(move || {
        tern::serve::serve(engine, tok, template, opts, listener, async {
            let _ = stop_rx.await;
        })
    });
    let key = "Authorization: Bearer sekrit";
    let (st, body) = http(addr, "GET", "/health", &[], "");
    assert_eq!((st, json(&body)["status"].as_str()), (200, Some("ok")));
    let (st, body) = http(addr, "GET", "/v1/models", &[key], "");
    assert_eq!(
        (st, json(&body)["data"][0]["id"].as_str()),
        (200, Some("tiny"))
    );

    let greedy = r#"{"prompt": "the compiler translates", "max_tokens": 6, "temperature": 0}"#;
    let (st, body) = http(addr, "POST", "/v1/completions", &[key], greedy);
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 9);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    // The same request streamed: the pieces add up to the same text, then [DONE].
    let streamed = greedy.replace('}', r#", "stream": true}"#);
    let (st, body) = http(addr, "POST", "/v1/completions", &[key], &streamed);
    assert_eq!(st, 200);
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = datas[..datas.len() - 1].iter().map(|d| json(d)).collect();
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(joined, text);
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 9);

    // Log-probabilities: completions' parallel lists, whole and streamed (the same values).
    let with_lp = greedy.replace('}', r#", "logprobs": 2}"#);
    let (st, body) = http(addr, "POST", "/v1/completions", &[key], &with_lp);
    assert_eq!(st, 200, "{body}");
    let lp = &json(&body)["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens.concat(), text, "the tokens spell the text");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[5] as usize, text.len() - tokens[5].len());
    for (i, t) in tokens.iter().enumerate() {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one, its logprob the best.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let own = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            own <= 0.0 && (own - best).abs() < 1e-6,
            "token {t}: {own} vs best {best}"
        );
        assert_eq!(top[*t].as_f64(), Some(own));
    }
    let streamed_lp = with_lp.replace('}', r#", "stream": true}"#);
    let (_, body) = http(addr, "POST", "/v1/completions", &[key], &streamed_lp);
    let streamed_values: Vec<f64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .flat_map(|d| {
            let c = json(d);
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        streamed_values,
        lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect::<Vec<_>>()
    );
    // Chat: `logprobs: true` with `top_logprobs`, OpenAI's content list.
    let chat_lp = r#"{"messages": [{"role": "user", "content": "the stack"}], "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 3}"#;
    let (st, body) = http(addr, "POST", "/v1/chat/completions", &[key], chat_lp);
    assert_eq!(st, 200, "{body}");
    let content = json(&body)["choices"][0]["logprobs"]["content"].clone();
    assert_eq!(content.as_array().unwrap().len(), 3, "{body}");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(content[0]["top_logprobs"][0]["token"], content[0]["token"]);
    assert!(content[0]["bytes"].is_array());

    let chat = r#"{"messages": [{"role": "user", "content": "the stack"}], "max_tokens": 4, "stream": true}"#;
    let (st, body) = http(addr, "POST", "/v1/chat/completions", &[key], chat);
    assert_eq!(st, 200);
    let first = json(body.lines().find_map(|l| l.strip_prefix("data: ")).unwrap());
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(body.trim_end().ends_with("data: [DONE]"));

    // Refusals: status, OpenAI error shape, and the message naming the problem.
    let cases: [(&str, &[&str], &str, u16, &str); 10] = [
        ("/v1/completions", &[], greedy, 401, "API key"),
        (
            "/v1/completions",
            &["Authorization: Bearer wrong"],
            greedy,
            401,
            "API key",
        ),
        (
            "/v1/completions",
            &[key],
            r#"{"prompt": "the", "#,
            400,
            "not valid JSON",
        ),
        (
            "/v1/completions",
            &[key],
            r#"{"prompt": "the", "temperature": "hot"}"#,
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            &[key],
            r#"{"prompt": "the", "max_tokens": 100}"#,
            400,
            "context of 48",
        ),
        (
            "/v1/completions",
            &[key],
            r#"{"prompt": "the", "top_p": 0}"#,
            400,
            "top_p",
        ),
        (
            "/v1/chat/completions",
            &[key],
            r#"{"messages": []}"#,
            400,
            "messages",
        ),
        (
            "/v1/completions",
            &[key],
            r#"{"prompt": "the", "logprobs": 21}"#,
            400,
            "logprobs must be between 0 and 20",
        ),
        (
            "/v1/chat/completions",
            &[key],
            r#"{"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}"#,
            400,
            "top_logprobs needs logprobs",
        ),
        ("/v1/nothing", &[key], "{}", 404, "no such endpoint"),
    ];
    for (path, headers, body, status, msg) in cases {
        let (st, got) = http(addr, "POST", path, headers, body);
        let v = json(&got);
        assert_eq!(st, status, "{path} {body}: {got}");
        assert_eq!(v["error"]["code"], status);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{m:?} should name {msg:?}");
    }
    let long = format!(r#"{{"prompt": "{}"}}"#, "the ".repeat(2000));
    let (st, got) = http(addr, "POST", "/v1/completions", &[key], &long);
    assert_eq!((st, json(&got)["error"]["code"].as_u64()), (413, Some(413)));
    // Still serving after all that.
    let (st, _) = http(addr, "POST", "/v1/completions", &[key], greedy);
    assert_eq!(st, 200);
    let (_, h) = http(addr, "GET", "/health", &[], "");
    assert_eq!(json(&h)["kv_blocks_in_use"], 0);
    stop_tx.send(()).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn a_real_openai_client_drives_tern_serve_on_smollm2() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let skip = |why: String, var: &str| {
        assert!(std::env::var_os(var).is_none(), "{var} is set but {why}");
        eprintln!("SKIP: {why}");
    };
    if !gguf.is_file() {
        return skip(
            format!("{} missing (scripts/fetch_smollm2.sh)", gguf.display()),
            "TERN_REQUIRE_SMOLLM2",
        );
    }
    let python = std::env::var("TERN_OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_client = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_client {
        return skip(
            format!("{python} cannot import openai (scripts/setup_openai_client.sh; TERN_OPENAI_PYTHON)"),
            "TERN_REQUIRE_OPENAI",
        );
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--model"])
        .arg(&gguf)
        .args([
            "--precision",
            "full",
            "--ctx",
            "512",
            "--api-key",
            "k",
            "--alias",
            "smollm2",
        ])
        .args(["--port", &port.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::process::Command::new(&python)
        .arg(root.join("tests/openai_client.py"))
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(stdout.lines().last().unwrap_or(""));
    assert!(v["chat"].as_str().unwrap().contains("Paris"), "{v}");
}
