//! The graph arena: `Node`s and `Value`s in `Vec`s addressed by `NodeId`/`ValueId`, ONNX names kept
//! as labels. Nodes are always stored in a topological order; every mutation goes through `Graph`
//! methods so producer/consumer links stay consistent.

use std::collections::{HashMap, HashSet};

use onnx_protobuf::FunctionProto;

use crate::attr::Attribute;
use crate::dtype::DType;
use crate::error::{GraphError, Result};
use crate::ids::{NodeId, Outlet, ValueId};
use crate::lazy::LazyTensor;
use crate::shape::Shape;
use crate::tensor::Tensor;

/// An operator-set import of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opset {
    /// The domain (`""` for the default `ai.onnx`).
    pub domain: String,
    /// The opset version.
    pub version: i64,
}

/// A loaded model: the main graph plus the model-level ONNX fields kept for saving.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// ONNX IR version.
    pub ir_version: i64,
    /// Operator-set imports.
    pub opsets: Vec<Opset>,
    /// `producer_name`.
    pub producer_name: String,
    /// `producer_version`.
    pub producer_version: String,
    /// Model `domain`.
    pub domain: String,
    /// `model_version`.
    pub model_version: i64,
    /// `doc_string`.
    pub doc_string: String,
    /// `metadata_props` as key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// Model-local functions, kept verbatim.
    pub functions: Vec<FunctionProto>,
    /// The main graph.
    pub graph: Graph,
}

impl Model {
    /// A model around `graph` importing the default domain at `opset` (IR version 8).
    pub fn new(graph: Graph, opset: i64) -> Model {
        Model {
            ir_version: 8,
            opsets: vec![Opset { domain: String::new(), version: opset }],
            producer_name: "qgraph".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 0,
            doc_string: String::new(),
            metadata: Vec::new(),
            functions: Vec::new(),
            graph,
        }
    }

    /// The version of the default (`ai.onnx`) opset, 0 if absent.
    pub fn default_opset(&self) -> i64 {
        self.opsets.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version)
    }
}

/// An operator instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Node name (unique; filled deterministically at load when the file has none).
    pub name: String,
    /// ONNX op type, e.g. `Conv`.
    pub op_type: String,
    /// Op domain (`""` for `ai.onnx`).
    pub domain: String,
    /// Attributes in file order.
    pub attrs: Vec<(String, Attribute)>,
    /// `doc_string`.
    pub doc_string: String,
    pub(crate) inputs: Vec<Option<ValueId>>,
    pub(crate) outputs: Vec<Option<ValueId>>,
    pub(crate) implicit_inputs: Vec<ValueId>,
}

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSource {
    /// A graph input fed at run time.
    Input,
    /// An initializer stored in the model.
    Initializer,
    /// Output slot of a node.
    Node(Outlet),
}

/// A named tensor of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// ONNX name; encodings files refer to tensors by it.
    pub name: String,
    /// Element type, if known.
    pub dtype: Option<DType>,
    /// Shape, if known (dims may be symbolic).
    pub shape: Option<Shape>,
    /// The data of an initializer or of a `Constant` node's output.
    pub data: Option<Tensor>,
    /// The data of an initializer read on demand (mapped external data, or derived from such);
    /// `data`, when set, takes precedence.
    pub lazy: Option<LazyTensor>,
    pub(crate) source: ValueSource,
    pub(crate) consumers: Vec<Outlet>,
    pub(crate) implicit_consumers: Vec<NodeId>,
}

impl Value {
    /// Where the value comes from.
    pub fn source(&self) -> ValueSource {
        self.source
    }
}

/// The graph arena.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// `doc_string`.
    pub doc_string: String,
    pub(crate) nodes: Vec<Node>,
    pub(crate) values: Vec<Value>,
    pub(crate) inputs: Vec<ValueId>,
    pub(crate) outputs: Vec<ValueId>,
    pub(crate) by_name: HashMap<String, ValueId>,
}

/// Graphs are equal when they have the same nodes in the same order (op, attributes, and input and
/// output names), the same values by name (type, shape, data, kind of source) and the same inputs
/// and outputs. Arena numbering does not matter, so a built graph equals its reloaded copy.
impl PartialEq for Graph {
    fn eq(&self, other: &Self) -> bool {
        let names = |g: &Graph, ids: &[Option<ValueId>]| -> Vec<Option<String>> {
            ids.iter().map(|v| v.map(|v| g.value(v).name.clone())).collect()
        };
        let io = |g: &Graph, ids: &[ValueId]| -> Vec<String> {
            ids.iter().map(|&v| g.value(v).name.clone()).collect()
        };
        let kind = |v: &Value| match v.source {
            ValueSource::Input => 0,
            ValueSource::Initializer => 1,
            ValueSource::Node(_) => 2,
        };
        self.name == other.name
            && self.doc_string == other.doc_string
            && self.nodes.len() == other.nodes.len()
            && self.values.len() == other.values.len()
            && io(self, &self.inputs) == io(other, &other.inputs)
            && io(self, &self.outputs) == io(other, &other.outputs)
            && self.nodes.iter().zip(&other.nodes).all(|(a, b)| {
                a.name == b.name
                    && a.op_type == b.op_type
                    && a.domain == b.domain
                    && a.attrs == b.attrs
                    && a.doc_string == b.doc_string
                    && names(self, &a.inputs) == names(other, &b.inputs)
                    && names(self, &a.outputs) == names(other, &b.outputs)
            })
            && self.values.iter().all(|a| {
                other.value_id(&a.name).map(|id| other.value(id)).is_some_and(|b| {
                    a.dtype == b.dtype
                        && a.shape == b.shape
                        && a.data == b.data
                        && a.lazy == b.lazy
                        && kind(a) == kind(b)
                })
            })
    }
}

impl Node {
    /// Input value ids; `None` marks an omitted optional input.
    pub fn inputs(&self) -> &[Option<ValueId>] {
        &self.inputs
    }

    /// Output value ids; `None` marks an omitted optional output.
    pub fn outputs(&self) -> &[Option<ValueId>] {
        &self.outputs
    }

    /// Input `slot`, if present and not omitted.
    pub fn input(&self, slot: usize) -> Option<ValueId> {
        self.inputs.get(slot).copied().flatten()
    }

    /// Output `slot`, if present and not omitted.
    pub fn output(&self, slot: usize) -> Option<ValueId> {
        self.outputs.get(slot).copied().flatten()
    }

    /// Outer-scope values read by this node's subgraph attributes.
    pub fn implicit_inputs(&self) -> &[ValueId] {
        &self.implicit_inputs
    }

    /// The attribute called `name`.
    pub fn attr(&self, name: &str) -> Option<&Attribute> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    fn attr_error(&self, attr: &str, detail: String) -> GraphError {
        GraphError::Attribute { node: self.name.clone(), op: self.op_type.clone(), attr: attr.into(), detail }
    }

    /// An `INT` attribute, or `default` when absent.
    pub fn int_attr(&self, name: &str, default: i64) -> Result<i64> {
        match self.attr(name) {
            None => Ok(default),
            Some(Attribute::Int(v)) => Ok(*v),
            Some(other) => Err(self.attr_error(name, format!("expected int, found {}", other.kind()))),
        }
    }

    /// A `FLOAT` attribute, or `default` when absent.
    pub fn float_attr(&self, name: &str, default: f32) -> Result<f32> {
        match self.attr(name) {
            None => Ok(default),
            Some(Attribute::Float(v)) => Ok(*v),
            Some(other) => Err(self.attr_error(name, format!("expected float, found {}", other.kind()))),
        }
    }

    /// An `INTS` attribute, `None` when absent.
    pub fn ints_attr(&self, name: &str) -> Result<Option<&[i64]>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::Ints(v)) => Ok(Some(v)),
            Some(other) => Err(self.attr_error(name, format!("expected ints, found {}", other.kind()))),
        }
    }

    /// A `STRING` attribute as UTF-8, `None` when absent.
    pub fn string_attr(&self, name: &str) -> Result<Option<&str>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::String(v)) => {
                std::str::from_utf8(v).map(Some).map_err(|_| self.attr_error(name, "not valid UTF-8".into()))
            }
            Some(other) => Err(self.attr_error(name, format!("expected string, found {}", other.kind()))),
        }
    }

    /// A `TENSOR` attribute, `None` when absent.
    pub fn tensor_attr(&self, name: &str) -> Result<Option<&Tensor>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::Tensor(t)) => Ok(Some(t)),
            Some(other) => Err(self.attr_error(name, format!("expected tensor, found {}", other.kind()))),
        }
    }

    /// An error about attribute `attr` of this node.
    pub fn invalid_attr(&self, attr: &str, detail: impl Into<String>) -> GraphError {
        self.attr_error(attr, detail.into())
    }

    /// A shape error about this node.
    pub fn shape_error(&self, detail: impl Into<String>) -> GraphError {
        GraphError::Shape { node: self.name.clone(), op: self.op_type.clone(), detail: detail.into() }
    }

    /// Whether the node is in the default ONNX domain.
    pub fn is_onnx_domain(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }
}

/// What `Graph::add_node` needs to create a node.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// Node name (made unique if taken).
    pub name: String,
    /// Op type.
    pub op_type: String,
    /// Domain.
    pub domain: String,
    /// Attributes.
    pub attrs: Vec<(String, Attribute)>,
    /// Inputs; `None` for omitted optional inputs.
    pub inputs: Vec<Option<ValueId>>,
    /// Names of the output values to create.
    pub outputs: Vec<String>,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of values.
    pub fn value_count(&self) -> usize {
        self.values.len()
    }

    /// Node ids in topological order (the arena order).
    pub fn node_ids(&self) -> impl ExactSizeIterator<Item = NodeId> + use<> {
        (0..self.nodes.len() as u32).map(NodeId)
    }

    /// Nodes with their ids, in topological order.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (NodeId(i as u32), n))
    }

    /// Value ids in arena order.
    pub fn value_ids(&self) -> impl ExactSizeIterator<Item = ValueId> + use<> {
        (0..self.values.len() as u32).map(ValueId)
    }

    /// The node `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// Mutable access to a node's name, attributes and doc string (links are changed through
    /// `Graph` methods).
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.index()]
    }

    /// The value `id`.
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    /// Mutable access to a value's type, shape and data (rename with `rename_value`).
    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        &mut self.values[id.index()]
    }

    /// The value called `name`.
    pub fn value_id(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    /// The node whose name is `name` (linear scan).
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.nodes().find(|(_, n)| n.name == name).map(|(id, _)| id)
    }

    /// Graph inputs fed at run time (initializers are not listed here).
    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }

    /// Graph outputs.
    pub fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }

    /// Initializers, in arena order.
    pub fn initializers(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.value_ids().filter(|&v| self.value(v).source == ValueSource::Initializer)
    }

    /// The node output slot producing `v`, if a node produces it.
    pub fn producer(&self, v: ValueId) -> Option<Outlet> {
        match self.value(v).source {
            ValueSource::Node(o) => Some(o),
            _ => None,
        }
    }

    /// The producing node of `v`, if any.
    pub fn producer_node(&self, v: ValueId) -> Option<&Node> {
        self.producer(v).map(|o| self.node(o.node))
    }

    /// The input slots reading `v` (implicit subgraph reads not included).
    pub fn consumers(&self, v: ValueId) -> &[Outlet] {
        &self.value(v).consumers
    }

    /// Number of reads of `v`: input slots, subgraph reads, and one more if it is a graph output.
    pub fn use_count(&self, v: ValueId) -> usize {
        let val = self.value(v);
        val.consumers.len() + val.implicit_consumers.len() + self.outputs.iter().filter(|&&o| o == v).count()
    }

    /// Distinct nodes reading `v` (explicitly or through a subgraph), in first-use order.
    pub fn consumer_nodes(&self, v: ValueId) -> Vec<NodeId> {
        let val = self.value(v);
        let mut out: Vec<NodeId> = Vec::new();
        for n in val.consumers.iter().map(|o| o.node).chain(val.implicit_consumers.iter().copied()) {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }

    /// Whether `v` is a graph output.
    pub fn is_output(&self, v: ValueId) -> bool {
        self.outputs.contains(&v)
    }

    /// The data of `v` if it is an initializer or the output of a `Constant` node. A lazy
    /// initializer is read and from then on kept in memory; code that visits every weight once
    /// reads them with [`Graph::load_static`] instead.
    pub fn static_value(&self, v: ValueId) -> Option<&Tensor> {
        let val = self.value(v);
        val.data.as_ref().or_else(|| val.lazy.as_ref().and_then(LazyTensor::resident))
    }

    /// Whether `v` has static data (in memory or lazy).
    pub fn is_static(&self, v: ValueId) -> bool {
        let val = self.value(v);
        val.data.is_some() || val.lazy.is_some()
    }

    /// The shape of `v`'s static data, without reading lazy data.
    pub fn static_shape(&self, v: ValueId) -> Option<&[usize]> {
        let val = self.value(v);
        val.data.as_ref().map(Tensor::shape).or_else(|| val.lazy.as_ref().map(LazyTensor::shape))
    }

    /// The data of `v` if it is static, read now without being kept when it is lazy.
    pub fn load_static(&self, v: ValueId) -> Result<Option<Tensor>> {
        let val = self.value(v);
        match (&val.data, &val.lazy) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(l)) => l.load().map(Some),
            (None, None) => Ok(None),
        }
    }

    fn unique_value_name(&self, base: &str) -> String {
        if !self.by_name.contains_key(base) {
            return base.to_string();
        }
        (1..).map(|k| format!("{base}_{k}")).find(|n| !self.by_name.contains_key(n)).unwrap()
    }

    fn unique_node_name(&self, base: &str) -> String {
        let taken: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        if !taken.contains(base) {
            return base.to_string();
        }
        (1..).map(|k| format!("{base}_{k}")).find(|n| !taken.contains(n.as_str())).unwrap()
    }

    pub(crate) fn push_value(&mut self, name: String, source: ValueSource) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.by_name.insert(name.clone(), id);
        self.values.push(Value {
            name,
            dtype: None,
            shape: None,
            data: None,
            lazy: None,
            source,
            consumers: Vec::new(),
            implicit_consumers: Vec::new(),
        });
        id
    }

    /// Adds an initializer; the name is made unique if taken.
    pub fn add_initializer(&mut self, name: &str, data: Tensor) -> ValueId {
        let name = self.unique_value_name(name);
        let id = self.push_value(name, ValueSource::Initializer);
        let v = self.value_mut(id);
        v.dtype = Some(data.dtype());
        v.shape = Some(Shape::known(data.shape()));
        v.data = Some(data);
        id
    }

    /// Adds an initializer whose data is read on demand; the name is made unique if taken.
    pub fn add_lazy_initializer(&mut self, name: &str, data: LazyTensor) -> ValueId {
        let name = self.unique_value_name(name);
        let id = self.push_value(name, ValueSource::Initializer);
        let v = self.value_mut(id);
        v.dtype = Some(data.dtype());
        v.shape = Some(Shape::known(data.shape()));
        v.lazy = Some(data);
        id
    }

    /// Adds a graph input with the given type.
    pub fn add_input(&mut self, name: &str, dtype: DType, shape: Shape) -> ValueId {
        let name = self.unique_value_name(name);
        let id = self.push_value(name, ValueSource::Input);
        let v = self.value_mut(id);
        v.dtype = Some(dtype);
        v.shape = Some(shape);
        self.inputs.push(id);
        id
    }

    /// Marks `v` as a graph output.
    pub fn add_output(&mut self, v: ValueId) {
        self.outputs.push(v);
    }

    /// Makes `outputs` the graph's outputs, in that order (the previous ones stop being outputs).
    pub fn set_outputs(&mut self, outputs: Vec<ValueId>) {
        self.outputs = outputs;
    }

    /// Appends a node after all existing ones and creates its outputs. Inputs must already exist,
    /// which keeps the arena topologically ordered.
    pub fn add_node(&mut self, spec: NodeSpec) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        let name = self.unique_node_name(if spec.name.is_empty() { &spec.op_type } else { &spec.name });
        let outputs = spec
            .outputs
            .iter()
            .enumerate()
            .map(|(slot, n)| {
                let n = self.unique_value_name(n);
                Some(self.push_value(n, ValueSource::Node(Outlet { node: id, slot })))
            })
            .collect();
        for (slot, v) in spec.inputs.iter().enumerate() {
            if let Some(v) = v {
                self.values[v.index()].consumers.push(Outlet { node: id, slot });
            }
        }
        self.nodes.push(Node {
            name,
            op_type: spec.op_type,
            domain: spec.domain,
            attrs: spec.attrs,
            doc_string: String::new(),
            inputs: spec.inputs,
            outputs,
            implicit_inputs: Vec::new(),
        });
        id
    }

    /// Appends a default-domain node with one output named like the node, and returns that
    /// output: the short form for building small graphs by hand.
    pub fn add_op(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[ValueId],
        attrs: Vec<(&str, Attribute)>,
    ) -> ValueId {
        let id = self.add_node(NodeSpec {
            name: name.into(),
            op_type: op_type.into(),
            domain: String::new(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            inputs: inputs.iter().copied().map(Some).collect(),
            outputs: vec![name.into()],
        });
        self.nodes[id.index()].outputs[0].expect("add_node creates every output")
    }

    /// Renames a value (names are labels; ids do not change). The new name must be free.
    pub fn rename_value(&mut self, v: ValueId, new_name: &str) -> Result<()> {
        if let Some(&other) = self.by_name.get(new_name) {
            if other != v {
                return Err(GraphError::DuplicateValue { name: new_name.into(), by: "rename".into() });
            }
            return Ok(());
        }
        let old = std::mem::replace(&mut self.values[v.index()].name, new_name.to_string());
        self.by_name.remove(&old);
        self.by_name.insert(new_name.to_string(), v);
        Ok(())
    }

    /// Points input `slot` of `node` at `v` (or omits it); slots past the last one are added,
    /// omitted, up to `slot`.
    pub fn set_input(&mut self, node: NodeId, slot: usize, v: Option<ValueId>) {
        let site = Outlet { node, slot };
        let inputs = &mut self.nodes[node.index()].inputs;
        if inputs.len() <= slot {
            inputs.resize(slot + 1, None);
        }
        if let Some(old) = self.nodes[node.index()].inputs[slot] {
            self.values[old.index()].consumers.retain(|o| *o != site);
        }
        if let Some(new) = v {
            self.values[new.index()].consumers.push(site);
        }
        self.nodes[node.index()].inputs[slot] = v;
    }

    /// Stores `t` as input `slot` of `node`: in place when the node is the tensor's only reader
    /// (a `Constant` producer is detached and later removed as dead), else as a new initializer
    /// named `new_name` (made unique), the slot added if the node has fewer inputs.
    pub fn set_static_input(&mut self, node: NodeId, slot: usize, new_name: &str, t: Tensor) {
        match self.node(node).input(slot) {
            Some(v) if self.use_count(v) == 1 && self.is_static(v) => self.make_initializer(v, t),
            _ => {
                let id = self.add_initializer(new_name, t);
                self.set_input(node, slot, Some(id));
            }
        }
    }

    /// Sets the outer-scope values the subgraphs of `node` read (in
    /// [`crate::subgraph_outer_names`] order), replacing any it had.
    pub(crate) fn set_implicit_inputs(&mut self, node: NodeId, values: Vec<ValueId>) {
        for old in std::mem::take(&mut self.nodes[node.index()].implicit_inputs) {
            self.values[old.index()].implicit_consumers.retain(|&n| n != node);
        }
        for &v in &values {
            self.values[v.index()].implicit_consumers.push(node);
        }
        self.nodes[node.index()].implicit_inputs = values;
    }

    /// Replaces every read of `from` (node inputs, subgraph reads and graph outputs) by `to`.
    pub fn replace_uses(&mut self, from: ValueId, to: ValueId) {
        for site in std::mem::take(&mut self.values[from.index()].consumers) {
            self.nodes[site.node.index()].inputs[site.slot] = Some(to);
            self.values[to.index()].consumers.push(site);
        }
        for n in std::mem::take(&mut self.values[from.index()].implicit_consumers) {
            for v in &mut self.nodes[n.index()].implicit_inputs {
                if *v == from {
                    *v = to;
                }
            }
            self.values[to.index()].implicit_consumers.push(n);
        }
        for o in &mut self.outputs {
            if *o == from {
                *o = to;
            }
        }
    }

    /// Turns graph input `name` into an initializer holding `data`: the model specialised for that
    /// value (a sample rate, a mode flag), so what depends on it alone can be computed at load
    /// time. `data` must have the input's dtype and fit its declared shape.
    pub fn bind_input(&mut self, name: &str, data: Tensor) -> Result<()> {
        let bad = |detail: String| GraphError::TensorData { tensor: name.into(), detail };
        let Some(v) = self.by_name.get(name).copied().filter(|v| self.inputs.contains(v)) else {
            let inputs: Vec<&str> =
                self.inputs.iter().map(|&v| self.values[v.index()].name.as_str()).collect();
            return Err(bad(format!("not a graph input (inputs: {})", inputs.join(", "))));
        };
        let value = &self.values[v.index()];
        if let Some(dtype) = value.dtype.filter(|&d| d != data.dtype()) {
            return Err(bad(format!("the input is {dtype}, the value given is {}", data.dtype())));
        }
        if let Some(shape) = &value.shape {
            let fits = shape.rank() == data.shape().len()
                && shape.0.iter().zip(data.shape()).all(|(d, &n)| d.known().is_none_or(|k| k == n));
            if !fits {
                return Err(bad(format!(
                    "the input's shape is {shape}, the value given has {:?}",
                    data.shape()
                )));
            }
        }
        self.inputs.retain(|&i| i != v);
        let val = &mut self.values[v.index()];
        val.source = ValueSource::Initializer;
        val.shape = Some(Shape::known(data.shape()));
        val.dtype = Some(data.dtype());
        val.data = Some(data);
        val.lazy = None;
        Ok(())
    }

    /// [`Graph::bind_input`] with the value given as numbers: a tensor of the input's declared
    /// dtype (integer types need whole numbers) and declared shape (one number for an input of
    /// unknown shape, which becomes a scalar).
    pub fn bind_input_numbers(&mut self, name: &str, values: &[f64]) -> Result<()> {
        let bad = |detail: String| GraphError::TensorData { tensor: name.into(), detail };
        let value = self.value_id(name).map(|v| &self.values[v.index()]);
        let shape = match value.and_then(|v| v.shape.as_ref()).map(Shape::to_known) {
            Some(Some(dims)) => dims,
            None if values.len() == 1 => vec![],
            _ => return Err(bad("the input's shape is not fully declared".into())),
        };
        let count: usize = shape.iter().product();
        if count != values.len() {
            return Err(bad(format!("{} value(s) for an input of shape {shape:?}", values.len())));
        }
        let dtype = value.and_then(|v| v.dtype).unwrap_or(DType::F32);
        let tensor = match dtype {
            DType::F32 => Tensor::from_vec(&shape, values.iter().map(|&v| v as f32).collect()),
            DType::F64 => Tensor::from_vec(&shape, values.to_vec()),
            d if d.is_float() => None,
            d => {
                if let Some(v) = values.iter().find(|v| v.fract() != 0.0 || v.abs() >= 9.0e15) {
                    return Err(bad(format!("{v} is not an integer, as the {d} input needs")));
                }
                let ints: Vec<i64> = values.iter().map(|&v| v as i64).collect();
                Tensor::from_i64s(d, &shape, &ints)
            }
        };
        let tensor = tensor.ok_or_else(|| bad(format!("inputs of type {dtype} cannot be bound")))?;
        self.bind_input(name, tensor)
    }

    /// Turns a node-produced value into an initializer holding `data` (constant folding). The
    /// producing node keeps running until removed; its output slot is detached.
    pub fn make_initializer(&mut self, v: ValueId, data: Tensor) {
        if let ValueSource::Node(o) = self.values[v.index()].source {
            self.nodes[o.node.index()].outputs[o.slot] = None;
        }
        let val = &mut self.values[v.index()];
        val.source = ValueSource::Initializer;
        val.dtype = Some(data.dtype());
        val.shape = Some(Shape::known(data.shape()));
        val.data = Some(data);
        val.lazy = None;
    }

    /// Removes the given nodes, then every value nothing defines or reads any more (graph inputs
    /// and outputs are kept), and renumbers ids. Ids held by the caller are invalid afterwards.
    /// Errors if a removed node's output is still read by a surviving node or is a graph output.
    pub fn remove_nodes(&mut self, dead: &HashSet<NodeId>) -> Result<()> {
        let keep_node: Vec<bool> = (0..self.nodes.len()).map(|i| !dead.contains(&NodeId(i as u32))).collect();
        for &d in dead {
            for &v in self.nodes[d.index()].outputs.iter().flatten() {
                let val = &self.values[v.index()];
                let read = val.consumers.iter().map(|o| o.node).chain(val.implicit_consumers.iter().copied());
                if read.into_iter().any(|n| keep_node[n.index()]) || self.is_output(v) {
                    return Err(GraphError::Unsupported {
                        detail: format!(
                            "cannot remove node '{}': its output '{}' is still read",
                            self.nodes[d.index()].name,
                            val.name
                        ),
                    });
                }
            }
        }
        let mut keep_value = vec![false; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if !keep_node[i] {
                continue;
            }
            for v in n.inputs.iter().chain(n.outputs.iter()).flatten().chain(n.implicit_inputs.iter()) {
                keep_value[v.index()] = true;
            }
        }
        for &v in self.inputs.iter().chain(self.outputs.iter()) {
            keep_value[v.index()] = true;
        }
        self.compact(&keep_node, &keep_value);
        Ok(())
    }

    /// Drops nodes and values whose flag is false and renumbers everything.
    fn compact(&mut self, keep_node: &[bool], keep_value: &[bool]) {
        let remap = |keep: &[bool]| {
            let mut next = 0u32;
            keep.iter()
                .map(|&k| {
                    k.then(|| {
                        next += 1;
                        next - 1
                    })
                })
                .collect::<Vec<Option<u32>>>()
        };
        let node_map = remap(keep_node);
        let value_map = remap(keep_value);
        let nv = |v: ValueId| value_map[v.index()].map(ValueId);
        let nn = |n: NodeId| node_map[n.index()].map(NodeId);

        let nodes = std::mem::take(&mut self.nodes);
        self.nodes = nodes
            .into_iter()
            .zip(keep_node)
            .filter(|(_, k)| **k)
            .map(|(mut n, _)| {
                n.inputs = n.inputs.iter().map(|v| v.and_then(nv)).collect();
                n.outputs = n.outputs.iter().map(|v| v.and_then(nv)).collect();
                n.implicit_inputs = n.implicit_inputs.iter().filter_map(|&v| nv(v)).collect();
                n
            })
            .collect();
        let values = std::mem::take(&mut self.values);
        self.values = values
            .into_iter()
            .zip(keep_value)
            .filter(|(_, k)| **k)
            .map(|(mut v, _)| {
                if let ValueSource::Node(o) = v.source {
                    // remove_nodes checked that kept values keep their producer.
                    let node = nn(o.node).expect("kept value lost its producer");
                    v.source = ValueSource::Node(Outlet { node, slot: o.slot });
                }
                v.consumers = v
                    .consumers
                    .iter()
                    .filter_map(|o| nn(o.node).map(|node| Outlet { node, slot: o.slot }))
                    .collect();
                v.implicit_consumers = v.implicit_consumers.iter().filter_map(|&n| nn(n)).collect();
                v
            })
            .collect();
        self.inputs = self.inputs.iter().filter_map(|&v| nv(v)).collect();
        self.outputs = self.outputs.iter().filter_map(|&v| nv(v)).collect();
        self.by_name =
            self.values.iter().enumerate().map(|(i, v)| (v.name.clone(), ValueId(i as u32))).collect();
    }

    /// A topological order of the nodes, stable with respect to the arena order (Kahn's algorithm
    /// always taking the lowest-numbered ready node). Errors on a cycle.
    pub fn topological_order(&self) -> Result<Vec<NodeId>> {
        let n = self.nodes.len();
        let mut indegree = vec![0usize; n];
        let mut succ: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (i, node) in self.nodes.iter().enumerate() {
            let mut preds: Vec<u32> = node
                .inputs
                .iter()
                .flatten()
                .chain(node.implicit_inputs.iter())
                .filter_map(|&v| self.producer(v).map(|o| o.node.0))
                .collect();
            preds.sort_unstable();
            preds.dedup();
            indegree[i] = preds.len();
            for p in preds {
                succ[p as usize].push(i as u32);
            }
        }
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<u32>> =
            (0..n as u32).filter(|&i| indegree[i as usize] == 0).map(std::cmp::Reverse).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(NodeId(i));
            for &s in &succ[i as usize] {
                indegree[s as usize] -= 1;
                if indegree[s as usize] == 0 {
                    ready.push(std::cmp::Reverse(s));
                }
            }
        }
        if order.len() < n {
            let stuck = (0..n).find(|&i| indegree[i] > 0).unwrap_or(0);
            let node = &self.nodes[stuck];
            return Err(GraphError::Cycle { node: node.name.clone(), op: node.op_type.clone() });
        }
        Ok(order)
    }

    /// Reorders the arena into `topological_order()` (after rewrites that appended nodes read by
    /// earlier ones). Ids held by the caller are invalid afterwards.
    pub fn sort_topologically(&mut self) -> Result<()> {
        let order = self.topological_order()?;
        if order.iter().enumerate().all(|(i, id)| id.index() == i) {
            return Ok(());
        }
        let mut position = vec![0u32; order.len()];
        for (new, old) in order.iter().enumerate() {
            position[old.index()] = new as u32;
        }
        let mut slots: Vec<Option<Node>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        self.nodes = order.iter().map(|old| slots[old.index()].take().unwrap()).collect();
        let remap = |n: NodeId| NodeId(position[n.index()]);
        for v in &mut self.values {
            if let ValueSource::Node(o) = v.source {
                v.source = ValueSource::Node(Outlet { node: remap(o.node), slot: o.slot });
            }
            for o in &mut v.consumers {
                o.node = remap(o.node);
            }
            for n in &mut v.implicit_consumers {
                *n = remap(*n);
            }
        }
        Ok(())
    }

    /// Nodes downstream of the given values (reading them directly or transitively), in
    /// topological order.
    pub fn downstream_nodes(&self, changed: &[ValueId]) -> Vec<NodeId> {
        let mut dirty = vec![false; self.values.len()];
        for &v in changed {
            dirty[v.index()] = true;
        }
        let mut out = Vec::new();
        for (id, node) in self.nodes() {
            if node.inputs.iter().flatten().chain(node.implicit_inputs.iter()).any(|v| dirty[v.index()]) {
                out.push(id);
                for v in node.outputs.iter().flatten() {
                    dirty[v.index()] = true;
                }
            }
        }
        out
    }

    /// Checks the internal links (producer/consumer symmetry, name index, topological arena).
    /// Used by tests and after passes in debug builds.
    pub fn validate(&self) -> Result<()> {
        let broken =
            |detail: String| Err(GraphError::Unsupported { detail: format!("corrupt graph: {detail}") });
        for (i, v) in self.values.iter().enumerate() {
            if self.by_name.get(&v.name) != Some(&ValueId(i as u32)) {
                return broken(format!("name index misses value '{}'", v.name));
            }
            if let ValueSource::Node(o) = v.source {
                if self.nodes[o.node.index()].outputs.get(o.slot) != Some(&Some(ValueId(i as u32))) {
                    return broken(format!("producer link of '{}'", v.name));
                }
                if o.node.index() >= self.nodes.len() {
                    return broken(format!("producer of '{}' out of range", v.name));
                }
            }
            for c in &v.consumers {
                if self.nodes[c.node.index()].inputs.get(c.slot) != Some(&Some(ValueId(i as u32))) {
                    return broken(format!("consumer link of '{}'", v.name));
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for (slot, v) in n.inputs.iter().enumerate() {
                if let Some(v) = v {
                    let site = Outlet { node: NodeId(i as u32), slot };
                    if !self.values[v.index()].consumers.contains(&site) {
                        return broken(format!("node '{}' input {slot} not registered", n.name));
                    }
                    if let Some(p) = self.producer(*v)
                        && p.node.index() >= i
                    {
                        return broken(format!("node '{}' precedes its producer", n.name));
                    }
                }
            }
        }
        Ok(())
    }
}
