//! Tree speculative decoding with greedy verification (DFlash-style: one target forward per
//! draft tree).
//!
//! Layout of one round. The KV cache holds the context except its last token `x` (accepted but
//! not yet run through the target). The verified block is node 0 = `x` followed by the draft
//! tree's nodes, parents in topological order (a parent's index is below its children's). Node i
//! sits at position `ctx + depth(i)` and attends to the whole cached context, itself and its
//! ancestors, never to siblings or other branches (an additive mask `[n, ctx + n]`). ONE target
//! forward scores all nodes. Acceptance walks down from node 0: a child is accepted iff its token
//! equals the target's argmax at its parent; a rejected node drops its whole subtree (the walk
//! never enters it, even if a grandchild would have matched). The target's argmax at the deepest
//! accepted node is the bonus token. The cache then keeps the context, node 0 and the accepted
//! path (index_select along time) and the bonus becomes the next round's node 0. The output is
//! therefore exactly greedy decoding's, token for token.
//!
//! Drafts: prompt lookup (the last n tokens, n = 3..1, matched earlier in the context; the tokens
//! that followed each of up to W matches, most recent first, merged into a trie of depth <= D),
//! or a smaller tern model (its top W tokens after `x`, each continued greedily to depth D).
//!
//! Cost per round: one target forward over 1 + |tree| tokens (attention against the cache is
//! O(ctx * |tree|)), plus the drafting. On a GPU the tree mask is the only change to a batched
//! prefill kernel.

use super::generate::last_logits;
use super::sampler::argmax;
use crate::error::{Error, Result};
use crate::model::{KvCache, Model, TreeStep};
use candle_core::{DType, Tensor};

/// A draft tree: `tokens[i]` with parent `parents[i]` (`None` = child of node 0, the last
/// context token), parents before children.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DraftTree {
    pub tokens: Vec<u32>,
    pub parents: Vec<Option<usize>>,
}

impl DraftTree {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Adds a chain below node `parent` (None = root), reusing existing nodes with the same token
    /// (a trie), up to `max_nodes`.
    pub fn add_chain(&mut self, chain: &[u32], max_nodes: usize) {
        let mut parent: Option<usize> = None;
        for &t in chain {
            let existing =
                (0..self.len()).find(|&i| self.parents[i] == parent && self.tokens[i] == t);
            parent = match existing {
                Some(i) => Some(i),
                None if self.len() < max_nodes => {
                    self.tokens.push(t);
                    self.parents.push(parent);
                    Some(self.len() - 1)
                }
                None => return,
            };
        }
    }

    fn check(&self) -> Result<()> {
        if self.parents.len() != self.tokens.len() {
            return Err(Error::Msg(
                "draft tree: tokens and parents differ in length".into(),
            ));
        }
        for (i, p) in self.parents.iter().enumerate() {
            if matches!(p, Some(p) if *p >= i) {
                return Err(Error::Msg(format!(
                    "draft tree: node {i} has parent {p:?}, not before it"
                )));
            }
        }
        Ok(())
    }
}

/// The verified block: node 0 (last context token) + the tree; parent of each block node
/// (block indices; node 0 has none) and depth (node 0 = 0).
fn block_structure(tree: &DraftTree) -> (Vec<Option<usize>>, Vec<usize>) {
    let mut parents = vec![None];
    let mut depth = vec![0usize];
    for p in &tree.parents {
        let bp = p.map_or(0, |p| p + 1);
        parents.push(Some(bp));
        depth.push(depth[bp] + 1);
    }
    (parents, depth)
}

/// Additive tree mask `[1 + n, ctx + 1 + n]` (0 visible, -inf hidden) for the block.
pub fn tree_mask(ctx: usize, tree: &DraftTree) -> Vec<Vec<f32>> {
    let (parents, _) = block_structure(tree);
    let n = parents.len();
    (0..n)
        .map(|i| {
            let mut row = vec![0f32; ctx];
            row.extend(std::iter::repeat_n(f32::NEG_INFINITY, n));
            let mut a = Some(i);
            while let Some(j) = a {
                row[ctx + j] = 0.0;
                a = parents[j];
            }
            row
        })
        .collect()
}

/// Greedy acceptance: `argmax[i]` is the target's argmax at block node i. Returns the accepted
/// block nodes (excluding node 0, root to leaf) and the bonus token.
pub fn accept(tree: &DraftTree, argmax: &[u32]) -> (Vec<usize>, u32) {
    let (parents, _) = block_structure(tree);
    let mut path = Vec::new();
    let mut cur = 0usize;
    loop {
        let want = argmax[cur];
        // Children of `cur` only: nodes under a rejected node are never considered.
        match (1..parents.len()).find(|&c| parents[c] == Some(cur) && tree.tokens[c - 1] == want) {
            Some(c) => {
                path.push(c);
                cur = c;
            }
            None => return (path, want),
        }
    }
}

/// Where drafts come from.
pub enum Drafter<'a> {
    /// Prompt lookup: n-gram matches in the context.
    Ngram,
    /// A smaller model, with its own cache of the context.
    Model { model: &'a Model, cache: KvCache },
}

/// Prompt-lookup draft: for n = 3, 2, 1, earlier occurrences of the last n tokens (most recent
/// first); the up to `depth` tokens after each of up to `width` matches, merged into a trie.
pub fn ngram_draft(ctx: &[u32], depth: usize, width: usize) -> DraftTree {
    let mut tree = DraftTree::default();
    let max_nodes = depth * width;
    let mut used = 0;
    for n in (1..=3usize).rev() {
        if ctx.len() <= n {
            continue;
        }
        let tail = &ctx[ctx.len() - n..];
        for start in (0..ctx.len() - n).rev() {
            if used == width {
                return tree;
            }
            if &ctx[start..start + n] == tail {
                let follow = &ctx[start + n..(start + n + depth).min(ctx.len())];
                if !follow.is_empty() {
                    let before = tree.len();
                    tree.add_chain(follow, max_nodes);
                    if tree.len() > before {
                        used += 1;
                    }
                }
            }
        }
    }
    tree
}

/// Draft from a smaller model: its top `width` tokens after the context, each continued
/// greedily to `depth` tokens (each branch on a clone of the draft's cache).
fn model_draft(
    model: &Model,
    cache: &mut KvCache,
    ctx: &[u32],
    depth: usize,
    width: usize,
) -> Result<DraftTree> {
    // Bring the draft cache to ctx[..len-1], then score the last token.
    let have = cache.len().min(ctx.len() - 1);
    cache.truncate(have)?;
    let dev = model.device().clone();
    let feed = &ctx[have..];
    let h = model.forward(&Tensor::new(feed, &dev)?.unsqueeze(0)?, cache)?;
    cache.truncate(ctx.len() - 1)?; // the next round feeds from the last context token again
    let first = last_logits(model, &h)?.swap_remove(0);
    let top = super::topk::softmax_topk(&first, width);
    let mut tree = DraftTree::default();
    for &t in &top.ids {
        let mut branch = cache.try_clone()?;
        // The branch cache must hold the whole context: run the last context token and t.
        let mut chain = vec![t];
        let mut feed = vec![*ctx.last().expect("non-empty"), t];
        while chain.len() < depth {
            let h = model.forward(
                &Tensor::new(feed.as_slice(), &dev)?.unsqueeze(0)?,
                &mut branch,
            )?;
            let next = argmax(&last_logits(model, &h)?[0]);
            chain.push(next);
            feed = vec![next];
        }
        tree.add_chain(&chain, depth * width);
    }
    Ok(tree)
}

/// Statistics of one speculative generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecStats {
    pub rounds: usize,
    /// Draft tokens accepted over all rounds.
    pub accepted: usize,
    pub drafted: usize,
}

impl SpecStats {
    /// Tokens emitted per target forward (accepted + bonus).
    pub fn mean_accepted_length(&self) -> f64 {
        if self.rounds == 0 {
            0.0
        } else {
            (self.accepted + self.rounds) as f64 / self.rounds as f64
        }
    }
}

/// Greedy generation of up to `max_new` tokens with tree speculation; stops at an EOS id.
/// Returns the new tokens (identical to plain greedy decoding) and statistics.
pub fn generate_speculative(
    target: &Model,
    drafter: &mut Drafter,
    prompt: &[u32],
    max_new: usize,
    depth: usize,
    width: usize,
    eos: &[u32],
) -> Result<(Vec<u32>, SpecStats)> {
    super::generate::check_prompts(
        std::slice::from_ref(&prompt.to_vec()),
        target.cfg.vocab_size,
    )?;
    if let Drafter::Model { model, .. } = drafter {
        if model.cfg.vocab_size != target.cfg.vocab_size {
            return Err(Error::Msg(format!(
                "--draft-model has a vocabulary of {} but the target has {}: they must share the tokenizer",
                model.cfg.vocab_size, target.cfg.vocab_size
            )));
        }
    }
    if depth == 0 || width == 0 {
        return Err(Error::Msg(
            "--draft-depth and --draft-width must be at least 1".into(),
        ));
    }
    let dev = target.device().clone();
    let mut cache = KvCache::new(target.cfg.num_hidden_layers);
    if prompt.len() > 1 {
        target.forward(
            &Tensor::new(&prompt[..prompt.len() - 1], &dev)?.unsqueeze(0)?,
            &mut cache,
        )?;
    }
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    let mut stats = SpecStats::default();
    while out.len() < max_new {
        let tree = match drafter {
            Drafter::Ngram => ngram_draft(&ctx, depth, width),
            Drafter::Model { model, cache: dc } => model_draft(model, dc, &ctx, depth, width)?,
        };
        tree.check()?;
        let past = cache.len();
        let (_, depths) = block_structure(&tree);
        let positions: Vec<u32> = depths.iter().map(|d| (past + d) as u32).collect();
        let mut ids = vec![*ctx.last().expect("non-empty context")];
        ids.extend(&tree.tokens);
        let mask: Vec<f32> = tree_mask(past, &tree).concat();
        let n = ids.len();
        let mask = Tensor::from_vec(mask, (n, past + n), &dev)?;
        let ids = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let h = target.forward(&ids, &mut TreeStep::new(&mut cache, positions, mask))?;
        let rows = target
            .logits(&h.squeeze(0)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let am: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
        let (path, bonus) = accept(&tree, &am);
        // Keep the context, node 0 and the accepted path.
        cache.keep(
            past,
            &std::iter::once(past)
                .chain(path.iter().map(|&c| past + c))
                .collect::<Vec<_>>(),
        )?;
        stats.rounds += 1;
        stats.drafted += tree.len();
        stats.accepted += path.len();
        for t in path
            .iter()
            .map(|&c| tree.tokens[c - 1])
            .chain(std::iter::once(bonus))
        {
            out.push(t);
            ctx.push(t);
            if eos.contains(&t) || out.len() == max_new {
                return Ok((out, stats));
            }
        }
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> DraftTree {
        // roots a(0), b(1); a -> c(2), d(3); c -> e(4)
        DraftTree {
            tokens: vec![10, 11, 12, 13, 14],
            parents: vec![None, None, Some(0), Some(0), Some(2)],
        }
    }

    #[test]
    fn tree_mask_sees_context_self_and_ancestors_only() {
        let m = tree_mask(2, &tree());
        let vis =
            |i: usize| -> Vec<usize> { (0..m[i].len()).filter(|&j| m[i][j] == 0.0).collect() };
        // block: 0 = last context token, 1 = a, 2 = b, 3 = c, 4 = d, 5 = e; context = columns 0, 1
        assert_eq!(vis(0), vec![0, 1, 2]);
        assert_eq!(vis(1), vec![0, 1, 2, 3]);
        assert_eq!(vis(2), vec![0, 1, 2, 4]);
        assert_eq!(vis(3), vec![0, 1, 2, 3, 5]);
        assert_eq!(vis(4), vec![0, 1, 2, 3, 6]);
        assert_eq!(vis(5), vec![0, 1, 2, 3, 5, 7]);
        let (_, depth) = block_structure(&tree());
        assert_eq!(depth, vec![0, 1, 1, 2, 2, 3]);
    }

    #[test]
    fn a_rejected_node_drops_its_subtree_even_if_a_child_would_match() {
        let t = tree();
        // Target argmax at node 0 is 11 (b accepted, a rejected). At a (block 1) the argmax is
        // 12 = c's token: c "would match" but sits under the rejected a.
        let am = vec![11, 12, 99, 14, 0, 0];
        let (path, bonus) = accept(&t, &am);
        assert_eq!(path, vec![2]); // b only
        assert_eq!(bonus, 99); // argmax at b
                               // The target's argmax at b is 12, the token of c, a child of the rejected a: c is not a
                               // child of b, so it is not accepted and 12 is the bonus.
        let (path, bonus) = accept(&t, &[11, 0, 12, 0, 0, 0]);
        assert_eq!(path, vec![2]);
        assert_eq!(bonus, 12);
        // Everything rejected: no path, the bonus is the argmax at node 0.
        let (path, bonus) = accept(&t, &[7, 12, 99, 14, 0, 0]);
        assert!(path.is_empty());
        assert_eq!(bonus, 7);
        // The deep path a -> c -> e.
        let (path, bonus) = accept(&t, &[10, 12, 0, 14, 0, 5]);
        assert_eq!(path, vec![1, 3, 5]);
        assert_eq!(bonus, 5);
    }

    #[test]
    fn ngram_drafts_follow_earlier_matches_most_recent_first() {
        let ctx = vec![1, 2, 3, 9, 1, 2, 3, 8, 7, 5, 1, 2, 3];
        let t = ngram_draft(&ctx, 2, 2);
        // "1 2 3" occurred before at 4 (followed by 8 7) and at 0 (followed by 9 1).
        assert_eq!(t.tokens, vec![8, 7, 9, 1]);
        assert_eq!(t.parents, vec![None, Some(0), None, Some(2)]);
    }
}
