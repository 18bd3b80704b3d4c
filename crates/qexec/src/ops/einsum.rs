//! `Einsum`: any equation with explicit or implicit output, ellipses (broadcast like numpy),
//! repeated labels within an operand (diagonals) and any number of operands. A two-operand
//! contraction without diagonals or broadcasting (attention's `bhid,bhjd->bhij` and the like)
//! becomes transposes around one batched `sgemm`; anything else sums, per output cell, the
//! product of its operands over the contracted labels, walked with per-operand strides (f32 data,
//! f64 accumulation).

use qgraph::{Node, Tensor};

use super::{Activation, ExecCtx, Kernel, f32_data, tensor_from};
use crate::error::{KernelResult, Result};

/// A parsed equation: per operand its labels (ellipsis dims as labels from 128 on), and the
/// output labels.
struct Einsum {
    inputs: Vec<Vec<u8>>,
    /// Explicit output labels (`None`: implicit, derived from the inputs).
    output: Option<Vec<u8>>,
    /// Whether the inputs use `...`, and where each operand's ellipsis sits.
    ellipsis_at: Vec<Option<usize>>,
    output_ellipsis_at: Option<usize>,
}

pub(super) fn compile(node: &Node) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "Einsum" {
        return None;
    }
    Some((|| {
        let eq = node.string_attr("equation")?.ok_or_else(|| super::invalid(node, "equation is missing"))?;
        parse(eq).map(|e| Box::new(e) as Box<dyn Kernel>).map_err(|e| super::invalid(node, e))
    })())
}

/// Letters of a term, with the position of its `...` (if any).
fn term(t: &str) -> std::result::Result<(Vec<u8>, Option<usize>), String> {
    let mut labels = Vec::new();
    let mut at = None;
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("...") {
            if at.is_some() {
                return Err(format!("term '{t}' has two ellipses"));
            }
            at = Some(labels.len());
            rest = r;
            continue;
        }
        let c = rest.as_bytes()[0];
        if !c.is_ascii_alphabetic() {
            return Err(format!("term '{t}' holds '{}', not a letter", c as char));
        }
        labels.push(c);
        rest = &rest[1..];
    }
    Ok((labels, at))
}

fn parse(eq: &str) -> std::result::Result<Einsum, String> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let mut inputs = Vec::new();
    let mut ellipsis_at = Vec::new();
    for t in lhs.split(',') {
        let (labels, at) = term(t)?;
        inputs.push(labels);
        ellipsis_at.push(at);
    }
    let (output, output_ellipsis_at) = match rhs {
        Some(r) => {
            let (labels, at) = term(r)?;
            (Some(labels), at)
        }
        None => (None, None),
    };
    Ok(Einsum { inputs, output, ellipsis_at, output_ellipsis_at })
}

/// A two-operand contraction as one batched product: A permuted to `[batch, left, contracted]`,
/// B to `[batch, contracted, right]`, the product permuted to the output's order. `None` when
/// the equation has diagonals, broadcast dims or labels summed within one operand.
fn as_matmul(
    ops: &[&Tensor],
    terms: &[Vec<u8>],
    out: &[u8],
    size: &[usize; 256],
    ctx: &ExecCtx<'_>,
) -> KernelResult<Option<Vec<f32>>> {
    let ([a, b], [ta, tb]) = (ops, terms) else { return Ok(None) };
    let plain = |t: &Tensor, term: &[u8]| {
        term.iter()
            .enumerate()
            .all(|(i, &l)| term[..i].iter().all(|&m| m != l) && t.shape()[i] == size[l as usize])
    };
    if !plain(a, ta) || !plain(b, tb) {
        return Ok(None);
    }
    let (in_a, in_b, in_out) = (|l: &u8| ta.contains(l), |l: &u8| tb.contains(l), |l: &u8| out.contains(l));
    if ta.iter().chain(tb.iter()).any(|l| !(in_out(l) || (in_a(l) && in_b(l)))) {
        return Ok(None);
    }
    let batch: Vec<u8> = out.iter().copied().filter(|l| in_a(l) && in_b(l)).collect();
    let left: Vec<u8> = out.iter().copied().filter(|l| in_a(l) && !in_b(l)).collect();
    let right: Vec<u8> = out.iter().copied().filter(|l| in_b(l) && !in_a(l)).collect();
    let contracted: Vec<u8> = ta.iter().copied().filter(|l| in_b(l) && !in_out(l)).collect();
    let prod = |ls: &[u8]| ls.iter().map(|&l| size[l as usize]).product::<usize>();
    let (nb, m, k, n) = (prod(&batch), prod(&left), prod(&contracted), prod(&right));
    let order = |term: &[u8], groups: [&[u8]; 3]| -> Vec<usize> {
        groups.iter().flat_map(|g| g.iter()).filter_map(|l| term.iter().position(|m| m == l)).collect()
    };
    let pa = order(ta, [&batch, &left, &contracted]);
    let pb = order(tb, [&batch, &contracted, &right]);
    let xa = super::movement::permute(&f32_data(a)?, a.shape(), &pa);
    let xb = super::movement::permute(&f32_data(b)?, b.shape(), &pb);
    let mut r = vec![0f32; nb * m * n];
    for i in 0..nb {
        super::matmul::sgemm(
            m,
            n,
            k,
            super::matmul::MatRef { data: &xa[i * m * k..(i + 1) * m * k], rs: k, cs: 1 },
            super::matmul::MatRef { data: &xb[i * k * n..(i + 1) * k * n], rs: n, cs: 1 },
            1.0,
            &mut r[i * m * n..(i + 1) * m * n],
            n,
            false,
            ctx.gemm_parallelism(),
        )?;
    }
    let produced: Vec<u8> = batch.iter().chain(&left).chain(&right).copied().collect();
    let shape: Vec<usize> = produced.iter().map(|&l| size[l as usize]).collect();
    let perm: Vec<usize> = out.iter().filter_map(|l| produced.iter().position(|m| m == l)).collect();
    Ok(Some(super::movement::permute(&r, &shape, &perm)))
}

/// Label of ellipsis dim `k` (counted from the left of a `width`-dim ellipsis).
fn ellipsis_label(k: usize) -> u8 {
    128 + k as u8
}

/// A term's labels with its ellipsis expanded to `width` labels (right-aligned numbering).
fn expand(labels: &[u8], at: Option<usize>, width: usize, own: usize) -> Vec<u8> {
    match at {
        None => labels.to_vec(),
        Some(p) => {
            let mut v = labels[..p].to_vec();
            v.extend((width - own..width).map(ellipsis_label));
            v.extend_from_slice(&labels[p..]);
            v
        }
    }
}

impl Kernel for Einsum {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        ctx: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let ops: Vec<&Tensor> = inputs.iter().flatten().collect();
        if ops.len() != self.inputs.len() {
            return Err(format!("the equation has {} operands, the node {}", self.inputs.len(), ops.len()));
        }
        // Per operand: how many dims its ellipsis covers; the widest sets the output's.
        let mut own = Vec::with_capacity(ops.len());
        for (i, t) in ops.iter().enumerate() {
            let rank = t.shape().len();
            let n = self.inputs[i].len();
            match self.ellipsis_at[i] {
                None if rank != n => return Err(format!("operand {i} has rank {rank}, its term {n} labels")),
                Some(_) if rank < n => {
                    return Err(format!("operand {i} has rank {rank}, fewer than its labels"));
                }
                _ => own.push(rank - n),
            }
        }
        let width = own.iter().copied().max().unwrap_or(0);
        if width > 64 {
            return Err(format!("an ellipsis of {width} dims"));
        }
        let terms: Vec<Vec<u8>> =
            (0..ops.len()).map(|i| expand(&self.inputs[i], self.ellipsis_at[i], width, own[i])).collect();
        // Size of every label (broadcasting 1s across operands for the ellipsis dims).
        let mut size = [0usize; 256];
        let mut seen = [false; 256];
        for (t, labels) in ops.iter().zip(&terms) {
            for (&l, &d) in labels.iter().zip(t.shape()) {
                let s = &mut size[l as usize];
                if !seen[l as usize] || *s == 1 {
                    *s = d;
                } else if d != *s && !(d == 1 && l >= 128) {
                    return Err(format!("label '{}' has sizes {} and {d}", l as char, *s));
                }
                seen[l as usize] = true;
            }
        }
        let out_labels: Vec<u8> = match &self.output {
            Some(o) => expand(
                o,
                self.output_ellipsis_at,
                width,
                if self.output_ellipsis_at.is_some() { width } else { 0 },
            ),
            None => {
                let mut count = [0usize; 256];
                terms.iter().flatten().for_each(|&l| count[l as usize] += 1);
                let mut once: Vec<u8> =
                    (b'A'..=b'z').filter(|&l| l < 128 && count[l as usize] == 1).collect();
                once.sort_unstable();
                let mut v: Vec<u8> = (0..width).map(ellipsis_label).collect();
                v.extend(once);
                v
            }
        };
        if let Some(&l) = out_labels.iter().find(|&&l| !seen[l as usize]) {
            return Err(format!("output label '{}' is not among the inputs", l as char));
        }
        let mut sum_labels: Vec<u8> = Vec::new();
        for &l in terms.iter().flatten() {
            if !out_labels.contains(&l) && !sum_labels.contains(&l) {
                sum_labels.push(l);
            }
        }
        let out_shape: Vec<usize> = out_labels.iter().map(|&l| size[l as usize]).collect();
        let total = ctx.checked_len(&out_shape, 4)?;
        if let Some(out) = as_matmul(&ops, &terms, &out_labels, &size, ctx)? {
            return Ok(vec![tensor_from(&out_shape, out)?]);
        }
        let sum_dims: Vec<usize> = sum_labels.iter().map(|&l| size[l as usize]).collect();
        let sum_total =
            sum_dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("contraction too large")?;
        super::bounded_steps(total as u128 * sum_total as u128 * ops.len() as u128, "the contraction")?;
        // Per operand and label: the operand's stride for that label (0 where broadcast).
        let data: Vec<std::borrow::Cow<'_, [f32]>> =
            ops.iter().map(|t| f32_data(t)).collect::<KernelResult<_>>()?;
        let strides_for = |labels: &[u8]| -> Vec<Vec<usize>> {
            ops.iter()
                .zip(&terms)
                .map(|(t, term)| {
                    let st = super::strides_of(t.shape());
                    labels
                        .iter()
                        .map(|&l| {
                            term.iter()
                                .zip(t.shape())
                                .zip(&st)
                                .filter(|&((&m, &d), _)| m == l && d != 1)
                                .map(|(_, &s)| s)
                                .sum()
                        })
                        .collect()
                })
                .collect()
        };
        let (out_strides, sum_strides) = (strides_for(&out_labels), strides_for(&sum_labels));
        let mut out = vec![0f32; total];
        let mut o_idx = vec![0usize; out_labels.len()];
        let mut s_idx = vec![0usize; sum_labels.len()];
        let mut base = vec![0usize; ops.len()];
        let mut at = vec![0usize; ops.len()];
        for cell in out.iter_mut() {
            for (k, b) in base.iter_mut().enumerate() {
                *b = o_idx.iter().zip(&out_strides[k]).map(|(i, s)| i * s).sum();
            }
            let mut acc = 0f64;
            s_idx.iter_mut().for_each(|v| *v = 0);
            for _ in 0..sum_total {
                for (k, a) in at.iter_mut().enumerate() {
                    *a = base[k] + s_idx.iter().zip(&sum_strides[k]).map(|(i, s)| i * s).sum::<usize>();
                }
                acc += at.iter().zip(&data).map(|(&a, d)| f64::from(d[a])).product::<f64>();
                for d in (0..s_idx.len()).rev() {
                    s_idx[d] += 1;
                    if s_idx[d] < sum_dims[d] {
                        break;
                    }
                    s_idx[d] = 0;
                }
            }
            *cell = acc as f32;
            for d in (0..o_idx.len()).rev() {
                o_idx[d] += 1;
                if o_idx[d] < out_shape[d] {
                    break;
                }
                o_idx[d] = 0;
            }
        }
        Ok(vec![tensor_from(&out_shape, out)?])
    }
}
