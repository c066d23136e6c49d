//! Qwen3 decoder, written from the architecture (not candle-transformers' inference-only model):
//!
//! ```text
//! ids -> embed -> N x [ x += attn(rms(x)); x += mlp(rms(x)) ] -> rms -> lm_head (tied or not)
//! attn: q,k,v proj -> per-head RMSNorm on q and k -> RoPE -> causal GQA softmax -> o proj
//! mlp:  down(silu(gate(x)) * up(x))
//! ```
//!
//! Every projection, the embedding and the LM head are ternary layers; RMSNorm weights stay f32.
//! All ops here are plain differentiable candle ops (see shared/REFERENCE.md for the fused candle
//! ops that silently drop gradients: none of them is used here) or tern's own fused kernels with
//! a tested backward: RMSNorm (`kernels::norm`), RoPE (`kernels::rope`), attention
//! (`kernels::flash_attention`), ternary linear layers (`kernels::ternary_linear`). With
//! `quant.kernels = Reference` every one of them runs its plain composed reference instead.
//!
//! GQA without copying K/V: the `g = heads / kv_heads` query heads that share a KV head are
//! folded into the row dimension (`[B, kv, g*T, hd]`), so one batched GEMM per KV head does it.

use super::config::Qwen3Config;
use super::params::{self, Params};
use crate::error::Result;
use crate::decode::paged::{PagedKvCache, SeqId};
use crate::kernels::flash_attention::{self, FlashConfig};
use crate::kernels::{rope, Kernels};
use crate::ternary::{layers::linear, QuantConfig, TernaryEmbedding, TernaryLinear};
use candle_core::{DType, Device, Tensor, D};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Fused on the CPU (one pass per row, backward from the saved per-row statistic); the
    /// composed reference elsewhere. See `kernels::norm`.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if !kernels.fused() {
            return crate::kernels::norm::rms_norm_reference(x, &self.weight, self.eps);
        }
        crate::kernels::norm::rms_norm(x, &self.weight, self.eps)
    }

    fn detached(&self) -> Self {
        Self { weight: self.weight.detach(), eps: self.eps }
    }
}

/// Rotary position embedding (the half-split "rotate_half" form Qwen uses).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        Self { inv_freq }
    }

    /// cos and sin tables `[T, head_dim]` for the given absolute positions.
    pub fn cos_sin(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half * 2);
        let mut sin = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            // Angle in f32 like the HF reference, then cos/sin in f64 and rounded once.
            let ang: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(ang.iter().map(|a| (*a as f64).cos() as f32));
                sin.extend(ang.iter().map(|a| (*a as f64).sin() as f32));
            }
        }
        let shape = (positions.len(), half * 2);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

/// Which keys each query sees in one forward, built once for all layers: the flash kernel's
/// description (causal, left padding) and, for the reference path only, the additive mask.
#[derive(Debug, Clone)]
pub struct AttnMask {
    flash: FlashConfig,
    /// Additive mask broadcastable to `[B, KV, H/KV, T, Tk]`; `None` with the flash kernel.
    additive: Option<Tensor>,
}

impl AttnMask {
    /// An explicit additive mask (0 or -inf) `[T, past + T]`, e.g. a tree mask; always runs the
    /// reference attention.
    pub fn additive(mask: Tensor) -> Self {
        Self { flash: FlashConfig::default(), additive: Some(mask) }
    }

    /// Causal attention of `t` queries after `past` cached positions; rows of `pad` (left
    /// padding per row, empty = none) never see their padding.
    pub fn causal(t: usize, past: usize, pad: &[usize], use_flash: bool, dtype: DType, device: &Device) -> Result<Self> {
        let flash = FlashConfig { causal: true, kv_start: pad.to_vec(), ..FlashConfig::default() };
        let additive = if use_flash {
            None
        } else if !pad.is_empty() {
            Some(padded_mask(t, past, pad, dtype, device)?)
        } else if t > 1 {
            let (b, tk) = (1, past + t);
            Some(crate::kernels::flash_attention::additive_mask(b, t, tk, &flash, dtype, device)?)
        } else {
            None
        };
        Ok(Self { flash, additive })
    }
}

/// The reference path's mask for left-padded rows `[B, 1, 1, T, Tk]`. A padding query sees only
/// itself (its output is never used; this avoids a row of all -inf, whose softmax is NaN). A
/// real query sees its row's real tokens up to itself.
fn padded_mask(t: usize, past: usize, pad: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let tk = past + t;
    let mut mask = Vec::with_capacity(pad.len() * t * tk);
    for &p in pad {
        for i in 0..t {
            let q = past + i;
            mask.extend((0..tk).map(|j| {
                let visible = if q < p { j == q } else { j >= p && j <= q };
                if visible { 0f32 } else { f32::NEG_INFINITY }
            }));
        }
    }
    Ok(Tensor::from_vec(mask, (pad.len(), 1, 1, t, tk), device)?.to_dtype(dtype)?)
}

#[derive(Debug, Clone)]
struct Attention {
    q: TernaryLinear,
    k: TernaryLinear,
    v: TernaryLinear,
    o: TernaryLinear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Per-layer K/V of everything decoded so far: `[B, kv_heads, T_past, head_dim]`, detached.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-gathers the batch: new row r is old row `rows[r]` (rows may repeat or be dropped).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for slot in self.layers.iter_mut().flatten() {
            let dev = slot.0.device().clone();
            let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &dev)?;
            *slot = (slot.0.index_select(&idx, 0)?, slot.1.index_select(&idx, 0)?);
        }
        Ok(())
    }

    /// Keeps the first `prefix` positions and then only the positions `keep` (absolute indices,
    /// increasing), dropping the rest: the accepted path of a verified draft tree.
    pub fn keep(&mut self, prefix: usize, keep: &[usize]) -> Result<()> {
        for slot in self.layers.iter_mut().flatten() {
            let dev = slot.0.device().clone();
            let idx: Vec<u32> = (0..prefix).chain(keep.iter().copied()).map(|i| i as u32).collect();
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, &dev)?;
            *slot = (slot.0.index_select(&idx, 2)?, slot.1.index_select(&idx, 2)?);
        }
        Ok(())
    }

    /// Drops everything after the first `len` positions (rollback).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot {
                if len < k.dim(2)? {
                    *slot = Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?));
                }
            }
        }
        Ok(())
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        quant: &QuantConfig,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let kern = quant.kernels;
        let (q, mut k, mut v) = self.qkv(x, cos, sin, quant)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.detach(), v.detach()));
        }
        let o = match &mask.additive {
            None if kern.fused() && flash_attention::supported(&q) => flash_attention::flash_attention(&q, &k, &v, &mask.flash)?,
            additive => attention(&q, &k, &v, additive.as_ref(), nkv)?,
        };
        let o = o.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o.forward(&o, quant)
    }

    /// q `[B, H, T, hd]`, k and v `[B, KV, T, hd]` of `x: [B, T, hidden]`: projections, q/k
    /// norms and RoPE.
    fn qkv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, quant: &QuantConfig) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let kern = quant.kernels;
        let q = self.q_norm.forward(&self.q.forward(x, quant)?.reshape((b, t, nh, hd))?, kern)?;
        let k = self.k_norm.forward(&self.k.forward(x, quant)?.reshape((b, t, nkv, hd))?, kern)?;
        let rope = if kern.fused() { rope::rope_transposed } else { rope::rope_transposed_reference };
        let v = self.v.forward(x, quant)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        Ok((rope(&q, cos, sin)?, rope(&k, cos, sin)?, v))
    }

    fn freeze(&self, quant: &QuantConfig) -> Result<Self> {
        Ok(Self {
            q: self.q.freeze(quant)?,
            k: self.k.freeze(quant)?,
            v: self.v.freeze(quant)?,
            o: self.o.freeze(quant)?,
            q_norm: self.q_norm.detached(),
            k_norm: self.k_norm.detached(),
            ..*self
        })
    }
}

/// Plain (reference) scaled-dot-product attention with GQA folding.
/// q: `[B, H, T, hd]`, k/v: `[B, KV, Tk, hd]`, mask broadcastable to `[B, KV, H/KV, T, Tk]`.
/// Returns `[B, H, T, hd]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, kv_heads: usize) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let tk = k.dim(2)?;
    let g = nh / kv_heads;
    let q = q.reshape((b, kv_heads, g * t, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match mask {
        Some(m) => scores.reshape((b, kv_heads, g, t, tk))?.broadcast_add(m)?.reshape((b, kv_heads, g * t, tk))?,
        None => scores,
    };
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    Ok(p.matmul(v)?.reshape((b, nh, t, hd))?)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: TernaryLinear,
    up: TernaryLinear,
    down: TernaryLinear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, quant: &QuantConfig) -> Result<Tensor> {
        let h = (self.gate.forward(x, quant)?.silu()? * self.up.forward(x, quant)?)?;
        self.down.forward(&h, quant)
    }
    fn freeze(&self, quant: &QuantConfig) -> Result<Self> {
        Ok(Self { gate: self.gate.freeze(quant)?, up: self.up.freeze(quant)?, down: self.down.freeze(quant)? })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    /// One pre-norm decoder block: x + attention(norm(x)), then + mlp(norm(.)). `attention`
    /// maps the normed input to the attention output (after the o projection), so each cache
    /// layout (none, contiguous, paged) supplies only its own attention.
    fn block(&self, x: &Tensor, quant: &QuantConfig, attention: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let x = (x + attention(&self.input_norm.forward(x, quant.kernels)?)?)?;
        let m = self.mlp.forward(&self.post_norm.forward(&x, quant.kernels)?, quant)?;
        Ok((x + m)?)
    }
}

#[derive(Debug, Clone)]
pub struct Qwen3 {
    pub cfg: Qwen3Config,
    pub quant: QuantConfig,
    embed: TernaryEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Option<TernaryLinear>,
    rope: Rope,
}

impl Qwen3 {
    /// Builds the model over `params` (sharing their storage: optimizer updates are seen).
    pub fn new(cfg: &Qwen3Config, quant: QuantConfig, params: &Params) -> Result<Self> {
        Self::build(
            cfg,
            quant,
            |n| Ok(TernaryLinear::new(params.tensor(n)?)),
            |n| params.tensor(n),
            TernaryEmbedding::new(params.tensor(params::EMBED)?),
        )
    }

    /// Builds the model from a GGUF file: Q2_0/PQ2_0 tensors stay packed and are multiplied
    /// directly, F16/F32 tensors become dense f32. Inference only, on the CPU.
    pub fn from_gguf(file: &crate::export::gguf::GgufFile) -> Result<Self> {
        use crate::export::gguf::TensorInfo;
        use crate::export::{gguf_name, q2::Packing};
        let cfg = config_from_gguf(file)?;
        let find = |hf: &str| -> Result<&TensorInfo> {
            let g = gguf_name(hf)?;
            file.tensor(&g).ok_or_else(|| crate::Error::Msg(format!("GGUF {}: missing tensor '{g}'", file.path.display())))
        };
        let shape_of = |hf: &str| -> Vec<usize> {
            params::expected_shapes(&cfg).into_iter().find(|(n, _)| n == hf).map(|(_, s)| s).unwrap_or_default()
        };
        let dense = |hf: &str| -> Result<Tensor> {
            let t = find(hf)?;
            let want = shape_of(hf);
            let have: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
            if have != want {
                return Err(crate::Error::Msg(format!("GGUF tensor '{}': shape {have:?}, expected {want:?}", t.name)));
            }
            let data = file.data(t);
            let v: Vec<f32> = match t.ggml_type {
                crate::export::gguf::GGML_F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                crate::export::gguf::GGML_F16 => {
                    data.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
                }
                crate::export::gguf::GGML_BF16 => {
                    data.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
                }
                other => return Err(crate::Error::Msg(format!("GGUF tensor '{}': type {other} is not dense", t.name))),
            };
            Ok(Tensor::from_vec(v, want, &Device::Cpu)?)
        };
        let packed = |hf: &str| -> Result<Option<crate::kernels::ternary_matmul::PackedMatrix>> {
            let t = find(hf)?;
            let p = match t.ggml_type {
                42 => Packing::Q2_0,
                142 => Packing::PQ2_0,
                _ => return Ok(None),
            };
            let (rows, cols) = t.rows_cols();
            if [rows, cols] != shape_of(hf)[..] {
                return Err(crate::Error::Msg(format!("GGUF tensor '{}': shape [{rows}, {cols}], expected {:?}", t.name, shape_of(hf))));
            }
            let start = file.data_offset + t.offset as usize;
            Ok(Some(crate::kernels::ternary_matmul::PackedMatrix::new(file.bytes.clone(), start, rows, cols, p)?))
        };
        let lin = |hf: &str| -> Result<TernaryLinear> {
            match packed(hf)? {
                Some(m) => TernaryLinear::from_packed(m),
                None => Ok(TernaryLinear::new(dense(hf)?)),
            }
        };
        let embed = match packed(params::EMBED)? {
            Some(m) => TernaryEmbedding::from_packed(m)?,
            None => TernaryEmbedding::new(dense(params::EMBED)?),
        };
        // Weights in the file are already projected (or packed): run them as they are.
        let group = file.get("tern.group_size").and_then(|v| v.as_u64()).unwrap_or(128) as usize;
        let quant = QuantConfig { ternary: false, group_size: group, ..QuantConfig::default() };
        Self::build(&cfg, quant, lin, dense, embed)
    }

    fn build(
        cfg: &Qwen3Config,
        quant: QuantConfig,
        lin: impl Fn(&str) -> Result<TernaryLinear>,
        norm_w: impl Fn(&str) -> Result<Tensor>,
        embed: TernaryEmbedding,
    ) -> Result<Self> {
        quant.validate()?;
        let eps = cfg.rms_norm_eps;
        let norm = |n: String| -> Result<RmsNorm> { Ok(RmsNorm::new(norm_w(&n)?, eps)) };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let n = |s: &str| params::layer_name(i, s);
            layers.push(Layer {
                input_norm: norm(n("input_layernorm.weight"))?,
                post_norm: norm(n("post_attention_layernorm.weight"))?,
                attn: Attention {
                    q: lin(&n("self_attn.q_proj.weight"))?,
                    k: lin(&n("self_attn.k_proj.weight"))?,
                    v: lin(&n("self_attn.v_proj.weight"))?,
                    o: lin(&n("self_attn.o_proj.weight"))?,
                    q_norm: norm(n("self_attn.q_norm.weight"))?,
                    k_norm: norm(n("self_attn.k_norm.weight"))?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.kv_heads(),
                    head_dim: cfg.head_dim(),
                },
                mlp: Mlp {
                    gate: lin(&n("mlp.gate_proj.weight"))?,
                    up: lin(&n("mlp.up_proj.weight"))?,
                    down: lin(&n("mlp.down_proj.weight"))?,
                },
            });
        }
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(lin(params::LM_HEAD)?) };
        Ok(Self {
            cfg: cfg.clone(),
            quant,
            embed,
            layers,
            norm: norm(params::FINAL_NORM.into())?,
            lm_head,
            rope: Rope::new(cfg.head_dim(), cfg.rope_theta),
        })
    }

    /// An inference copy: weights detached and projected once (no per-token re-projection, no
    /// autograd graph kept alive by the KV cache). Runs with the projection already applied.
    pub fn freeze(&self) -> Result<Self> {
        let q = &self.quant;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: l.input_norm.detached(),
                    post_norm: l.post_norm.detached(),
                    attn: l.attn.freeze(q)?,
                    mlp: l.mlp.freeze(q)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            quant: QuantConfig { ternary: false, ..self.quant },
            embed: self.embed.freeze(&q.for_embeddings())?,
            layers,
            norm: self.norm.detached(),
            lm_head: self.lm_head.as_ref().map(|h| h.freeze(&q.for_embeddings())).transpose()?,
            rope: self.rope.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.norm.weight.device()
    }

    /// Quantization of the embedding and the LM head (`quant.embeddings`).
    pub fn head_quant(&self) -> QuantConfig {
        self.quant.for_embeddings()
    }

    pub fn dtype(&self) -> DType {
        self.norm.weight.dtype()
    }

    /// The LM head weight `[vocab, hidden]` as the forward uses it (projected when ternary);
    /// dense models only.
    pub fn head_weight(&self) -> Result<Tensor> {
        match &self.lm_head {
            Some(h) => crate::ternary::projection::effective_weight(&h.weight, &self.head_quant()),
            None => self.embed.effective_weight(&self.head_quant()),
        }
    }

    /// True when the weights are packed 2-bit blocks from a GGUF file (inference only).
    pub fn is_packed(&self) -> bool {
        self.embed.packed.is_some()
    }

    fn embed_ids(&self, ids: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(p) = &self.embed.packed {
            return Ok((TernaryEmbedding::lookup_packed(p, ids)?, None));
        }
        let emb_w = self.embed.effective_weight(&self.head_quant())?;
        Ok((TernaryEmbedding::lookup(&emb_w, ids)?, Some(emb_w)))
    }

    /// Training forward: final-norm hidden states for every position `[B, T, H]` and the LM
    /// head's *latent* weight, to be scored by
    /// `kernels::cross_entropy::lm_head_cross_entropy_ste` (chunked, projecting the head
    /// itself). The embedding rows are looked up first and projected after (groups lie along
    /// rows, so that equals looking up the projected matrix) so no projected `[V, H]` copy is
    /// kept for the backward.
    pub fn forward_hidden(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.is_packed() {
            return Err(crate::Error::Msg("a packed (GGUF) model cannot be trained; load the checkpoint".into()));
        }
        let (b, t) = ids.dims2()?;
        let rows = self.embed.weight.index_select(&ids.flatten_all()?, 0)?;
        let x = crate::ternary::projection::effective_weight(&rows, &self.head_quant())?.reshape((b, t, self.cfg.hidden_size))?;
        let h = self.hidden_from_embeddings(x)?;
        let head = match &self.lm_head {
            Some(hd) => hd.weight.clone(),
            None => self.embed.weight.clone(),
        };
        Ok((h, head))
    }

    /// Final-norm hidden states `[B, T, H]` (dense or packed weights).
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (x, _) = self.embed_ids(ids)?;
        self.hidden_from_embeddings(x)
    }

    fn hidden_from_embeddings(&self, x: Tensor) -> Result<Tensor> {
        let t = x.dim(1)?;
        let positions: Vec<u32> = (0..t as u32).collect();
        let mask = self.causal_mask(t, 0, &[])?;
        self.run_layers(x, &positions, &mask, None)
    }

    /// Whether attention runs the flash kernel (fused kernels on, CPU, f32/f64).
    fn use_flash(&self) -> bool {
        self.quant.kernels.fused() && self.device().is_cpu() && matches!(self.dtype(), DType::F32 | DType::F64)
    }

    fn causal_mask(&self, t: usize, past: usize, pad: &[usize]) -> Result<AttnMask> {
        AttnMask::causal(t, past, pad, self.use_flash(), self.dtype(), self.device())
    }

    /// Logits `[..., vocab]` of hidden states `[..., H]`.
    pub fn logits_from_hidden(&self, h: &Tensor) -> Result<Tensor> {
        match (&self.lm_head, &self.embed.packed) {
            (Some(head), _) => head.forward(h, &self.head_quant()),
            (None, Some(p)) => crate::ternary::layers::packed_linear(h, p),
            (None, None) => linear(h, &self.embed.effective_weight(&self.head_quant())?),
        }
    }

    /// Next-token NLL of every row of `h: [N, H]` for `targets: [N]`, chunked over tokens so the
    /// full `[N, vocab]` logits never exist (dense or packed head).
    pub fn token_nll(&self, h: &Tensor, targets: &Tensor) -> Result<Vec<f64>> {
        use crate::kernels::cross_entropy::{default_chunk, lm_head_token_nll, nll_of_logits};
        let chunk = default_chunk(self.cfg.vocab_size);
        if !self.is_packed() {
                return lm_head_token_nll(h, &self.head_weight()?, targets, chunk);
        }
        let n = h.dim(0)?;
        let tgt: Vec<u32> = targets.to_dtype(DType::U32)?.to_vec1()?;
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(chunk) {
            let c = chunk.min(n - start);
            let logits = self.logits_from_hidden(&h.narrow(0, start, c)?)?;
            out.extend(nll_of_logits(&logits.flatten_all()?.to_vec1::<f32>()?, self.cfg.vocab_size, &tgt[start..start + c])?);
        }
        Ok(out)
    }

    /// Logits for every position `[B, T, vocab]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits_from_hidden(&self.hidden(ids)?)
    }

    /// Runs `ids: [1, T]` after what `cache` holds with explicit positions and an explicit
    /// additive mask `[T, past + T]` (tree verification); appends their K/V; logits `[1, T, V]`.
    pub fn forward_cached_masked(&self, ids: &Tensor, positions: &[u32], mask: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let (x, _) = self.embed_ids(ids)?;
        let mask = AttnMask::additive(mask.to_dtype(self.dtype())?);
        let h = self.run_layers(x, positions, &mask, Some(cache))?;
        self.logits_from_hidden(&h)
    }

    /// Incremental decoding over a paged KV cache: each `(seq, tokens)` appends its tokens to its
    /// sequence (sequences of any lengths, no padding) in one batched forward; returns the
    /// next-token logits after each sequence's last new token. Use on a `freeze()`d model.
    pub fn forward_paged(&self, batch: &[(SeqId, Vec<u32>)], cache: &mut PagedKvCache) -> Result<Vec<Vec<f32>>> {
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        // Token t of the flattened batch: its sequence and absolute position.
        let mut rows: Vec<(SeqId, usize)> = Vec::new();
        let mut ids = Vec::new();
        for (s, toks) in batch {
            if toks.is_empty() {
                return Err(crate::Error::Msg(format!("forward_paged: sequence {s} has no new tokens")));
            }
            let start = cache.reserve(*s, toks.len())?;
            rows.extend((0..toks.len()).map(|i| (*s, start + i)));
            ids.extend_from_slice(toks);
        }
        let n = ids.len();
        let dev = self.device().clone();
        let (mut x, _) = self.embed_ids(&Tensor::from_vec(ids, (1, n), &dev)?)?;
        let positions: Vec<u32> = rows.iter().map(|r| r.1 as u32).collect();
        let (cos, sin) = self.rope.cos_sin(&positions, x.dtype(), &dev)?;
        for (li, layer) in self.layers.iter().enumerate() {
            x = layer.block(&x, &self.quant, |h| {
                let (q, k, v) = layer.attn.qkv(h, &cos, &sin, &self.quant)?;
                // [heads, n, hd] host copies; write every new K/V first, then attend (causal).
                let to_host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.squeeze(0)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
                let (q, k, v) = (to_host(&q)?, to_host(&k)?, to_host(&v)?);
                let per_token = |src: &[f32], heads: usize, t: usize| -> Vec<f32> {
                    (0..heads).flat_map(|head| src[(head * n + t) * hd..(head * n + t + 1) * hd].to_vec()).collect()
                };
                for (t, &(s, pos)) in rows.iter().enumerate() {
                    cache.write(li, s, pos, &per_token(&k, nkv, t), &per_token(&v, nkv, t))?;
                }
                let mut o = Vec::with_capacity(n * nh * hd);
                for (t, &(s, pos)) in rows.iter().enumerate() {
                    o.extend(cache.attend(li, s, pos, &per_token(&q, nh, t), nh)?);
                }
                let o = Tensor::from_vec(o, (1, n, nh * hd), &dev)?.to_dtype(h.dtype())?;
                layer.attn.o.forward(&o, &self.quant)
            })?;
        }
        // Logits of each sequence's last new token only.
        let mut last = Vec::with_capacity(batch.len());
        let mut end = 0;
        for (_, toks) in batch {
            end += toks.len();
            last.push((end - 1) as u32);
        }
        let h = self.norm.forward(&x.squeeze(0)?.index_select(&Tensor::new(last.as_slice(), &dev)?, 0)?, self.quant.kernels)?;
        Ok(self.logits_from_hidden(&h)?.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Incremental decoding: runs `ids: [B, T]` after what `cache` holds, appends their K/V and
    /// returns logits `[B, T, vocab]`. Use on a `freeze()`d model.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let past = cache.len();
        let positions: Vec<u32> = (past as u32..(past + t) as u32).collect();
        let mask = self.causal_mask(t, past, &[])?;
        let (x, _) = self.embed_ids(ids)?;
        let h = self.run_layers(x, &positions, &mask, Some(cache))?;
        self.logits_from_hidden(&h)
    }

    /// Incremental decoding of a batch of left-padded rows: row b starts with `pad[b]` padding
    /// positions (in `ids` at prefill, and so in the cache). Each row gets its own positions
    /// (0 at its first real token) and never attends to its padding, so its logits equal those of
    /// the row run alone. Returns logits `[B, T, vocab]`.
    pub fn forward_cached_padded(&self, ids: &Tensor, pad: &[usize], cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if pad.len() != b {
            return Err(crate::Error::Msg(format!("forward_cached_padded: {} pad entries for {b} rows", pad.len())));
        }
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let past = cache.len();
        let positions: Vec<u32> =
            pad.iter().flat_map(|&p| (past..past + t).map(move |q| q.saturating_sub(p) as u32)).collect();
        let (dt, dev) = (self.dtype(), self.device().clone());
        let hd = self.cfg.head_dim();
        let (cos, sin) = self.rope.cos_sin(&positions, dt, &dev)?;
        let (cos, sin) = (cos.reshape((b, 1, t, hd))?, sin.reshape((b, 1, t, hd))?);
        let mask = self.causal_mask(t, past, pad)?;
        let (x, _) = self.embed_ids(ids)?;
        let h = self.run_layers_with(x, &cos, &sin, &mask, Some(cache))?;
        self.logits_from_hidden(&h)
    }

    fn run_layers(
        &self,
        x: Tensor,
        positions: &[u32],
        mask: &AttnMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope.cos_sin(positions, x.dtype(), x.device())?;
        self.run_layers_with(x, &cos, &sin, mask, cache)
    }

    /// The decoder stack with explicit RoPE tables (`[T, hd]`, or `[B, 1, T, hd]` for per-row
    /// positions) and the attention mask.
    pub fn run_layers_with(
        &self,
        mut x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = (cos.clone(), sin.clone());
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.block(&x, &self.quant, |h| layer.attn.forward(h, &cos, &sin, mask, slot, &self.quant))?;
        }
        self.norm.forward(&x, self.quant.kernels)
    }
}

/// The architecture recorded in a GGUF file's qwen3.* metadata.
pub fn config_from_gguf(file: &crate::export::gguf::GgufFile) -> Result<Qwen3Config> {
    let origin = file.path.display().to_string();
    let arch = file.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
    if arch != "qwen3" {
        return Err(crate::Error::model_config(&origin, format!("general.architecture: expected \"qwen3\", found \"{arch}\"")));
    }
    let int = |k: &str| -> Result<usize> {
        file.get(&format!("qwen3.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| crate::Error::model_config(&origin, format!("missing integer key 'qwen3.{k}'")))
    };
    let float = |k: &str| -> Result<f64> {
        file.get(&format!("qwen3.{k}"))
            .and_then(|v| v.as_f64())
            .ok_or_else(|| crate::Error::model_config(&origin, format!("missing number key 'qwen3.{k}'")))
    };
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| crate::Error::model_config(&origin, "missing tensor 'token_embd.weight'"))?;
    let mut cfg = Qwen3Config::qwen3_0_6b();
    cfg.hidden_size = int("embedding_length")?;
    cfg.intermediate_size = int("feed_forward_length")?;
    cfg.num_hidden_layers = int("block_count")?;
    cfg.num_attention_heads = int("attention.head_count")?;
    cfg.num_key_value_heads = Some(int("attention.head_count_kv")?);
    cfg.head_dim = Some(int("attention.key_length")?);
    cfg.rms_norm_eps = float("attention.layer_norm_rms_epsilon")?;
    cfg.rope_theta = float("rope.freq_base")?;
    cfg.max_position_embeddings = int("context_length")?;
    cfg.vocab_size = embd.rows_cols().0;
    cfg.tie_word_embeddings = file.tensor("output.weight").is_none();
    cfg.eos_token_id = file.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(serde_json::Value::from);
    cfg.bos_token_id = None;
    cfg.validate(&origin)?;
    Ok(cfg)
}
