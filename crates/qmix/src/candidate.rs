//! AMP candidates (spec §7.1, §7.3): an (activation, parameter) precision pair — the weights
//! optionally in blocks (`w4b32a16`: int4 weights, one encoding per output channel and block of
//! 32 input channels) — its bit-ops cost, and which candidates a quantizer group may take under
//! the config's `supported_kernels`.

use std::collections::HashMap;

use qcalib::{
    BlockLayout, Granularity, Kernel, KernelPrecision, Placement, Precision, QuantSim, QuantizerId,
    QuantsimConfig,
};

/// The ops whose weights block candidates split into blocks (as `--block-size` does).
const BLOCKED_OPS: [&str; 3] = ["Conv", "Gemm", "MatMul"];

/// What candidates with weights in blocks need: the layout of each weight quantizer that can be
/// split, the biases that go with them, and every parameter quantizer's own granularity and
/// symmetry, to go back to under a candidate without blocks.
#[derive(Debug, Clone)]
pub(crate) struct WeightBlocks {
    layouts: HashMap<QuantizerId, BlockLayout>,
    biases: Vec<QuantizerId>,
    own: HashMap<QuantizerId, (Granularity, bool)>,
}

impl WeightBlocks {
    pub fn of(sim: &QuantSim) -> WeightBlocks {
        let p = sim.placement();
        let (layouts, _) = p.block_layouts(&sim.model().graph, &BLOCKED_OPS);
        let layouts: HashMap<QuantizerId, BlockLayout> =
            layouts.into_iter().map(|(q, _, l)| (q, l)).collect();
        let biases = layouts.values().filter_map(|l| l.bias).collect();
        let own = p
            .quantizer_ids()
            .into_iter()
            .filter(|&q| p.quantizer(q).is_param)
            .map(|q| (q, (p.quantizer(q).granularity, p.quantizer(q).symmetric)))
            .collect();
        WeightBlocks { layouts, biases, own }
    }

    /// Whether parameters `params` can take blocks of `block` input channels: none at all, or
    /// every one a weight that splits into such blocks or the bias of one.
    pub fn supports(&self, params: &[QuantizerId], block: usize) -> bool {
        params.iter().all(|q| {
            self.biases.contains(q) || self.layouts.get(q).is_some_and(|l| l.in_channels % block == 0)
        }) && (params.is_empty() || params.iter().any(|q| self.layouts.contains_key(q)))
    }

    /// Sets parameters `params` to `c`'s side: its precision, in blocks when it has them (where
    /// [`WeightBlocks::supports`] allowed), else at their own granularity.
    pub fn set(&self, p: &mut Placement, params: &[QuantizerId], c: Candidate) {
        for &q in params {
            if let Some(&(granularity, symmetric)) = self.own.get(&q) {
                let quantizer = p.quantizer_mut(q);
                if !quantizer.frozen
                    && (quantizer.granularity, quantizer.symmetric) != (granularity, symmetric)
                {
                    quantizer.granularity = granularity;
                    quantizer.symmetric = symmetric;
                    quantizer.encodings = None;
                }
            }
            p.quantizer_mut(q).set_precision(c.param);
        }
        if let Some(block) = c.block {
            for &q in params {
                if let Some(&layout) = self.layouts.get(&q) {
                    // A frozen weight keeps its learned encodings (the reason is not needed here).
                    let _ = p.set_weight_blocks(q, layout, c.param, true, block);
                }
            }
        }
    }
}

/// One precision choice for a quantizer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Precision of the group's activation quantizers.
    pub activation: Precision,
    /// Precision of the group's parameter quantizers.
    pub param: Precision,
    /// Input channels per block of the group's weights (`None`: the config's granularity).
    pub block: Option<usize>,
}

/// Float precisions count `√1.5` times their bits in the cost model (AIMET's
/// `FLOATING_POINT_MULTIPLIER`).
const FLOAT_COST_FACTOR: f64 = 1.224_744_871_391_589;

/// The bits a precision costs in the bit-ops model.
pub fn effective_bits(p: Precision) -> f64 {
    if p.is_int() { f64::from(p.bits()) } else { f64::from(p.bits()) * FLOAT_COST_FACTOR }
}

impl Candidate {
    /// A candidate with the config's weight granularity.
    pub fn new(activation: Precision, param: Precision) -> Candidate {
        Candidate { activation, param, block: None }
    }

    /// Parses `w8a16`, `a16w8`, `W16A16`, `wfp16afp16`, … (`int` prefixes allowed: `wint8aint16`);
    /// integer weights in blocks as `w4b32a16` (or `a16w4b32`).
    pub fn parse(s: &str) -> Option<Candidate> {
        let lower = s.to_ascii_lowercase();
        fn split(s: &str, first: char, second: char) -> Option<(&str, &str)> {
            let rest = s.strip_prefix(first)?;
            let at = rest.find(second)?;
            Some((&rest[..at], &rest[at + 1..]))
        }
        let (w, a) = match split(&lower, 'w', 'a') {
            Some((w, a)) => (w, a),
            None => split(&lower, 'a', 'w').map(|(a, w)| (w, a))?,
        };
        let (param, block) = weight_side(w)?;
        Some(Candidate { activation: side(a)?, param, block })
    }

    /// `eff(activation) · eff(param)`, the cost per MAC.
    pub fn cost(self) -> f64 {
        effective_bits(self.activation) * effective_bits(self.param)
    }

    /// Total bits, the secondary key of the phase-1 sort.
    pub fn total_bits(self) -> u32 {
        self.activation.bits() + self.param.bits()
    }

    /// AIMET's label in its reports, e.g. `a16int_w8int` (`a16int_w4int_b32` in blocks).
    pub fn aimet_label(self) -> String {
        let side = |p: Precision| format!("{}{}", p.bits(), if p.is_int() { "int" } else { "float" });
        let block = self.block.map_or_else(String::new, |b| format!("_b{b}"));
        format!("a{}_w{}{block}", side(self.activation), side(self.param))
    }
}

/// A weight side: a precision, or integer bits in blocks (`4b32`).
fn weight_side(s: &str) -> Option<(Precision, Option<usize>)> {
    let blocked =
        s.split_once('b').filter(|(bits, _)| !bits.is_empty() && bits.chars().all(|c| c.is_ascii_digit()));
    match blocked {
        Some((bits, block)) => {
            let block: usize = block.parse().ok().filter(|&b| b > 0)?;
            Some((Precision::parse(&format!("int{bits}"))?, Some(block)))
        }
        None => Some((side(s)?, None)),
    }
}

fn side(s: &str) -> Option<Precision> {
    let s = s.strip_prefix("int").unwrap_or(s);
    if s.chars().all(|c| c.is_ascii_digit()) {
        return Precision::parse(&format!("int{s}"));
    }
    Precision::parse(s)
}

impl std::fmt::Display for Candidate {
    /// `W8A16`, `Wfp16Afp16`, …
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |p: Precision| match p {
            Precision::Int(b) => b.to_string(),
            Precision::Float16 => "fp16".into(),
            Precision::BFloat16 => "bf16".into(),
        };
        let block = self.block.map_or_else(String::new, |b| format!("B{b}"));
        write!(f, "W{}{block}A{}", side(self.param), side(self.activation))
    }
}

/// Whether one side of a kernel is precision `p`.
pub(crate) fn matches(kp: KernelPrecision, p: Precision) -> bool {
    kp.bitwidth == p.bits() && kp.float != p.is_int()
}

/// The user candidates one `supported_kernels` list allows: full entries match both sides,
/// activation-only entries the activation side.
fn allowed_by(kernels: &[Kernel], user: &[Candidate]) -> Vec<Candidate> {
    user.iter()
        .copied()
        .filter(|c| {
            kernels
                .iter()
                .any(|k| matches(k.activation, c.activation) && k.param.is_none_or(|p| matches(p, c.param)))
        })
        .collect()
}

/// The candidates a group whose quantizers belong to ops of `op_types` may take: every user
/// candidate when the config lists no kernels (all shipped configs) or `use_all`; otherwise the
/// intersection over its quantizers of what their op's (or the default) kernels allow, highest
/// `(activation bits, param bits)` first. `None` when nothing is left.
pub fn supported_candidates(
    config: &QuantsimConfig,
    op_types: &[&str],
    user: &[Candidate],
    use_all: bool,
) -> Option<Vec<Candidate>> {
    let any_kernels = !config.defaults.supported_kernels.is_empty()
        || config.op_types.values().any(|r| !r.supported_kernels.is_empty());
    if use_all || !any_kernels {
        return Some(user.to_vec());
    }
    let mut allowed: Vec<Candidate> = user.to_vec();
    for op in op_types {
        let kernels = config
            .op_types
            .get(*op)
            .map(|r| &r.supported_kernels)
            .filter(|k| !k.is_empty())
            .unwrap_or(&config.defaults.supported_kernels);
        let here = if kernels.is_empty() { user.to_vec() } else { allowed_by(kernels, user) };
        allowed.retain(|c| here.contains(c));
    }
    allowed.sort_by_key(|c| std::cmp::Reverse((c.activation.bits(), c.param.bits())));
    (!allowed.is_empty()).then_some(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_orders_and_floats() {
        let c = Candidate::parse("w8a16").unwrap();
        assert_eq!((c.param, c.activation), (Precision::Int(8), Precision::Int(16)));
        assert_eq!(
            Candidate::parse("A16W8"),
            Some(c).map(|c| Candidate { activation: c.activation, param: c.param, block: None })
        );
        let f = Candidate::parse("wfp16afp16").unwrap();
        assert_eq!(f.param, Precision::Float16);
        assert_eq!(Candidate::parse("wint4aint8").unwrap().param, Precision::Int(4));
        assert!(Candidate::parse("w8").is_none());
        // Weights in blocks, either order; bfloat16 is not a block.
        let b = Candidate::parse("w4b32a16").unwrap();
        assert_eq!((b.param, b.activation, b.block), (Precision::Int(4), Precision::Int(16), Some(32)));
        assert_eq!(Candidate::parse("A16W4B32"), Some(b));
        assert_eq!(
            (b.to_string(), b.aimet_label()),
            ("W4B32A16".to_string(), "a16int_w4int_b32".to_string())
        );
        assert_eq!(b.cost(), Candidate::new(Precision::Int(16), Precision::Int(4)).cost());
        assert_eq!(Candidate::parse("wbf16abf16").unwrap().param, Precision::BFloat16);
        assert!(Candidate::parse("w4b0a8").is_none() && Candidate::parse("wfp16b32a8").is_none());
        assert!(Candidate::parse("w99a8").is_none());
        assert_eq!(c.to_string(), "W8A16");
        assert_eq!(c.aimet_label(), "a16int_w8int");
    }

    #[test]
    fn float_costs_more_than_its_bits() {
        let f = Candidate::parse("wfp16afp16").unwrap();
        assert!((f.cost() - 16.0 * 16.0 * 1.5).abs() < 1e-9);
        assert_eq!(Candidate::parse("w8a8").unwrap().cost(), 64.0);
    }
}
