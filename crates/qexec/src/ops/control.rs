//! `If`: each branch is compiled as a session of its own when the node is, its outer-scope
//! reads becoming inputs fed from the values the session hands the node after its condition
//! (in [`qgraph::subgraph_outer_names`] order); the branch the condition picks runs, on the
//! calling thread.

use qgraph::{Attribute, Node, Tensor};

use super::{Activation, ExecCtx, Kernel, input};
use crate::error::{KernelResult, Result};
use crate::session::{Session, SessionOptions};

/// One compiled branch and where its outer reads come from among the node's implicit inputs.
struct Branch {
    session: Session,
    /// Per outer name the branch reads: its input name and its index among the node's implicit
    /// inputs.
    feeds: Vec<(String, usize)>,
}

struct If {
    then_branch: Branch,
    else_branch: Branch,
}

pub(super) fn compile(node: &Node, opset: i64) -> Option<Result<Box<dyn Kernel>>> {
    if node.op_type != "If" {
        return None;
    }
    Some((|| {
        let outer = qgraph::subgraph_outer_names(node);
        let branch = |name: &str| -> Result<Branch> {
            let Some(Attribute::Graph(proto)) = node.attr(name) else {
                return Err(super::invalid(node, format!("{name} is missing or not a graph")));
            };
            let (model, reads) = qgraph::subgraph_model(proto, opset)?;
            let feeds = reads
                .into_iter()
                .map(|r| {
                    let at = outer.iter().position(|o| *o == r).ok_or_else(|| {
                        super::invalid(node, format!("{name} reads '{r}', which the node does not see"))
                    })?;
                    Ok((r, at))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Branch { session: Session::new(model, SessionOptions::threads(1))?, feeds })
        };
        Ok(Box::new(If { then_branch: branch("then_branch")?, else_branch: branch("else_branch")? })
            as Box<dyn Kernel>)
    })())
}

impl Kernel for If {
    fn run(
        &self,
        inputs: &mut [Option<Tensor>],
        _: &ExecCtx<'_>,
        _: Option<Activation>,
    ) -> KernelResult<Vec<Tensor>> {
        let cond = input(inputs, 0)?;
        if cond.len() != 1 {
            return Err(format!("the condition has {} elements, not one", cond.len()));
        }
        let taken = cond.to_f64_vec().first().is_some_and(|&c| c != 0.0);
        let branch = if taken { &self.then_branch } else { &self.else_branch };
        let mut feeds: Vec<(&str, Tensor)> = Vec::with_capacity(branch.feeds.len());
        for (name, at) in &branch.feeds {
            let t = inputs
                .get(1 + at)
                .and_then(Option::as_ref)
                .ok_or_else(|| format!("outer value '{name}' is missing"))?;
            feeds.push((name.as_str(), t.clone()));
        }
        branch.session.run(&feeds).map_err(|e| format!("{} branch: {e}", if taken { "then" } else { "else" }))
    }
}
