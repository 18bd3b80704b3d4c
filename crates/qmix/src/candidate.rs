//! AMP candidates (spec §7.1, §7.3): an (activation, parameter) precision pair, its bit-ops cost,
//! and which candidates a quantizer group may take under the config's `supported_kernels`.

use qcalib::{Kernel, KernelPrecision, Precision, QuantsimConfig};

/// One precision choice for a quantizer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Precision of the group's activation quantizers.
    pub activation: Precision,
    /// Precision of the group's parameter quantizers.
    pub param: Precision,
}

/// Float precisions count `√1.5` times their bits in the cost model (AIMET's
/// `FLOATING_POINT_MULTIPLIER`).
const FLOAT_COST_FACTOR: f64 = 1.224_744_871_391_589;

/// The bits a precision costs in the bit-ops model.
pub fn effective_bits(p: Precision) -> f64 {
    if p.is_int() { f64::from(p.bits()) } else { f64::from(p.bits()) * FLOAT_COST_FACTOR }
}

impl Candidate {
    /// Parses `w8a16`, `a16w8`, `W16A16`, `wfp16afp16`, … (`int` prefixes allowed: `wint8aint16`).
    pub fn parse(s: &str) -> Option<Candidate> {
        let lower = s.to_ascii_lowercase();
        let split = |s: &str, first: char, second: char| -> Option<(Precision, Precision)> {
            let rest = s.strip_prefix(first)?;
            let at = rest.find(second)?;
            Some((side(&rest[..at])?, side(&rest[at + 1..])?))
        };
        if let Some((param, activation)) = split(&lower, 'w', 'a') {
            return Some(Candidate { activation, param });
        }
        let (activation, param) = split(&lower, 'a', 'w')?;
        Some(Candidate { activation, param })
    }

    /// `eff(activation) · eff(param)`, the cost per MAC.
    pub fn cost(self) -> f64 {
        effective_bits(self.activation) * effective_bits(self.param)
    }

    /// Total bits, the secondary key of the phase-1 sort.
    pub fn total_bits(self) -> u32 {
        self.activation.bits() + self.param.bits()
    }

    /// AIMET's label in its reports, e.g. `a16int_w8int`.
    pub fn aimet_label(self) -> String {
        let side = |p: Precision| format!("{}{}", p.bits(), if p.is_int() { "int" } else { "float" });
        format!("a{}_w{}", side(self.activation), side(self.param))
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
        write!(f, "W{}A{}", side(self.param), side(self.activation))
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
            Some(c).map(|c| Candidate { activation: c.activation, param: c.param })
        );
        let f = Candidate::parse("wfp16afp16").unwrap();
        assert_eq!(f.param, Precision::Float16);
        assert_eq!(Candidate::parse("wint4aint8").unwrap().param, Precision::Int(4));
        assert!(Candidate::parse("w8").is_none());
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
