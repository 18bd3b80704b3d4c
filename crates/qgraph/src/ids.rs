//! Typed indices into the graph arena: `NodeId` for nodes, `ValueId` for values (tensors), and
//! `Outlet` for "output slot k of node n". Indices are plain `u32`s so side tables can be `Vec`s.

use std::fmt;

/// Index of a node in `Graph::nodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) u32);

/// Index of a value (a named tensor) in `Graph::values`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub(crate) u32);

impl NodeId {
    /// The index as `usize`, for side tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl ValueId {
    /// The index as `usize`, for side tables keyed by value.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0)
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "value#{}", self.0)
    }
}

/// One use or definition site: input or output slot `slot` of node `node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Outlet {
    /// The node.
    pub node: NodeId,
    /// The slot index among that node's inputs or outputs.
    pub slot: usize,
}
