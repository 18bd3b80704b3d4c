//! Graph transformations: batch-norm folding, `Identity`/`Dropout` removal, constant folding of
//! shape sub-graphs and dead-node elimination. Each pass keeps the arena consistent and sorted.

mod bn_fold;
mod cleanup;
mod const_fold;

pub use bn_fold::{BnFold, BnFoldDirection, fold_batch_norms};
pub use cleanup::{eliminate_dead_nodes, remove_identities};
pub use const_fold::fold_constants;
