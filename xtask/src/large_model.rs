//! A GPT-2-style decoder scaled past protobuf's 2 GiB (width 2048, 16 heads, 11 blocks,
//! vocabulary 8192: 2.35 GB of f32 weights), built with qgraph from seeded random weights of
//! GPT-2's initial scale and saved with external data, to check that a model beyond the limit
//! loads, calibrates and exports in less memory than its weights take.

use std::path::Path;

use anyhow::{Context, Result};
use qgraph::{Attribute, DType, Graph, Model, Shape, Tensor, ValueId};

/// The decoder's dimensions.
pub struct Dims {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Decoder blocks.
    pub blocks: usize,
    /// Tokens per sample.
    pub tokens: usize,
}

/// The dimensions `cargo xtask bench large` uses.
pub const PAST_2_GB: Dims = Dims { vocab: 8192, width: 2048, heads: 16, blocks: 11, tokens: 32 };

/// A seeded xorshift sequence: weights uniform at a given standard deviation, and token ids.
struct Weights(u64);

impl Weights {
    /// The next value of the xorshift sequence.
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn tensor(&mut self, shape: &[usize], std: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let half_width = std * 3f32.sqrt();
        let data = (0..n)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width)
            .collect();
        Tensor::from_vec(shape, data).expect("shape and data agree")
    }
}

fn constant(g: &mut Graph, name: &str, t: Tensor) -> ValueId {
    g.add_initializer(name, t)
}

fn i64s(g: &mut Graph, name: &str, v: &[i64]) -> ValueId {
    constant(g, name, Tensor::from_vec(&[v.len()], v.to_vec()).expect("1-D"))
}

/// Builds the decoder: token and position embeddings, pre-norm blocks of causal multi-head
/// attention and a tanh-GELU MLP with residual additions, a final norm and the vocabulary head.
pub fn build(d: &Dims) -> Model {
    let (w, t, h) = (d.width, d.tokens, d.heads);
    let dh = w / h;
    let mut rng = Weights(0x9e37_79b9_7f4a_7c15);
    let mut g = Graph::new("gpt_past_2gb");
    let ids = g.add_input("input_ids", DType::I64, Shape::known(&[1, t]));
    let wte = constant(&mut g, "wte", rng.tensor(&[d.vocab, w], 0.02));
    let wpe = constant(&mut g, "wpe", rng.tensor(&[t, w], 0.01));
    let tok = g.add_op("Gather", "embed", &[wte, ids], vec![]);
    let mut x = g.add_op("Add", "embed_pos", &[tok, wpe], vec![]);
    let ones = Tensor::from_vec(&[w], vec![1f32; w]).expect("1-D");
    let zeros = Tensor::from_vec(&[w], vec![0f32; w]).expect("1-D");
    let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e4 } else { 0.0 }).collect();
    let mask = constant(&mut g, "causal_mask", Tensor::from_vec(&[t, t], mask).expect("2-D"));
    let heads_shape = i64s(&mut g, "heads_shape", &[1, t as i64, h as i64, dh as i64]);
    let merged_shape = i64s(&mut g, "merged_shape", &[1, t as i64, w as i64]);
    let split = i64s(&mut g, "qkv_split", &[w as i64; 3]);
    let scale = constant(&mut g, "attn_scale", Tensor::scalar(1.0 / (dh as f32).sqrt()));
    let perm = |p: &[i64]| vec![("perm", Attribute::Ints(p.to_vec()))];
    let norm = |g: &mut Graph, x: ValueId, name: &str| {
        let gamma = constant(g, &format!("{name}.weight"), ones.clone());
        let beta = constant(g, &format!("{name}.bias"), zeros.clone());
        g.add_op("LayerNormalization", name, &[x, gamma, beta], vec![("epsilon", Attribute::Float(1e-5))])
    };
    let mut linear = |g: &mut Graph, x: ValueId, name: &str, k: usize, n: usize| {
        let wt = constant(g, &format!("{name}.weight"), rng.tensor(&[k, n], 0.02));
        let b = constant(g, &format!("{name}.bias"), rng.tensor(&[n], 0.01));
        let y = g.add_op("MatMul", &format!("{name}/MatMul"), &[x, wt], vec![]);
        g.add_op("Add", &format!("{name}/Add"), &[y, b], vec![])
    };
    for i in 0..d.blocks {
        let p = format!("h.{i}");
        let a = norm(&mut g, x, &format!("{p}.ln_1"));
        let qkv = linear(&mut g, a, &format!("{p}.attn.c_attn"), w, 3 * w);
        let s = g.add_node(qgraph::NodeSpec {
            name: format!("{p}.attn/Split"),
            op_type: "Split".into(),
            domain: String::new(),
            attrs: vec![("axis".into(), Attribute::Int(-1))],
            inputs: vec![Some(qkv), Some(split)],
            outputs: ["q", "k", "v"].iter().map(|n| format!("{p}.attn/{n}")).collect(),
        });
        let qkv: Vec<ValueId> = g.node(s).outputs().iter().flatten().copied().collect();
        let heads = |g: &mut Graph, v: ValueId, n: &str, order: &[i64]| {
            let r = g.add_op("Reshape", &format!("{p}.attn/{n}_heads"), &[v, heads_shape], vec![]);
            g.add_op("Transpose", &format!("{p}.attn/{n}_t"), &[r], perm(order))
        };
        let q = heads(&mut g, qkv[0], "q", &[0, 2, 1, 3]);
        let k = heads(&mut g, qkv[1], "k", &[0, 2, 3, 1]);
        let v = heads(&mut g, qkv[2], "v", &[0, 2, 1, 3]);
        let scores = g.add_op("MatMul", &format!("{p}.attn/scores"), &[q, k], vec![]);
        let scaled = g.add_op("Mul", &format!("{p}.attn/scale"), &[scores, scale], vec![]);
        let masked = g.add_op("Add", &format!("{p}.attn/mask"), &[scaled, mask], vec![]);
        let probs =
            g.add_op("Softmax", &format!("{p}.attn/softmax"), &[masked], vec![("axis", Attribute::Int(-1))]);
        let o = g.add_op("MatMul", &format!("{p}.attn/context"), &[probs, v], vec![]);
        let o = g.add_op("Transpose", &format!("{p}.attn/merge_t"), &[o], perm(&[0, 2, 1, 3]));
        let o = g.add_op("Reshape", &format!("{p}.attn/merge"), &[o, merged_shape], vec![]);
        let o = linear(&mut g, o, &format!("{p}.attn.c_proj"), w, w);
        x = g.add_op("Add", &format!("{p}/residual_1"), &[x, o], vec![]);
        let m = norm(&mut g, x, &format!("{p}.ln_2"));
        let m = linear(&mut g, m, &format!("{p}.mlp.c_fc"), w, 4 * w);
        let m = g.add_op(
            "Gelu",
            &format!("{p}.mlp/gelu"),
            &[m],
            vec![("approximate", Attribute::String(b"tanh".to_vec()))],
        );
        let m = linear(&mut g, m, &format!("{p}.mlp.c_proj"), 4 * w, w);
        x = g.add_op("Add", &format!("{p}/residual_2"), &[x, m], vec![]);
    }
    let x = norm(&mut g, x, "ln_f");
    let head = constant(&mut g, "lm_head.weight", rng.tensor(&[w, d.vocab], 0.02));
    let logits = g.add_op("MatMul", "lm_head", &[x, head], vec![]);
    g.add_output(logits);
    Model::new(g, 20)
}

/// Writes the decoder to `dir/gpt.onnx` with its weights in `gpt.onnx.data` (unless present)
/// and `samples` token sequences to `dir/input_ids.npy` (the first alone in `first_ids.npy`);
/// returns the weights' bytes and whether the model was written now.
pub fn write(dir: &Path, d: &Dims, samples: usize) -> Result<(u64, bool)> {
    std::fs::create_dir_all(dir)?;
    let model = dir.join("gpt.onnx");
    let fresh = !model.exists() || !dir.join("gpt.onnx.data").exists();
    if fresh {
        qgraph::save_path_with_external_data(&build(d), &model).context("saving the decoder")?;
    }
    let mut tokens = Weights(0x2545_f491_4f6c_dd1d);
    let ids =
        ndarray::Array2::from_shape_fn((samples, d.tokens), |_| (tokens.next() % d.vocab as u64) as i64);
    ndarray_npy::write_npy(dir.join("input_ids.npy"), &ids)?;
    ndarray_npy::write_npy(dir.join("first_ids.npy"), &ids.slice(ndarray::s![..1, ..]).to_owned())?;
    Ok((std::fs::metadata(dir.join("gpt.onnx.data"))?.len(), fresh))
}
