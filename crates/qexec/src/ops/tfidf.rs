//! `TfIdfVectorizer` over integer tokens: n-grams of the pool (with skips) counted per row, then
//! reported as counts (TF), presence weights (IDF) or weighted counts (TFIDF), following the
//! ONNX reference's walk (unigrams counted once, whatever the skip).

use std::collections::{HashMap, HashSet};

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input, ints_of, tensor_from};
use crate::error::{KernelResult, Result};

#[derive(Clone, Copy, PartialEq)]
enum Weighting {
    Tf,
    Idf,
    TfIdf,
}

struct TfIdf {
    min_gram: usize,
    max_gram: usize,
    max_skip: usize,
    weighting: Weighting,
    /// Each pool n-gram and its output index.
    grams: HashMap<Vec<i64>, usize>,
    /// Every prefix of a pool n-gram (a walk stops at the first token outside them).
    prefixes: HashSet<Vec<i64>>,
    weights: Vec<f32>,
    outputs: usize,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "TfIdfVectorizer" {
        return None;
    }
    Some((|| {
        let bad = |what: String| super::invalid(node, what);
        let size = |name: &str| -> Result<usize> {
            let v = node.int_attr(name, 0)?;
            usize::try_from(v).map_err(|_| bad(format!("{name} {v} is negative")))
        };
        let (min_gram, max_gram, max_skip) =
            (size("min_gram_length")?, size("max_gram_length")?, size("max_skip_count")?);
        if min_gram == 0 || min_gram > max_gram {
            return Err(bad(format!("gram lengths {min_gram}..={max_gram} are not a range from 1")));
        }
        let weighting = match node.string_attr("mode")?.unwrap_or("TF") {
            "TF" => Weighting::Tf,
            "IDF" => Weighting::Idf,
            "TFIDF" => Weighting::TfIdf,
            other => return Err(bad(format!("unknown mode '{other}'"))),
        };
        let pool = node
            .ints_attr("pool_int64s")?
            .map(<[i64]>::to_vec)
            .ok_or_else(|| bad("pool_int64s is missing (string pools are not supported)".into()))?;
        let counts = node.ints_attr("ngram_counts")?.map(<[i64]>::to_vec).unwrap_or_default();
        let indexes = node.ints_attr("ngram_indexes")?.map(<[i64]>::to_vec).unwrap_or_default();
        let mut grams = HashMap::new();
        let mut prefixes = HashSet::new();
        let mut k = 0usize;
        for (i, &start) in counts.iter().enumerate() {
            let n = i + 1;
            let end = counts.get(i + 1).copied().unwrap_or(pool.len() as i64);
            let (start, end) = (usize::try_from(start).ok(), usize::try_from(end).ok());
            let (Some(start), Some(end)) = (start, end) else {
                return Err(bad("ngram_counts holds a negative start".into()));
            };
            if start > end || end > pool.len() || (end - start) % n != 0 {
                return Err(bad(format!("ngram_counts {counts:?} do not split a pool of {}", pool.len())));
            }
            for gram in pool[start..end].chunks(n) {
                let at = indexes
                    .get(k)
                    .copied()
                    .ok_or_else(|| bad(format!("no ngram_indexes entry for n-gram {k}")))?;
                let at = usize::try_from(at)
                    .ok()
                    .filter(|&a| a < 1 << 24)
                    .ok_or_else(|| bad(format!("ngram index {at} is out of range")))?;
                grams.insert(gram.to_vec(), at);
                for p in 1..=n {
                    prefixes.insert(gram[..p].to_vec());
                }
                k += 1;
            }
        }
        let outputs = indexes.iter().copied().max().map_or(0, |m| m.max(-1) + 1) as usize;
        let weights: Vec<f32> = match node.attr("weights") {
            Some(qgraph::Attribute::Floats(w)) => w.clone(),
            Some(_) => return Err(bad("weights is not a list of floats".into())),
            None => Vec::new(),
        };
        Ok(Box::new(TfIdf { min_gram, max_gram, max_skip, weighting, grams, prefixes, weights, outputs })
            as Box<dyn Kernel>)
    })())
}

impl TfIdf {
    /// Adds the n-gram counts of one row of tokens into `freq`.
    fn count(&self, row: &[i64], freq: &mut [i64]) {
        let mut min_gram = self.min_gram;
        // A skip as long as the row finds no n-gram beyond unigrams.
        for skip in 1..=self.max_skip.saturating_add(1).min(row.len().max(1)) {
            for start in 0..row.len() {
                if start + skip * (min_gram - 1) >= row.len() {
                    break;
                }
                let mut gram = Vec::with_capacity(self.max_gram);
                let mut at = start;
                while gram.len() < self.max_gram && at < row.len() {
                    gram.push(row[at]);
                    if !self.prefixes.contains(&gram) {
                        break;
                    }
                    if gram.len() >= min_gram
                        && let Some(&i) = self.grams.get(&gram)
                    {
                        freq[i] += 1;
                    }
                    at += skip;
                }
            }
            // Unigrams do not depend on the skip: count them once.
            if min_gram == 1 {
                min_gram = 2;
                if min_gram > self.max_gram {
                    break;
                }
            }
        }
    }
}

impl Kernel for TfIdf {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let x = input(inputs, 0)?;
        let (rows, width, shape) = match x.shape() {
            [] => (1, 1, vec![self.outputs]),
            [c] => (1, *c, vec![self.outputs]),
            [b, c] => (*b, *c, vec![*b, self.outputs]),
            s => return Err(format!("input must be [C] or [B, C], got {s:?}")),
        };
        ctx.checked_len(&shape, 8)?;
        let tokens = ints_of(x)?;
        let mut freq = vec![0i64; rows * self.outputs];
        if width > 0 {
            for (r, row) in tokens.chunks(width).enumerate() {
                self.count(row, &mut freq[r * self.outputs..(r + 1) * self.outputs]);
            }
        }
        let weight = |i: usize| self.weights.get(i % self.outputs.max(1)).copied();
        let out: Vec<f32> = freq
            .iter()
            .enumerate()
            .map(|(i, &f)| match self.weighting {
                Weighting::Tf => f as f32,
                Weighting::Idf if f > 0 => weight(i).unwrap_or(1.0),
                Weighting::Idf => 0.0,
                Weighting::TfIdf => weight(i).unwrap_or(1.0) * f as f32,
            })
            .collect();
        Ok(vec![tensor_from(&shape, out)?])
    }
}
