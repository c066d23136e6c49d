//! The decoder of the Qwen3 and Llama families, written from the architecture (not
//! candle-transformers' inference-only models):
//!
//! ```text
//! ids -> embed -> N x [ x += attn(rms(x)); x += mlp(rms(x)) ] -> rms -> lm_head (tied or not)
//! attn: q,k,v proj -> per-head RMSNorm on q and k (Qwen3 only) -> RoPE -> causal GQA softmax -> o proj
//! mlp:  down(silu(gate(x)) * up(x))
//! ```
//!
//! One forward, [`Qwen3::forward`], for training, scoring and every kind of decoding: what it
//! attends over (nothing, a contiguous KV cache, a draft tree, a paged cache) is the [`Cache`]
//! passed in. Every projection, the embedding and the LM head are ternary layers; RMSNorm weights
//! stay f32. Each op runs through `kernels::Kernels` (fused, or the plain composed reference;
//! none of the fused candle ops that silently drop gradients is used, see shared/REFERENCE.md).

use super::cache::{Cache, NoCache, Positions, StepInfo};
use super::config::ModelConfig;
use super::layers::{forward_many, RmsNorm, TernaryEmbedding, TernaryLinear};
use super::params::{self, LayerTensor, Params};
use crate::error::{Error, Result};
use crate::kernels::rope::Rope;
use crate::kernels::ternary_matmul::PackedMatrix;
use crate::kernels::Kernels;
use crate::quant::QuantConfig;
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q: TernaryLinear,
    pub(super) k: TernaryLinear,
    pub(super) v: TernaryLinear,
    pub(super) o: TernaryLinear,
    /// Qwen3's per-head norms of q and k (None for Llama).
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    /// q `[B, H, T, hd]`, k and v `[B, KV, T, hd]` of `x: [B, T, hidden]`: projections, q/k
    /// norms (Qwen3) and RoPE.
    fn qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        quant: &QuantConfig,
        kern: Kernels,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let [q, k, v] = forward_many([&self.q, &self.k, &self.v], x, quant, kern)?;
        let norm = |n: &Option<RmsNorm>, x: Tensor| match n {
            Some(n) => n.forward(&x, kern),
            None => Ok(x),
        };
        let q = norm(&self.q_norm, q.reshape((b, t, nh, hd))?)?;
        let k = norm(&self.k_norm, k.reshape((b, t, nkv, hd))?)?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        Ok((kern.rope(&q, cos, sin)?, kern.rope(&k, cos, sin)?, v))
    }

    /// The o projection of the attention output `[B, H, T, hd]`.
    fn output(&self, o: &Tensor, quant: &QuantConfig, kern: Kernels) -> Result<Tensor> {
        let (b, _, t, _) = o.dims4()?;
        let o = o
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&o, quant, kern)
    }

    fn freeze(&self, quant: &QuantConfig, kern: Kernels) -> Result<Self> {
        Ok(Self {
            q: self.q.freeze(quant, kern)?,
            k: self.k.freeze(quant, kern)?,
            v: self.v.freeze(quant, kern)?,
            o: self.o.freeze(quant, kern)?,
            q_norm: self.q_norm.as_ref().map(RmsNorm::detached),
            k_norm: self.k_norm.as_ref().map(RmsNorm::detached),
            ..*self
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate: TernaryLinear,
    pub(super) up: TernaryLinear,
    pub(super) down: TernaryLinear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, quant: &QuantConfig, kern: Kernels) -> Result<Tensor> {
        let [gate, up] = forward_many([&self.gate, &self.up], x, quant, kern)?;
        let h = kern.swiglu(&gate, &up)?;
        self.down.forward(&h, quant, kern)
    }
    fn freeze(&self, quant: &QuantConfig, kern: Kernels) -> Result<Self> {
        Ok(Self {
            gate: self.gate.freeze(quant, kern)?,
            up: self.up.freeze(quant, kern)?,
            down: self.down.freeze(quant, kern)?,
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) input_norm: RmsNorm,
    pub(super) attn: Attention,
    pub(super) post_norm: RmsNorm,
    pub(super) mlp: Mlp,
}

impl Layer {
    /// One pre-norm decoder block: x + attention(norm(x)), then + mlp(norm(.)); the cache
    /// supplies the attention itself.
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        index: usize,
        cache: &mut dyn Cache,
        m: &Model,
    ) -> Result<Tensor> {
        let (quant, kern) = (&m.quant, m.kernels);
        let h = self.input_norm.forward(x, kern)?;
        let (q, k, v) = self.attn.qkv(&h, rope.0, rope.1, quant, kern)?;
        let o = cache.attend(index, &q, k, v, kern)?;
        let x = (x + self.attn.output(&o, quant, kern)?)?;
        let m = self
            .mlp
            .forward(&self.post_norm.forward(&x, kern)?, quant, kern)?;
        Ok((x + m)?)
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    pub quant: QuantConfig,
    /// Fused kernels or the plain references (a run-time choice, not stored in checkpoints).
    pub kernels: Kernels,
    /// dtype of the activations and GEMMs: the weights' (f32) or bf16 for mixed precision, where
    /// the latent weights, norms, softmax and loss stay f32 ([`Qwen3::with_compute_dtype`]).
    pub compute: DType,
    pub(super) embed: TernaryEmbedding,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: Option<TernaryLinear>,
    pub(super) rope: Rope,
}

impl Model {
    /// Builds the model over `params` (sharing their storage: optimizer updates are seen), with
    /// the fused kernels (see [`Qwen3::with_kernels`]).
    pub fn new(cfg: &ModelConfig, quant: QuantConfig, params: &Params) -> Result<Self> {
        Self::from_parts(
            cfg,
            quant,
            |n| Ok(TernaryLinear::new(params.tensor(n)?)),
            |n| params.tensor(n),
            TernaryEmbedding::new(params.tensor(params::EMBED)?),
        )
    }

    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    /// Mixed precision: activations and GEMMs in `dtype` (bf16), weights kept as they are (the
    /// f32 latents the optimizer updates). `Kernels` casts at each op's boundary.
    pub fn with_compute_dtype(self, compute: DType) -> Self {
        Self { compute, ..self }
    }

    /// Builds the model from its weights by HF name: `lin` for projections (and an untied LM
    /// head), `norm_w` for RMSNorm weights. Used by [`Qwen3::new`] and the GGUF loader.
    pub fn from_parts(
        cfg: &ModelConfig,
        quant: QuantConfig,
        lin: impl Fn(&str) -> Result<TernaryLinear>,
        norm_w: impl Fn(&str) -> Result<Tensor>,
        embed: TernaryEmbedding,
    ) -> Result<Self> {
        quant.validate()?;
        let eps = cfg.rms_norm_eps;
        let qk_norm = cfg.arch.qk_norm();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lin = |t: LayerTensor| lin(&t.hf(i));
            let norm =
                |t: LayerTensor| -> Result<RmsNorm> { Ok(RmsNorm::new(norm_w(&t.hf(i))?, eps)) };
            layers.push(Layer {
                input_norm: norm(LayerTensor::InputNorm)?,
                post_norm: norm(LayerTensor::PostNorm)?,
                attn: Attention {
                    q: lin(LayerTensor::Q)?,
                    k: lin(LayerTensor::K)?,
                    v: lin(LayerTensor::V)?,
                    o: lin(LayerTensor::O)?,
                    q_norm: qk_norm.then(|| norm(LayerTensor::QNorm)).transpose()?,
                    k_norm: qk_norm.then(|| norm(LayerTensor::KNorm)).transpose()?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.kv_heads(),
                    head_dim: cfg.head_dim(),
                },
                mlp: Mlp {
                    gate: lin(LayerTensor::Gate)?,
                    up: lin(LayerTensor::Up)?,
                    down: lin(LayerTensor::Down)?,
                },
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(lin(params::LM_HEAD)?)
        };
        let norm = RmsNorm::new(norm_w(params::FINAL_NORM)?, eps);
        Ok(Self {
            cfg: cfg.clone(),
            quant,
            kernels: Kernels::default(),
            compute: norm.weight.dtype(),
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::from_inv_freq(cfg.rope_inv_freq()),
        })
    }

    /// An inference copy: weights detached and projected once (no per-token re-projection, no
    /// autograd graph kept alive by the KV cache). Runs with the projection already applied.
    pub fn freeze(&self) -> Result<Self> {
        let (q, k) = (&self.quant, self.kernels);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: l.input_norm.detached(),
                    post_norm: l.post_norm.detached(),
                    attn: l.attn.freeze(q, k)?,
                    mlp: l.mlp.freeze(q, k)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            quant: QuantConfig {
                ternary: false,
                ..self.quant
            },
            kernels: k,
            compute: self.compute,
            embed: self.embed.freeze(&q.for_embeddings(), k)?,
            layers,
            norm: self.norm.detached(),
            lm_head: self
                .lm_head
                .as_ref()
                .map(|h| h.freeze(&q.for_embeddings(), k))
                .transpose()?,
            rope: self.rope.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.norm.weight.device()
    }

    pub fn dtype(&self) -> DType {
        self.norm.weight.dtype()
    }

    /// Quantization of the embedding and the LM head (`quant.embeddings`).
    pub fn head_quant(&self) -> QuantConfig {
        self.quant.for_embeddings()
    }

    /// True when the weights are packed 2-bit blocks from a GGUF file (inference only).
    pub fn is_packed(&self) -> bool {
        self.embed.packed.is_some()
    }

    /// Every packed weight matrix (a GGUF model's ternary tensors; empty for a dense model).
    pub fn packed_matrices(&self) -> Vec<&PackedMatrix> {
        let mut out: Vec<&PackedMatrix> = self.embed.packed.iter().collect();
        for l in &self.layers {
            let (a, m) = (&l.attn, &l.mlp);
            for lin in [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down] {
                out.extend(lin.packed.as_ref());
            }
        }
        out.extend(self.lm_head.as_ref().and_then(|h| h.packed.as_ref()));
        out
    }

    /// The LM head's *latent* weight `[vocab, hidden]` (the embedding when tied), for a loss that
    /// projects the head itself (`Kernels::lm_head_loss`).
    pub fn head_latent(&self) -> Result<Tensor> {
        if self.is_packed() {
            return Err(Error::Msg(
                "a packed (GGUF) model cannot be trained; load the checkpoint".into(),
            ));
        }
        Ok(self
            .lm_head
            .as_ref()
            .map_or(&self.embed.weight, |h| &h.weight)
            .clone())
    }

    /// The LM head's input as a dense head sees it (`layers::layer_input`): what a loss that
    /// takes the head's weight itself must multiply. A packed head quantizes inside its kernel.
    pub fn head_input(&self, h: &Tensor) -> Result<Tensor> {
        crate::model::layers::layer_input(h, &self.head_quant(), self.kernels)
    }

    /// The LM head weight `[vocab, hidden]` as the forward uses it (projected when ternary);
    /// dense models only.
    pub fn head_weight(&self) -> Result<Tensor> {
        self.kernels
            .effective_weight(&self.head_latent()?, &self.head_quant())
    }

    /// The one forward: final-norm hidden states `[B, T, H]` of `ids: [B, T]`, attending over
    /// what `cache` holds (and appending to it). Training and scoring pass a [`NoCache`].
    pub fn forward(&self, ids: &Tensor, cache: &mut dyn Cache) -> Result<Tensor> {
        self.forward_tapped(ids, cache, None)
    }

    /// [`Model::forward`], also pushing the residual stream after every layer (`[B, T, H]`
    /// each, before the final norm) onto `taps` when given: what hidden-state distillation
    /// compares between student and teacher.
    pub fn forward_tapped(
        &self,
        ids: &Tensor,
        cache: &mut dyn Cache,
        mut taps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self
            .embed
            .lookup(ids, &self.head_quant(), self.kernels)?
            .to_dtype(self.compute)?;
        let (dt, dev) = (self.compute, self.device());
        let step = StepInfo {
            batch: b,
            new_tokens: t,
            layers: self.layers.len(),
            dtype: dt,
            device: dev,
            kernels: self.kernels,
        };
        let (cos, sin) = match cache.begin(&step)? {
            Positions::Shared(p) => self.rope.cos_sin(&p, x.dtype(), x.device())?,
            Positions::PerRow(p) => {
                let hd = self.cfg.head_dim();
                let (cos, sin) = self.rope.cos_sin(&p, dt, dev)?;
                (cos.reshape((b, 1, t, hd))?, sin.reshape((b, 1, t, hd))?)
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, (&cos, &sin), i, cache, self)?;
            if let Some(taps) = taps.as_deref_mut() {
                taps.push(x.clone());
            }
        }
        self.norm.forward(&x, self.kernels)
    }

    /// The LM head: its own layer, or the embedding when tied.
    pub(super) fn head(&self) -> &TernaryLinear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits `[..., vocab]` of hidden states `[..., H]`, in the weights' dtype.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let head = self.head();
        // Mixed precision: the head GEMM runs in the compute dtype, the logits come back in the
        // weights' (f32) for sampling and losses.
        Ok(head
            .forward(h, &self.head_quant(), self.kernels)?
            .to_dtype(self.dtype())?)
    }

    /// Logits `[B, T, vocab]` of every position of `ids`, nothing cached (tests, small inputs).
    pub fn full_logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.forward(ids, &mut NoCache::new())?)
    }

    /// Next-token NLL of every row of `h: [N, H]` for `targets: [N]`, chunked over tokens so the
    /// full `[N, vocab]` logits never exist (dense or packed head).
    pub fn token_nll(&self, h: &Tensor, targets: &Tensor) -> Result<Vec<f64>> {
        use crate::kernels::cross_entropy::{default_chunk, lm_head_token_nll, nll_of_logits};
        let chunk = default_chunk(self.cfg.vocab_size);
        if !self.is_packed() {
            let w = self.head_weight()?;
            let h = self.head_input(h)?;
            return lm_head_token_nll(&h.to_dtype(w.dtype())?, &w, targets, chunk);
        }
        let n = h.dim(0)?;
        let tgt: Vec<u32> = targets.to_dtype(DType::U32)?.to_vec1()?;
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(chunk) {
            let c = chunk.min(n - start);
            let logits = self.logits(&h.narrow(0, start, c)?)?;
            out.extend(nll_of_logits(
                &logits.flatten_all()?.to_vec1::<f32>()?,
                self.cfg.vocab_size,
                &tgt[start..start + c],
            )?);
        }
        Ok(out)
    }
}
