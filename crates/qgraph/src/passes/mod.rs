//! Graph transformations: batch-norm folding, `Identity`/`Dropout` removal, constant folding of
//! shape sub-graphs, inlining of `If` nodes whose condition is known, and dead-node elimination. Each pass keeps the arena consistent and sorted.

mod bn_fold;
mod cleanup;
mod const_fold;
mod inline_if;

pub use bn_fold::{BnFold, BnFoldDirection, fold_batch_norms};
pub use cleanup::{eliminate_dead_nodes, remove_identities};
pub use const_fold::fold_constants;
pub use inline_if::inline_static_ifs;
