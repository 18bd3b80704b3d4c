//! Shapes with symbolic dimensions (`Dim::Symbol("batch")`), and `DimBindings`, which give sizes
//! to symbolic dims so shape inference can make shapes static.

use std::collections::HashMap;
use std::fmt;

/// One dimension: a known size or a named symbol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A concrete size.
    Known(usize),
    /// A symbolic size (ONNX `dim_param`, or empty for an anonymous unknown dim).
    Symbol(String),
}

impl Dim {
    /// The size if known.
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Symbol(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Symbol(s) if s.is_empty() => f.write_str("?"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

/// Number of elements of a shape, `None` when the product overflows `usize` (sizes computed
/// from a model are checked before anything is allocated).
pub fn checked_numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A tensor shape, possibly with symbolic dims.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A fully known shape.
    pub fn known(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Known(d)).collect())
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// All dims if every one is known.
    pub fn to_known(&self) -> Option<Vec<usize>> {
        self.0.iter().map(Dim::known).collect()
    }

    /// Number of elements if every dim is known and the count fits `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.to_known().and_then(|d| checked_numel(&d))
    }

    /// Dim `i`, negative counting from the end.
    pub fn dim(&self, i: i64) -> Option<&Dim> {
        let r = self.rank() as i64;
        let i = if i < 0 { i + r } else { i };
        if (0..r).contains(&i) { self.0.get(i as usize) } else { None }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Sizes for symbolic dims: by name, with an optional size for every other symbol.
#[derive(Debug, Clone, Default)]
pub struct DimBindings {
    /// Size per symbol name, e.g. `seq = 128`.
    pub named: HashMap<String, usize>,
    /// Size of any symbol not named (e.g. batch 1 for `inspect`).
    pub default: Option<usize>,
}

impl DimBindings {
    /// Every symbol bound to `n`.
    pub fn all(n: usize) -> DimBindings {
        DimBindings { named: HashMap::new(), default: Some(n) }
    }

    /// Adds a named binding.
    pub fn with(mut self, name: &str, n: usize) -> DimBindings {
        self.named.insert(name.to_string(), n);
        self
    }

    /// Replaces bound symbols of `shape` by their sizes.
    pub fn apply(&self, shape: &Shape) -> Shape {
        Shape(
            shape
                .0
                .iter()
                .map(|d| match d {
                    Dim::Symbol(s) => {
                        self.named.get(s).copied().or(self.default).map_or_else(|| d.clone(), Dim::Known)
                    }
                    known => known.clone(),
                })
                .collect(),
        )
    }
}
